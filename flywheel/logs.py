"""Logging setup for Flywheel's entry points: readable text or JSON lines."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

#: Top-level packages whose loggers are Flywheel's own.
PACKAGES = ("flywheel", "service", "feedback", "monitoring", "retrain", "stack")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Send Flywheel's logs to stderr; called once by each entry point, never at import."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO; their warnings still come through.
    for noisy in ("kafka", "httpx", "urllib3", "transformers", "bentoml", "apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _WorkerHandler(logging.StreamHandler):
    """The handler ``configure_worker_logging`` puts on our loggers; its class tells a later call which to replace."""


def configure_worker_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Set our loggers' level in a process whose logging someone else configured (a BentoML worker).

    With ``as_json`` our loggers write JSON lines to stderr through their own handler and stop propagating, so the
    host's root handler does not print them a second time in its own format; without it they propagate to it as
    before. Other loggers keep the host's configuration. Calling it again replaces what an earlier call did.
    """
    handler = None
    if as_json:
        handler = _WorkerHandler()
        handler.setFormatter(JsonFormatter())
    for package in PACKAGES:
        log = logging.getLogger(package)
        log.setLevel(level.upper())
        log.handlers[:] = [h for h in log.handlers if not isinstance(h, _WorkerHandler)]
        if handler is not None:
            log.addHandler(handler)
        log.propagate = handler is None
    # dictConfig by default disables the loggers that existed before it ran (BentoML's keeps that default).
    for name, existing in logging.root.manager.loggerDict.items():
        if isinstance(existing, logging.Logger) and name.partition(".")[0] in PACKAGES:
            existing.disabled = False
