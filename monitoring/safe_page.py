"""Report pages that hostile text cannot script: Evidently's embedded data escaped, its own scripts hashed for CSP.

Evidently 0.7 writes a report as one page whose data (widgets, tables, plots, so the predicted texts themselves)
sits in a ``<script>`` as ``var metric_<id> = <JSON>;`` lines, next to its bundled library and a call that draws
the dashboard into ``<div id="root_metric_<id>">``. ``json.dumps`` leaves ``<`` and ``>`` as they are, so a text
holding ``</script>`` ends that element early and whatever follows it runs as a script of the page.

Two layers, so that either alone keeps such a text inert:

1. ``escaped`` rewrites ``<``, ``>``, ``&``, U+2028 and U+2029 in every data line as ``\\u003c``-style escapes.
   In JSON those characters occur only inside strings, where the escape stands for the same character, so the
   report's scripts read the same data, and no text can end the element or open a tag. A data line is found by
   itself (JSON has no raw line breaks), not by its script element, so this also repairs pages stored before it
   existed, whose script elements a hostile text has already split.
2. ``SafePage.script_hashes`` holds the CSP hashes of only the scripts Evidently's template writes: data lines
   that parse as JSON, the installed bundle byte for byte, and two known one-liners. Any other script, however it
   got in, has no hash in the page's ``Content-Security-Policy`` and the browser refuses to run it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from monitoring.errors import MonitoringError

# Only Evidently's own variable names: a data line assigning to e.g. `location` could navigate the page.
_DATA_LINE = re.compile(
    r"^(?P<head>[ \t]*var (?:additional_graphs_)?metric_[0-9a-f]+ = )(?P<json>.*)(?P<tail>;[ \t]*)$", re.MULTILINE
)
_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})
# An inline script as a browser's tokenizer ends it: at the first `</script` followed by space, `/` or `>`.
_SCRIPT = re.compile(r"<script>(?P<body>.*?)</script[\t\n\f\r />]", re.DOTALL | re.IGNORECASE)
_GLOBAL = "var global = globalThis"
_DRAW = re.compile(
    r"\s*window\.drawDashboard\((metric_[0-9a-f]+),\s*new Map\(Object\.entries\(additional_graphs_\1\)\),"
    r'\s*"root_\1"\s*\);\s*'
)


@dataclass(frozen=True)
class SafePage:
    """A page to store and serve, and the CSP sources (``sha256-…``) of the inline scripts allowed to run in it."""

    html: str
    script_hashes: tuple[str, ...] = ()

    @property
    def headers(self) -> dict[str, str]:
        """Response headers: no MIME sniffing, and a policy that runs only the listed scripts and loads nothing."""
        scripts = " ".join(f"'{source}'" for source in self.script_hashes) or "'none'"
        policy = [
            "default-src 'none'",
            f"script-src {scripts}",
            # Styles cannot run script; Evidently's UI injects style elements at run time and the summary block
            # uses style attributes, neither of which a hash could cover.
            "style-src 'unsafe-inline'",
            "img-src data: blob:",
            "font-src data:",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
        return {"Content-Security-Policy": "; ".join(policy), "X-Content-Type-Options": "nosniff"}


def escaped(html: str) -> str:
    """``html`` with every Evidently data line's JSON unable to end its script or open a tag (idempotent)."""
    return _DATA_LINE.sub(lambda m: m["head"] + m["json"].translate(_ESCAPES) + m["tail"], html)


def safe_page(html: str) -> SafePage:
    """``html`` escaped, with the hashes of the inline scripts that Evidently's report template writes."""
    page = escaped(html)
    hashes: list[str] = []
    for match in _SCRIPT.finditer(page):
        body = match["body"]
        digest = hashlib.sha256(body.encode("utf-8")).digest()
        if _is_data(body) or body == _GLOBAL or _DRAW.fullmatch(body) or digest == _bundle_digest():
            source = "sha256-" + base64.b64encode(digest).decode("ascii")
            if source not in hashes:
                hashes.append(source)
    return SafePage(page, tuple(hashes))


def _is_data(body: str) -> bool:
    lines = [line for line in body.splitlines() if line.strip()]
    return bool(lines) and all((m := _DATA_LINE.fullmatch(line)) and _is_json(m["json"]) for line in lines)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@functools.cache
def _bundle_digest() -> bytes:
    # The library Evidently inlines into every report; found without importing Evidently, which the service
    # keeps out of its start-up. A report written by another Evidently version fails closed: no dashboard.
    spec = importlib.util.find_spec("evidently")
    if spec is None or not spec.submodule_search_locations:
        raise MonitoringError("Evidently is not installed")
    bundle = Path(next(iter(spec.submodule_search_locations))) / "nbextension" / "static" / "index.js"
    return hashlib.sha256(bundle.read_text(encoding="utf-8").encode("utf-8")).digest()
