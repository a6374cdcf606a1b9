"""Supervising Flywheel's components as child processes: prefixed logs, restart with backoff, clean stop."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from flywheel.storage import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class Component:
    """One supervised command and its restart bookkeeping."""

    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: float = 1.0
    log_threads: list[threading.Thread] = field(default_factory=list)
    #: Every process the component has spawned, last seen; some (BentoML workers) leave its process group.
    descendants: set[int] = field(default_factory=set)

    def track(self) -> None:
        """Remember the component's live descendants, so they can be reaped even after it dies."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(psutil.Error):
            self.descendants |= {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}

    def reap(self) -> None:
        """SIGKILL whatever is left of the component: its process group and every descendant seen."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.descendants:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        self.descendants.clear()


class Supervisor:
    """Starts components in order, restarts the ones that die (exponential backoff), stops them all on request.

    Every component runs in its own process group, and its descendants are tracked too, so stopping it also stops
    what it spawned (BentoML workers start their own sessions).
    """

    def __init__(
        self,
        state_path: Path,
        output: IO[str] | None = None,
        max_backoff: float = 30.0,
        stable_after: float = 60.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self.state_path = state_path
        self.output = output or sys.stdout
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self.components: list[Component] = []
        self.stopping = threading.Event()
        self._print_lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        """Print one log line with the component's prefix."""
        with self._print_lock:
            self.output.write(f"{name:<8}| {line}\n")
            self.output.flush()

    def add(self, name: str, argv: list[str], env: dict[str, str]) -> Component:
        """Register and start a component."""
        component = Component(name=name, argv=argv, env=env)
        self.components.append(component)
        self._spawn(component)
        return component

    def _spawn(self, component: Component) -> None:
        component.process = subprocess.Popen(
            component.argv,
            env=component.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        component.started_at = time.monotonic()
        component.restart_at = None
        stream = component.process.stdout
        if stream is not None:
            thread = threading.Thread(target=self._pump, args=(component.name, stream), daemon=True)
            thread.start()
            component.log_threads = [thread]
        self.say("up", f"started {component.name} (pid {component.process.pid})")
        self._write_state()

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self.say(name, raw.decode(errors="replace").rstrip())
        stream.close()

    def _write_state(self) -> None:
        pids = {c.name: c.process.pid for c in self.components if c.process is not None}
        atomic_write_text(self.state_path, json.dumps({"supervisor": os.getpid(), "components": pids}, indent=2))

    def watch(self, until: Callable[[], bool]) -> None:
        """Restart dead components until ``until()`` is true or ``stop()`` is called."""
        while not self.stopping.is_set() and not until():
            now = time.monotonic()
            for component in self.components:
                process = component.process
                component.track()
                if process is None or process.poll() is None:
                    if process is not None and now - component.started_at > self.stable_after:
                        component.backoff = 1.0
                    continue
                if component.restart_at is None:
                    # Orphans of a crashed component (a server's workers) would hold its port: clear them first.
                    component.reap()
                    component.restart_at = now + component.backoff
                    self.say(
                        "up",
                        f"{component.name} exited with code {process.returncode}; "
                        f"restarting in {component.backoff:.0f}s",
                    )
                    component.backoff = min(component.backoff * 2, self.max_backoff)
                elif now >= component.restart_at:
                    component.restarts += 1
                    self._spawn(component)
            self.stopping.wait(0.2)

    def stop(self) -> None:
        """SIGTERM every component (last started first), wait, then SIGKILL whatever is left of their groups."""
        self.stopping.set()
        for component in reversed(self.components):
            component.track()
            if component.process is not None and component.process.poll() is None:
                self.say("up", f"stopping {component.name}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(component.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for component in self.components:
            if component.process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                component.process.wait(max(deadline - time.monotonic(), 0.1))
            component.reap()
            with contextlib.suppress(subprocess.TimeoutExpired):
                component.process.wait(5)
            for thread in component.log_threads:
                thread.join(timeout=2)
        self.state_path.unlink(missing_ok=True)
