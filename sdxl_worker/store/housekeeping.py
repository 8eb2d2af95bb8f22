"""Keeping the shared cache folder tidy: leftovers of interrupted fetches, deleting entries, LRU eviction.

- ``clean_leftovers``: ``.trash-*`` folders go; a ``.tmp-*`` fetch folder goes when its owner died on this host,
  or when nothing in it changed for ``tmp_stale_s`` (owner on another host); broken-lock files older than
  ``lock_stale_s`` go.
- ``trash``: rename a folder to ``.trash-…`` (its name disappears at once), then delete it.
- ``Evictor``: above ``cache_max_bytes`` (``evict``), or until a download has room above the free-disk floor
  (``make_room``), deletes downloaded entries by manifest ``last_used_at``, oldest first, skipping entries that are
  pinned (``PINNED_LORAS``), protected, held by a job of this process or leased by any process, used within
  ``evict_grace_s``, or locked. One evictor at a time (``.locks/evict.lock``); files placed by hand are never
  counted nor evicted. Pinned entries count toward the budget. ``Evictor.remove`` deletes one entry by key under the
  same rules (the ``evict`` action); ``Evictor.refusal`` is the one place that says what may not go.
- ``EvictStatus``, ``RefusalReason`` and ``Refusal``: what deleting one entry came to, as the ``evict`` action
  reports it.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sdxl_worker.net.transfer_progress import format_size
from sdxl_worker.settings import CacheSettings
from sdxl_worker.store.leases import Leases
from sdxl_worker.store.locking import EntryLock, LockTimeout
from sdxl_worker.store.manifest import Manifest, read_manifest
from sdxl_worker.store.owners import Heartbeat, owner_alive, read_record

LOG = logging.getLogger(__name__)
KEY_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAKE_ROOM_WAIT_S = 30.0


class EvictStatus(StrEnum):
    """What asking to delete one entry came to."""

    EVICTED = "evicted"
    NOT_CACHED = "not_cached"
    REFUSED = "refused"


class RefusalReason(StrEnum):
    """Why an entry was not deleted; the value is the reason reported (``RECENT`` reports its particulars)."""

    NOT_AN_ENTRY = "not a downloaded cache entry"
    HAND_PLACED = "placed by hand in the cache folder: the endpoint owner's file, never deleted by a job"
    UNSAFE_NAME = "not a safe cache name"
    PINNED = "pinned (PINNED_LORAS)"
    THIS_JOB = "in use by this job"
    HELD = "in use by a running job of this worker"
    LEASED = "in use by a running job (leased by a worker)"
    RECENT = "used within the eviction grace period"
    BUSY = "being fetched or deleted by a worker right now"


@dataclass(frozen=True)
class Refusal:
    """Why an entry was not deleted: the reason, with particulars when it has them (``detail``)."""

    reason: RefusalReason
    detail: str | None = None

    @property
    def message(self) -> str:
        """The text reported: ``detail``, else the reason."""
        return self.detail or self.reason.value

    @property
    def status(self) -> EvictStatus:
        """``NOT_CACHED`` when there was no downloaded entry to delete, else ``REFUSED``."""
        return EvictStatus.NOT_CACHED if self.reason is RefusalReason.NOT_AN_ENTRY else EvictStatus.REFUSED


@dataclass(frozen=True)
class Entry:
    """A downloaded entry found on disk."""

    key: str
    manifest: Manifest
    size: int


def _tree_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def _newest_mtime(path: Path) -> float:
    newest = 0.0
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        try:
            newest = max(newest, item.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest


def scan_entries(root: Path) -> list[Entry]:
    """Downloaded entries: folders named by a cache key that hold a valid manifest, with their bytes on disk."""
    entries = []
    for child in root.iterdir():
        if KEY_PATTERN.match(child.name) and child.is_dir():
            manifest = read_manifest(child)
            if manifest is not None:
                entries.append(Entry(child.name, manifest, _tree_bytes(child)))
    return entries


def _delete(path: Path) -> None:
    """Delete a folder, or only the link when ``path`` is a symlink (never what a link points to)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def trash(root: Path, path: Path) -> None:
    """Delete a folder of the cache (or a link standing in for one) so that its name vanishes atomically."""
    moved = root / f".trash-{secrets.token_hex(6)}"
    path.rename(moved)
    _delete(moved)


def clean_leftovers(root: Path, settings: CacheSettings) -> None:
    """Remove what interrupted fetches and deletions left behind (see the module docstring)."""
    now = time.time()
    for child in root.iterdir():
        if child.name.startswith(".trash-"):
            _delete(child)
        elif child.name.startswith(".tmp-") and child.is_dir():
            alive = owner_alive(read_record(child / ".owner"))
            if alive is False or (alive is None and now - _newest_mtime(child) > settings.tmp_stale_s):
                LOG.info("removing the leftover %s of an interrupted fetch", child.name)
                shutil.rmtree(child, ignore_errors=True)
    for moved in (root / ".locks").glob("*.stale-*"):
        if now - _newest_mtime(moved) > settings.lock_stale_s:
            moved.unlink(missing_ok=True)


