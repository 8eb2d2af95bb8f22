"""Write and hash a download's chunks on a second thread, so the network read never waits for disk or sha256.

``hashlib`` and file writes release the GIL on large buffers, so reading the next chunk from the socket overlaps
with hashing and writing the last one. The queue is bounded: memory stays at a few chunks.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path
from types import TracebackType

_QUEUE_CHUNKS = 8
_DONE = b""


class ChunkWriter:
    """``with ChunkWriter(path) as sink: sink.put(chunk)``; then ``sink.sha256``. The file is fsynced on success."""

    def __init__(self, target: Path) -> None:
        self._file = target.open("wb")
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="download-writer", daemon=True)

    def __enter__(self) -> ChunkWriter:
        self._thread.start()
        return self

    def _drain(self) -> None:
        while (chunk := self._queue.get()) is not _DONE:
            if self._error is None:
                try:
                    self._file.write(chunk)
                    self._digest.update(chunk)
                except BaseException as error:  # noqa: BLE001 - handed to the reading thread
                    self._error = error

    def put(self, chunk: bytes) -> None:
        """Queue one non-empty chunk; raises the writer's error (disk full, ...) as soon as it is known."""
        if self._error is not None:
            raise self._error
        if chunk:
            self._queue.put(chunk)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        try:
            if kind is None and self._error is None:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if kind is None and self._error is not None:
            raise self._error
