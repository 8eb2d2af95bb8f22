"""A local stand-in for RunPod's job-output API: records what the SDK's ``progress_update`` posts.

``with ProgressSink() as sink: env["RUNPOD_WEBHOOK_POST_OUTPUT"] = sink.url``; ``sink.updates()`` lists the
``IN_PROGRESS`` outputs in arrival order.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.servers.background import BackgroundServer


class ProgressSink(BackgroundServer):
    """A threaded HTTP server on 127.0.0.1 that answers every POST with ``{}`` and keeps its JSON body."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        super().__init__(_handler_class(self))

    @property
    def url(self) -> str:
        """The value for ``RUNPOD_WEBHOOK_POST_OUTPUT`` (the SDK replaces ``$ID`` with the job id)."""
        return f"http://127.0.0.1:{self.port}/job-done/$ID?gpu=test"

    def record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.posts.append(body)

    def updates(self) -> list[dict[str, Any]]:
        """The outputs of the ``IN_PROGRESS`` posts so far."""
        with self._lock:
            return [post["output"] for post in self.posts if post.get("status") == "IN_PROGRESS"]



def _handler_class(sink: ProgressSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            sink.record(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_: object) -> None:
            """Quiet: tests read ``sink.updates()``."""

    return Handler
