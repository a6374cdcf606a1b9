"""How the server-rendered pages (login, drift, model page, annotation desk) are built and served: one template
environment per package, and the headers that keep a page from running what it did not ship."""

from __future__ import annotations

import functools

from jinja2 import Environment, PackageLoader, StrictUndefined


@functools.cache
def templates(package: str, digits: int = 3) -> Environment:
    """The template environment of ``package``'s ``templates/`` folder, built on first use (importing reads no files).

    Autoescape is on for every template (all are HTML), so a hostile text stays text; an undefined name is an error
    rather than an empty string, so a renamed field cannot silently blank part of a page. The ``number`` filter
    prints a float with ``digits`` decimals, and ``-`` for None.
    """
    env = Environment(
        loader=PackageLoader(package),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["number"] = functools.partial(_number, default_digits=digits)
    return env


def _number(value: float | None, digits: int | None = None, *, default_digits: int) -> str:
    return "-" if value is None else f"{value:.{default_digits if digits is None else digits}f}"


def page_headers(*, script: bool = False) -> dict[str, str]:
    """Headers of a page that loads nothing from elsewhere, posts forms only to this site and cannot be framed; it runs
    no script at all, or with ``script`` only same-origin script files (never inline ones)."""
    scripts = "script-src 'self'; " if script else ""
    return {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": f"default-src 'none'; {scripts}style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
        "Cache-Control": "no-store",
    }