class Evictor:
    """LRU eviction; ``held(key)`` tells whether a job of this process holds an entry; ``pinned`` keys never go."""

    def __init__(self, root: Path, settings: CacheSettings, heartbeat: Heartbeat, leases: Leases,
                 held: Callable[[str], bool], pinned: frozenset[str] = frozenset()) -> None:
        self._root = root
        self._settings = settings
        self._heartbeat = heartbeat
        self._leases = leases
        self._held = held
        self._pinned = pinned

    def _lock(self, name: str, wait_s: float = 0) -> EntryLock:
        return EntryLock(self._root / ".locks" / f"{name}.lock", self._heartbeat, self._settings.lock_stale_s, wait_s)

    def refusal(self, key: str, last_used_at: float, protect: frozenset[str]) -> Refusal | None:
        """Why entry ``key`` may not be deleted now, or ``None`` when it may."""
        if key in self._pinned:
            return Refusal(RefusalReason.PINNED)
        if key in protect:
            return Refusal(RefusalReason.THIS_JOB)
        if self._held(key):
            return Refusal(RefusalReason.HELD)
        if self._leases.live(key):
            return Refusal(RefusalReason.LEASED)
        age = time.time() - last_used_at
        if age < self._settings.evict_grace_s:
            grace = self._settings.evict_grace_s
            return Refusal(RefusalReason.RECENT, f"used {age:.0f} s ago, within the {grace:.0f} s in which a job may "
                                                 "still be about to load it")
        return None

    def _evict_oldest(self, entries: list[Entry], protect: frozenset[str],
                      done: Callable[[list[Entry]], bool]) -> list[Entry]:
        gone: list[Entry] = []
        for entry in sorted(entries, key=lambda item: item.manifest.last_used_at):
            if done(gone):
                break
            if self._evict_one(entry, protect):
                gone.append(entry)
        return gone

    def evict(self, protect: frozenset[str]) -> int:
        """Evict until the cache fits its budget (or nothing more may go); returns how many entries went."""
        budget = self._settings.cache_max_bytes
        if budget is None:
            return 0
        entries = scan_entries(self._root)
        total = sum(entry.size for entry in entries)
        guard = self._lock("evict")
        if total <= budget or not guard.try_acquire():
            return 0
        try:
            gone = self._evict_oldest(entries, protect, lambda gone: total - sum(e.size for e in gone) <= budget)
        finally:
            guard.release()
        left = total - sum(entry.size for entry in gone)
        if left > budget:
            LOG.warning("LoRA cache holds %s, over its budget of %s: the rest is pinned, in use or recent",
                        format_size(left), format_size(budget))
        return len(gone)

    def make_room(self, protect: frozenset[str], shortfall: int, enough: Callable[[], bool]) -> int:
        """Evict oldest first until ``enough()`` (the free-disk floor), unless the entries that may go hold less than
        ``shortfall`` bytes (then nothing goes); returns how many entries went. Waits up to ``MAKE_ROOM_WAIT_S`` for
        another evictor."""
        guard = self._lock("evict", MAKE_ROOM_WAIT_S)
        try:
            guard.acquire()
        except LockTimeout:
            return 0
        try:
            candidates = [entry for entry in scan_entries(self._root)
                          if self.refusal(entry.key, entry.manifest.last_used_at, protect) is None]
            if sum(entry.size for entry in candidates) < shortfall:
                LOG.info("free-disk floor: the %d entries that may be evicted hold less than the %s needed",
                         len(candidates), format_size(shortfall))
                return 0
            return len(self._evict_oldest(candidates, protect, lambda _: enough()))
        finally:
            guard.release()

    def _evict_one(self, entry: Entry, protect: frozenset[str]) -> bool:
        if self.refusal(entry.key, entry.manifest.last_used_at, protect) is not None:
            return False
        return self.remove(entry.key, protect) is None

    def remove(self, key: str, protect: frozenset[str] = frozenset()) -> Refusal | None:
        """Delete downloaded entry ``key`` unless ``refusal`` forbids it or a fetch holds its lock.

        Returns ``None`` when it was deleted, else why not.
        """
        folder = self._root / key
        if not KEY_PATTERN.match(key) or folder.is_symlink() or read_manifest(folder) is None:
            return Refusal(RefusalReason.NOT_AN_ENTRY)
        lock = self._lock(key)
        if not lock.try_acquire():
            return Refusal(RefusalReason.BUSY)
        try:
            current = read_manifest(folder)
            if current is None:
                return Refusal(RefusalReason.NOT_AN_ENTRY)
            refusal = self.refusal(key, current.last_used_at, protect)
            if refusal is not None:
                return refusal
            size = _tree_bytes(folder)
            trash(self._root, folder)
        finally:
            lock.release()
        LOG.info("lora evict [%s] %s: %s, last used %.0f s ago", key, current.display_name, format_size(size),
                 time.time() - current.last_used_at)
        return None
