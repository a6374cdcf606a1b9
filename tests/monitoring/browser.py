"""A headless Debian ``chromium`` that loads a page and reports its DOM and console messages."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

#: Console lines chromium writes to stderr with --enable-logging=stderr: [..:INFO:CONSOLE:N] "message", source: ...
_CONSOLE = re.compile(r':CONSOLE[^\]]*\] "(?P<message>.*)", source: (?P<source>.*)$')
#: Script errors, failed loads, and whatever a page's Content-Security-Policy refused (blocked scripts included).
_ERROR = re.compile(r"Uncaught|Error|Failed to load resource|ERR_|Content Security Policy", re.IGNORECASE)


@dataclass
class Page:
    """What a loaded page looked like and said."""

    dom: str
    console: list[str]

    @property
    def errors(self) -> list[str]:
        """Console messages that are script errors, failed loads or refusals by the page's CSP."""
        return [line for line in self.console if _ERROR.search(line)]


def chromium() -> str:
    """Path of the chromium binary (installed by the project's install script)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium")
    return path


def load(url: str, budget_ms: int = 10_000, timeout: float = 90.0) -> Page:
    """Load ``url`` headless, let its scripts run for ``budget_ms`` of virtual time, and return DOM and console."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    console = [
        f"{m.group('message')} ({m.group('source')})"
        for line in result.stderr.splitlines()
        if (m := _CONSOLE.search(line))
    ]
    return Page(dom=result.stdout, console=console)
