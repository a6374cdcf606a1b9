"""configure_worker_logging in a process whose logging is already configured, the way BentoML sets up its workers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from flywheel.logs import PACKAGES, configure_worker_logging


@pytest.fixture
def host_log() -> Iterator[io.StringIO]:
    """The host's root handler in its own text format, at WARNING like BentoML's; everything restored afterwards."""
    root = logging.getLogger()
    ours = [logging.getLogger(name) for name in (*PACKAGES, "flywheel.publisher")]
    saved = [(log, log.handlers[:], log.level, log.propagate, log.disabled) for log in ours]
    saved_level = root.level
    stream = io.StringIO()
    host = logging.StreamHandler(stream)
    host.setFormatter(logging.Formatter("HOST %(levelname)s %(name)s: %(message)s"))
    root.addHandler(host)
    root.setLevel(logging.WARNING)
    try:
        yield stream
    finally:
        root.removeHandler(host)
        root.setLevel(saved_level)
        for log, handlers, level, propagate, disabled in saved:
            log.handlers[:] = handlers
            log.setLevel(level)
            log.propagate = propagate
            log.disabled = disabled


def test_our_loggers_write_json_lines_and_only_those(host_log: io.StringIO, capsys: pytest.CaptureFixture[str]) -> None:
    # What dictConfig (BentoML's) does to the loggers of modules imported before it ran.
    logging.getLogger("flywheel.publisher").disabled = True

    configure_worker_logging("INFO", as_json=True)
    logging.getLogger("flywheel.publisher").info("spilled %d events", 3)
    logging.getLogger("feedback.ingestion").warning("pausing consumption")
    logging.getLogger("stack.worker").debug("below the level")
    logging.getLogger("uvicorn.error").warning("not one of ours")

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["level"], line["message"]) for line in lines] == [
        ("flywheel.publisher", "INFO", "spilled 3 events"),
        ("feedback.ingestion", "WARNING", "pausing consumption"),
    ]
    assert all(line["time"] for line in lines)
    # Ours are not printed a second time by the host; everybody else's still are, in the host's format.
    assert host_log.getvalue() == "HOST WARNING uvicorn.error: not one of ours\n"


def test_without_json_our_lines_go_to_the_host_handler_again(
    host_log: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_worker_logging("INFO", as_json=True)
    configure_worker_logging("debug", as_json=False)
    logging.getLogger("retrain.runner").debug("checking for new labels")

    assert capsys.readouterr().err == ""
    assert host_log.getvalue() == "HOST DEBUG retrain.runner: checking for new labels\n"
    assert all(not logging.getLogger(name).handlers for name in PACKAGES)
