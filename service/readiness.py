"""What ``/readyz`` answers: the state of every component of a worker, and whether it should get traffic.

A starting worker is ready only once every route the README shows would succeed: the model is loaded, the
batcher runs, events reach Kafka or are being spilled (the publisher's delivery thread works and, while Kafka is
away, the disk takes the spill), and the database is open with its schema at head (so
``/feedback``, ``/review``, the drift pages and ``/retrain/runs`` answer). After that, a database outage no longer
takes the worker out of a load balancer's rotation: readiness then follows the prediction path only, and the body
and the ``flywheel_component_up`` gauge show what is down.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from flywheel.database import BackgroundDatabase, DatabaseError
from flywheel.publisher import EventPublisher
from service.serving import ModelServer

logger = logging.getLogger(__name__)

#: Seconds between database pings; readiness reads the last result, so a probe never waits on a dead database.
DATABASE_PROBE_SECONDS = 5.0


@dataclass(frozen=True)
class ComponentState:
    """One component: up or not, and a line saying why."""

    up: bool
    detail: str


@functools.cache
def _component_gauge() -> Any:
    from prometheus_client import Gauge

    return Gauge(
        "flywheel_component_up",
        "1 while a component of the worker works: model, batcher, broker, database, hot_reload, access.",
        ["component"],
        multiprocess_mode="livemin",
    )


class DatabaseProbe:
    """Pings the worker's database in the background and remembers the last answer."""

    def __init__(self, database: BackgroundDatabase, interval: float = DATABASE_PROBE_SECONDS) -> None:
        self.database = database
        self.interval = interval
        self.state = ComponentState(False, "still connecting")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="database-probe", daemon=True)

    def start(self) -> DatabaseProbe:
        """Begin probing; returns at once."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop probing."""
        self._stop.set()

    def check(self) -> ComponentState:
        """Ping now and remember the answer."""
        try:
            database = self.database.get()
            with database.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            self.state = ComponentState(True, f"open at {database.display_url}")
        except DatabaseError as exc:
            self.state = ComponentState(False, str(exc))
        except SQLAlchemyError as exc:
            self.state = ComponentState(False, f"unreachable: {str(getattr(exc, 'orig', exc)).splitlines()[0]}")
        return self.state

    def _run(self) -> None:
        # Often until the database has first opened (a starting worker's readiness waits on it), then every
        # `interval` seconds.
        opened = self.check().up
        while not self._stop.wait(self.interval if opened else 0.2):
            opened = self.check().up or opened


class Readiness:
    """Evaluates the worker's components for ``/readyz`` and the component gauge."""

    def __init__(
        self,
        serving: ModelServer,
        publisher: EventPublisher,
        database: DatabaseProbe,
        reload_alive: Callable[[], bool],
        principals_loaded: Callable[[], bool],
    ) -> None:
        self.serving = serving
        self.publisher = publisher
        self.database = database
        self.reload_alive = reload_alive
        self.principals_loaded = principals_loaded
        self._was_ready = False

    def components(self) -> dict[str, ComponentState]:
        """The state of every component now."""
        current = self.serving.current
        # Down while the delivery thread is failing, or while neither Kafka nor the disk takes events.
        delivery = self.publisher.health()
        return {
            "model": ComponentState(current is not None, current.version if current else "no champion loaded yet"),
            "batcher": ComponentState(self.serving.alive(), "running" if self.serving.alive() else "stopped"),
            "broker": ComponentState(delivery.up, delivery.detail),
            "database": self.database.state,
            "hot_reload": ComponentState(self.reload_alive(), "watching the champion pointer"),
            # Until the keys are loaded every protected route refuses callers (access fails closed).
            "access": ComponentState(
                self.principals_loaded(), "keys loaded" if self.principals_loaded() else "loading keys"
            ),
        }

    def evaluate(self) -> tuple[bool, dict[str, ComponentState]]:
        """Whether the worker should get traffic, and why; updates the gauge."""
        components = self.components()
        gauge = _component_gauge()
        for name, state in components.items():
            gauge.labels(component=name).set(1 if state.up else 0)
        predicting = all(components[name].up for name in ("model", "batcher", "broker", "access"))
        ready = predicting and (self._was_ready or components["database"].up)
        self._was_ready = self._was_ready or ready
        return ready, components

    def body(self) -> tuple[int, bytes]:
        """Status code and JSON body of ``/readyz``."""
        ready, components = self.evaluate()
        payload = {"ready": ready, "components": {name: asdict(state) for name, state in components.items()}}
        return (200 if ready else 503), json.dumps(payload).encode()
