"""A real HTTP receiver on loopback for webhook tests: answers each POST with the next status of a script."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int


@dataclass
class Receiver:
    """The receiver's URL, what it got, and the statuses it still has to answer (then ``otherwise``)."""

    url: str
    statuses: list[int]
    otherwise: int = 200
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else self.otherwise

    def taken(self) -> list[Received]:
        """The POSTs answered 2xx."""
        with self.lock:
            return [r for r in self.received if 200 <= r.status < 300]


@contextmanager
def webhook_receiver(statuses: list[int] | None = None, otherwise: int = 200) -> Iterator[Receiver]:
    """A receiver on a free loopback port that answers ``statuses`` in order, then ``otherwise``."""
    receiver = Receiver(url="", statuses=list(statuses or []), otherwise=otherwise)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length))
            status = receiver.next_status()
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                receiver.received.append(Received(self.path, headers, body, status))
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/secret-token"
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
