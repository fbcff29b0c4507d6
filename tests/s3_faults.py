"""A fault-injecting HTTP proxy on loopback in front of a real S3-protocol server (moto), for the tests.

Object stores fail in ways a local disk does not: ``503 SlowDown`` under load, ``500 InternalError``,
connections reset mid-request or mid-response, slow answers, and outages of minutes. The proxy forwards
every request to the server unchanged (the signature covers the ``Host`` header, which it keeps) and, on a
seeded random fraction of them, does one of those instead. Faults come before the request reaches the
server (``slowdown``, ``internal``, ``reset``: nothing was applied) or after (``truncated``: the server
applied it and the client receives part of the answer, the case that can read partial data back).
``outage`` resets every connection until it is cleared. Counts of requests and faults are kept per kind.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("slowdown", "internal", "reset", "truncated", "latency")
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>faults</RequestId></Error>"
)
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class FaultPlan:
    """What the proxy does to requests: a ``fraction`` of them (seeded) get one of ``kinds``.

    Attributes:
        fraction: share of requests that fail, 0 to 1.
        kinds: the faults drawn from, uniformly (:data:`FAULT_KINDS`).
        latency_s: the delay of a ``latency`` fault (the request then goes through).
        seed: seeds the draws: the same requests in the same order meet the same faults.
        outage: every connection is reset while set.
    """

    fraction: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    latency_s: float = 0.3
    seed: int = 0
    outage: bool = False
    counts: Counter = field(default_factory=Counter)  # "requests", and one count per fault kind

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {FAULT_KINDS}")
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self) -> str | None:
        """The fault for the next request (None: forward it as it is); counted."""
        with self._lock:
            self.counts["requests"] += 1
            if self.outage:
                kind = "outage"
            elif self._random.random() < self.fraction:
                kind = self._random.choice(self.kinds)
            else:
                return None
            self.counts[kind] += 1
            return kind

    @property
    def faults(self) -> int:
        return sum(count for kind, count in self.counts.items() if kind != "requests")


def _reset(connection: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a load balancer dropping the connection does."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def _handler(upstream: str, plan: FaultPlan) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and ``Expect: 100-continue``, as the AWS SDK uses them

        def log_message(self, format: str, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers, then the blank line
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            headers = {key: value for key, value in self.headers.items() if key.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            try:
                upstream_connection.request(self.command, self.path, body=body, headers=headers)
                response = upstream_connection.getresponse()
                data = response.read()
                return response.status, response.getheaders(), data
            finally:
                upstream_connection.close()

        def _respond(self, status: int, headers: list[tuple[str, str]], data: bytes, cut: bool = False):
            self.send_response_only(status)
            head = self.command == "HEAD"  # its Content-Length is the object's; it has no body
            for key, value in headers:
                if key.lower() not in _HOP_BY_HOP and (head or key.lower() != "content-length"):
                    self.send_header(key, value)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if head:
                return
            if cut:  # half the body, then a reset: the client must not take it for the whole
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                _reset(self.connection)
                self.close_connection = True
                return
            self.wfile.write(data)

        def _handle(self) -> None:
            fault = plan.draw()
            if fault in ("outage", "reset"):
                _reset(self.connection)
                self.close_connection = True
                return
            body = self._body()
            if fault in _ERRORS:
                status, code, message = _ERRORS[fault]
                data = _ERROR_BODY.format(code=code, message=message).encode()
                self._respond(status, [("Content-Type", "application/xml")], data)
                return
            if fault == "latency":
                time.sleep(plan.latency_s)
            status, headers, data = self._forward(body)
            self._respond(status, headers, data, cut=fault == "truncated" and len(data) > 1)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # http.server's names

    return Handler


@contextmanager
def faulty_proxy(upstream: str, plan: FaultPlan) -> Iterator[str]:
    """A proxy on a free loopback port in front of ``upstream`` (``http://host:port``), applying ``plan``;
    its endpoint URL. Stopped on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, plan))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="s3-fault-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
