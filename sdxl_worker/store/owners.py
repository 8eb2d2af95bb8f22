"""Who holds a lock, lease or temp folder in the shared cache, and whether that holder still lives.

An owner record is a small JSON object: ``host`` (``socket.gethostname()``), ``pid``, ``start`` (the process start
time from ``/proc``, so a reused pid is not mistaken for the holder), a random ``token`` and ``created``.
On the same host a holder is alive while its pid runs, is not a zombie and has the recorded start time. On another
host that cannot be checked: callers judge by the file's mtime, which a ``Heartbeat`` refreshes. This assumes one
hostname per PID namespace, which holds for containers (each has its own hostname).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)
HOST = socket.gethostname()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start_ticks)`` of a process from ``/proc``, or ``None`` where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_record() -> dict[str, Any]:
    """A fresh owner record for the calling process (a new token each time)."""
    stat = _proc_stat(os.getpid())
    return {"host": HOST, "pid": os.getpid(), "start": stat[1] if stat else None,
            "token": secrets.token_hex(8), "created": time.time()}


def read_record(path: Path) -> dict[str, Any] | None:
    """The owner record in ``path``, or ``None`` if it is missing, empty or not a record."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def owner_alive(record: dict[str, Any] | None) -> bool | None:
    """``True``/``False`` for a holder on this host; ``None`` when it cannot be known (other host, no record)."""
    if not record or record.get("host") != HOST or not isinstance(record.get("pid"), int):
        return None
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state not in ("Z", "X") and (record.get("start") is None or record.get("start") == start)


class Heartbeat:
    """Refreshes the mtime of registered files every ``interval_s`` from one daemon thread, while any are held."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._paths: set[Path] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, path: Path) -> None:
        """Keep ``path`` fresh until ``discard``."""
        with self._lock:
            self._paths.add(path)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lora-cache-heartbeat", daemon=True)
                self._thread.start()

    def discard(self, path: Path) -> None:
        """Stop refreshing ``path``."""
        with self._lock:
            self._paths.discard(path)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval_s)
            with self._lock:
                if not self._paths:
                    self._thread = None
                    return
                paths = list(self._paths)
            for path in paths:
                try:
                    os.utime(path)
                except OSError:
                    LOG.warning("heartbeat: cannot refresh %s", path, exc_info=True)
