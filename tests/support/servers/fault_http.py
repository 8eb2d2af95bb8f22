"""A real threaded HTTP/1.1 server on 127.0.0.1 that serves, delays, fails, truncates, resets and redirects on demand.

Each path has a ``Route``; the server records every request (method, path, headers) and the body bytes it sent.
A truncated body ends with an orderly close (FIN) before ``Content-Length`` is reached; a reset aborts the connection
with a TCP RST (``SO_LINGER`` 0) after some body bytes, as a crashed or killed peer does.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.servers.background import BackgroundServer


@dataclass
class Route:
    """How one path answers. Request numbers start at 1 and count per path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0               # before the status line
    delay_first: int | None = None     # delay only requests 1..N (None: all)
    chunk_size: int = 64 * 1024
    chunk_delay_s: float = 0.0         # between body chunks
    send_length: bool = True           # False: no Content-Length, the body ends when the connection closes
    truncate_at: int | None = None     # stop after this many body bytes and close (Content-Length stays full)
    truncate_first: int | None = None  # truncate only requests 1..N (None: all)
    reset_at: int | None = None        # after this many body bytes, abort the connection with a TCP RST
    reset_first: int | None = None     # reset only requests 1..N (None: all)
    fail_first: int = 0                # answer requests 1..N with fail_status
    fail_status: int = 503
    retry_after: str | None = None
    redirect_to: str | None = None     # Location header, absolute or relative
    redirect_status: int = 302
    require_auth: str | None = None    # the Authorization value required, else 401


class FaultServer(BackgroundServer):
    """``with FaultServer() as server: server.route("/a", body=b"..."); requests.get(server.url("/a"))``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sent: Counter[str] = Counter()
        self._lock = threading.Lock()
        super().__init__(_handler_class(self), host, _AbortingHTTPServer)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, path: str, **options) -> Route:
        self.routes[path] = Route(**options)
        return self.routes[path]

    def count(self, path: str, method: str = "GET") -> int:
        with self._lock:
            return sum(1 for seen_method, seen_path, _ in self.requests if (seen_method, seen_path) == (method, path))

    def headers_for(self, path: str) -> list[dict[str, str]]:
        with self._lock:
            return [headers for _, seen_path, headers in self.requests if seen_path == path]

    def record(self, method: str, path: str, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests.append((method, path, headers))
            return sum(1 for seen_method, seen_path, _ in self.requests if (seen_method, seen_path) == (method, path))



class _AbortingHTTPServer(ThreadingHTTPServer):
    """Closes the connections a handler marked with ``abort`` with a bare RST, without the usual FIN first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._aborted: set[int] = set()
        self._aborted_lock = threading.Lock()

    def abort(self, request: socket.socket) -> None:
        request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._aborted_lock:
            self._aborted.add(id(request))

    def shutdown_request(self, request: socket.socket) -> None:
        with self._aborted_lock:
            aborted = id(request) in self._aborted
            self._aborted.discard(id(request))
        if aborted:
            self.close_request(request)
        else:
            super().shutdown_request(request)


def _applies(first: int | None, number: int) -> bool:
    return first is None or number <= first


def _handler_class(owner: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:
            """Quiet: tests read ``owner.requests`` instead."""

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _simple(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _answer(self, send_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            number = owner.record(self.command, path, dict(self.headers.items()))
            route = owner.routes.get(path)
            if route is None:
                return self._simple(404)
            if _applies(route.delay_first, number):
                time.sleep(route.delay_s)
            if route.require_auth is not None and self.headers.get("Authorization") != route.require_auth:
                return self._simple(401)
            if number <= route.fail_first:
                return self._simple(route.fail_status, {"Retry-After": route.retry_after} if route.retry_after else {})
            if route.redirect_to is not None:
                return self._simple(route.redirect_status, {"Location": route.redirect_to})
            self.send_response(route.status)
            for name, value in route.headers.items():
                self.send_header(name, value)
            if route.send_length:
                self.send_header("Content-Length", str(len(route.body)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if not send_body:
                return None
            truncating = route.truncate_at is not None and _applies(route.truncate_first, number)
            resetting = route.reset_at is not None and _applies(route.reset_first, number)
            end = min(route.truncate_at if truncating else len(route.body),
                      route.reset_at if resetting else len(route.body))
            try:
                for start in range(0, end, route.chunk_size):
                    chunk = route.body[start:min(start + route.chunk_size, end)]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    with owner._lock:
                        owner.sent[path] += len(chunk)
                    time.sleep(route.chunk_delay_s)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            if truncating or resetting:
                self.close_connection = True
            if resetting:
                self.server.abort(self.connection)
            return None

    return Handler
