"""A per-entry lock that works across processes and machines sharing the cache folder, without ``flock``
(network volumes may not honour it).

- Acquire: create the lock file with ``O_CREAT | O_EXCL`` and write an owner record (``owners``) into it. While
  held, a ``Heartbeat`` refreshes its mtime every ``heartbeat_s``.
- Wait: poll. The lock is stale when its holder is dead on this host (pid gone, zombie or reused), or, for a holder
  on another host, when this waiter has seen the file unchanged (inode, size, mtime) for
  ``stale_s`` by its own monotonic clock, so the clocks of different machines are never compared.
- A file with no readable owner record (empty, garbage, cut short) is garbage, not a holder: a holder writes its
  record right after creating the file. It is stale once its mtime is ``RECORDLESS_GRACE_S`` old by this machine's
  clock (the grace covers that write, and clock skew for a lock being created on another host).
- Bounded wait: a waiter gives up (``LockTimeout``) after ``wait_s`` in all, or after ``idle_s`` in which the
  holder's work (``progress()``: the bytes in its temp folder) did not grow, so a holder kept alive by its heartbeat
  but stuck on a dripping or stalled server does not hold its waiters for ``wait_s``.
- ``try_acquire`` (eviction, which never waits) cannot watch a file over time: it takes a foreign holder's lock as
  stale when its mtime is older than ``stale_s`` by this machine's clock.
- Break: rename the stale file to a unique name (only one waiter wins), check it is the very file judged stale,
  delete it; a fresh lock moved by mistake (its heartbeat changed it meanwhile) is linked back.
- Release: delete the file only if it still holds this holder's token.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from sdxl_worker.errors import LoraError
from sdxl_worker.store.owners import Heartbeat, owner_alive, owner_record, read_record

LOG = logging.getLogger(__name__)
FileIdentity = tuple[int, int, int]
RECORDLESS_GRACE_S = 10.0


def describe_owner(record: dict[str, Any] | None) -> str:
    """``host pid N`` of an owner record, for log lines."""
    return f"{record.get('host')} pid {record.get('pid')}" if record else "an unknown holder"


class LockTimeout(LoraError):
    """Waited longer than allowed for another holder of the lock."""


class EntryLock:
    """The lock file ``path``; see the module docstring for the protocol."""

    def __init__(self, path: Path, heartbeat: Heartbeat, stale_s: float, wait_s: float,
                 idle_s: float | None = None) -> None:
        self.path = path
        self._heartbeat = heartbeat
        self._stale_s = stale_s
        self._wait_s = wait_s
        self._idle_s = idle_s
        self._token: str | None = None

    def _create(self) -> bool:
        record = owner_record()
        try:
            fd = self._open_new()
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        self._token = record["token"]
        self._heartbeat.add(self.path)
        return True

    def _open_new(self) -> int:
        """Create the lock file exclusively; its folder is created again if it went (the cache folder deleted)."""
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        try:
            return os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, flags, 0o644)

    def _garbage(self, record: dict[str, Any] | None, identity: FileIdentity) -> bool:
        """A lock file without an owner record, older than ``RECORDLESS_GRACE_S``."""
        return record is None and time.time() - identity[2] / 1e9 > RECORDLESS_GRACE_S

    def _observe(self) -> tuple[dict[str, Any] | None, FileIdentity] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return read_record(self.path), (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def _break(self, seen: FileIdentity, record: dict[str, Any] | None) -> None:
        moved = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        stat = os.stat(moved)
        if (stat.st_ino, stat.st_size, stat.st_mtime_ns) == seen:
            LOG.warning("lock %s: broke a stale lock of %s", self.path.name, describe_owner(record))
        else:
            try:
                os.link(moved, self.path)
            except OSError:
                LOG.warning("lock %s: could not restore a live lock moved while breaking", self.path.name)
        moved.unlink(missing_ok=True)

    def try_acquire(self) -> bool:
        """Take the lock now if it is free, its holder is dead on this host, it holds no record (past the grace), or
        (another host) its mtime is older than ``stale_s`` by this machine's clock; never waits."""
        if self._create():
            return True
        observed = self._observe()
        if observed is not None:
            record, identity = observed
            alive = owner_alive(record)
            if alive is False or self._garbage(record, identity) or (
                    alive is None and time.time() - identity[2] / 1e9 > self._stale_s):
                self._break(identity, record)
        return self._create()

    def acquire(self, on_wait: Callable[[dict[str, Any] | None], None] | None = None,
                progress: Callable[[], int] | None = None) -> None:
        """Take the lock, waiting for a live holder; ``on_wait(owner_record)`` is called once if it waits.

        Raises ``LockTimeout`` after ``wait_s``, or after ``idle_s`` without a change of ``progress()``."""
        start = time.monotonic()
        seen: FileIdentity | None = None
        seen_since, delay, waited = start, 0.05, False
        done, done_since = progress() if progress else 0, start
        while not self._create():
            observed = self._observe()
            if observed is None:
                continue
            record, identity = observed
            now = time.monotonic()
            if identity != seen:
                seen, seen_since = identity, now
            alive = owner_alive(record)
            watched_out = alive is None and now - seen_since >= self._stale_s
            if alive is False or self._garbage(record, identity) or watched_out:
                self._break(identity, record)
                continue
            if not waited and on_wait is not None:
                on_wait(record)
            waited = True
            if now - start >= self._wait_s:
                raise LockTimeout(f"waited {self._wait_s:g} s for {describe_owner(record)} to finish fetching it")
            if progress is not None and self._idle_s is not None:
                current = progress()
                if current != done:
                    done, done_since = current, now
                elif now - done_since >= self._idle_s:
                    raise LockTimeout(f"{describe_owner(record)} is fetching it but its download made no progress "
                                      f"for {self._idle_s:g} s; try again later")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def release(self) -> None:
        """Give the lock up (only if this holder still owns the file)."""
        self._heartbeat.discard(self.path)
        record = read_record(self.path)
        if record is not None and record.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        else:
            LOG.warning("lock %s was taken over while held", self.path.name)
        self._token = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
