"""Keeping the shared cache folder tidy: leftovers of interrupted fetches, deleting entries, LRU eviction.

- ``clean_leftovers``: ``.trash-*`` folders go; a ``.tmp-*`` fetch folder goes when its owner died on this host,
  or when nothing in it changed for ``tmp_stale_s`` (owner on another host); broken-lock files older than
  ``lock_stale_s`` go.
- ``trash``: rename a folder to ``.trash-…`` (its name disappears at once), then delete it.
- ``Evictor``: above ``cache_max_bytes``, deletes downloaded entries by manifest ``last_used_at``, oldest first,
  skipping entries that are protected, held by a job of this process or leased by any process, used within
  ``evict_grace_s``, or locked. One evictor at a time (``.locks/evict.lock``); files placed by hand are never
  counted nor evicted.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdxl_worker.lora.leases import Leases
from sdxl_worker.lora.locking import EntryLock
from sdxl_worker.lora.manifest import Manifest, read_manifest
from sdxl_worker.lora.owners import Heartbeat, owner_alive, read_record
from sdxl_worker.lora.settings import CacheSettings
from sdxl_worker.lora.transfer_progress import format_size

LOG = logging.getLogger(__name__)
KEY_PATTERN = re.compile(r"^[0-9a-f]{32}$")


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
    """LRU eviction over the budget; ``held(key)`` tells whether a job of this process holds an entry."""

    def __init__(self, root: Path, settings: CacheSettings, heartbeat: Heartbeat, leases: Leases,
                 held: Callable[[str], bool]) -> None:
        self._root = root
        self._settings = settings
        self._heartbeat = heartbeat
        self._leases = leases
        self._held = held

    def _lock(self, name: str) -> EntryLock:
        return EntryLock(self._root / ".locks" / f"{name}.lock", self._heartbeat, self._settings.lock_stale_s, 0)

    def _evictable(self, key: str, last_used_at: float, protect: frozenset[str]) -> bool:
        recent = time.time() - last_used_at < self._settings.evict_grace_s
        return not (key in protect or recent or self._held(key) or self._leases.live(key))

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
        evicted = 0
        try:
            for entry in sorted(entries, key=lambda item: item.manifest.last_used_at):
                if total <= budget:
                    break
                if self._evict_one(entry, protect):
                    total -= entry.size
                    evicted += 1
            if total > budget:
                LOG.warning("LoRA cache holds %s, over its budget of %s: the rest is in use or recent",
                            format_size(total), format_size(budget))
        finally:
            guard.release()
        return evicted

    def _evict_one(self, entry: Entry, protect: frozenset[str]) -> bool:
        if not self._evictable(entry.key, entry.manifest.last_used_at, protect):
            return False
        lock = self._lock(entry.key)
        if not lock.try_acquire():
            return False
        try:
            current = read_manifest(self._root / entry.key)
            if current is None or not self._evictable(entry.key, current.last_used_at, protect):
                return False
            trash(self._root, self._root / entry.key)
        finally:
            lock.release()
        LOG.info("lora evict [%s] %s: %s, last used %.0f s ago", entry.key, current.display_name,
                 format_size(entry.size), time.time() - current.last_used_at)
        return True
