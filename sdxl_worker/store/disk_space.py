"""The free-disk floor (``LORA_CACHE_MIN_FREE_MB``): downloads keep that much free on the cache's file system (to
within one check interval when the server does not announce the size).

A ``SpaceGuard`` watches one download. ``ensure(remaining)`` makes sure ``remaining`` more bytes fit above the floor:
when they do not, it asks ``make_room`` to evict least recently used entries until they do (nothing is evicted when
the entries that may go could not free enough), and raises ``LoraError`` naming the free space, the floor and the
variable if room cannot be made. Called as a byte-progress
callback ``(done, total)``, it runs ``ensure(total - done)`` before the body when the size is known, on the first
chunk, and then every ``check_every`` bytes (``free_check_bytes``, 8 MiB), since others write to the same volume
meanwhile; the cache calls ``ensure(0)`` once more when the whole file is on disk, before publishing it. Only fetches
use it: cache hits and jobs without LoRAs never read the free space.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from sdxl_worker.errors import LoraError
from sdxl_worker.net.transfer_progress import format_size

LOG = logging.getLogger(__name__)
FreeBytes = Callable[[], int]
MakeRoom = Callable[[int, Callable[[], bool]], int]


def disk_free_bytes(folder: Path) -> FreeBytes:
    """The free space of ``folder``'s file system, for its unprivileged users (``shutil.disk_usage``)."""
    return lambda: shutil.disk_usage(folder).free


class SpaceGuard:
    """The floor for one download; ``make_room(shortfall, enough)`` evicts until ``enough()`` and returns how many
    entries went."""

    def __init__(self, floor_bytes: int, free_bytes: FreeBytes, make_room: MakeRoom, check_every: int) -> None:
        self._floor = floor_bytes
        self._free_bytes = free_bytes
        self._make_room = make_room
        self._check_every = check_every
        self._checked_at: int | None = None
        self.evicted = 0

    def _fits(self, remaining: int) -> bool:
        return self._free_bytes() - remaining >= self._floor

    def ensure(self, remaining: int) -> None:
        """Evict until ``remaining`` more bytes leave the floor free; ``LoraError`` if that cannot be done."""
        if self._floor <= 0:
            return
        free = self._free_bytes()
        if free - remaining >= self._floor:
            return
        evicted = self._make_room(remaining + self._floor - free, lambda: self._fits(remaining))
        self.evicted += evicted
        free = self._free_bytes()
        if free - remaining >= self._floor:
            LOG.info("free-disk floor: evicted %d entr%s to keep %s free", evicted, "y" if evicted == 1 else "ies",
                     format_size(self._floor))
            return
        needs = f"the download needs {format_size(remaining)} more and " if remaining else ""
        raise LoraError(f"not enough free disk space in the LoRA cache: {format_size(free)} free, {needs}"
                        f"LORA_CACHE_MIN_FREE_MB keeps {format_size(self._floor)} free, even after evicting what "
                        f"may go ({evicted} least recently used entr{'y' if evicted == 1 else 'ies'}; pinned, "
                        "in-use and recently used entries stay)")

    def __call__(self, done: int, total: int | None) -> None:
        if self._checked_at is not None and done - self._checked_at < self._check_every:
            return
        self._checked_at = done
        self.ensure(max(total - done, 0) if total is not None else 0)
