"""An in-memory LRU of parsed LoRAs (factors already on the pipeline's device and dtype), bounded in bytes.

A repeated LoRA skips disk, parsing, conversion and host-to-device copies. Budget: ``LORA_RAM_CACHE_GB`` (GiB,
default 2; 0 disables). Thread-safe: parsing for one key happens once even when several jobs ask at once.

Pinned keys (``pin``, from ``PINNED_LORAS``) are never evicted and are kept even when larger than the budget; they
count toward it, so unpinned LoRAs get what is left. When pinned LoRAs alone exceed the budget, only the most
recently loaded unpinned LoRA is kept beside them (a warning says so).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable

from sdxl_worker.store.file_checks import PEFT_CONFIG
from sdxl_worker.weights.load import ParsedLora

if TYPE_CHECKING:
    from sdxl_worker.store.cache import ResolvedLora

LOG = logging.getLogger(__name__)


def ram_cache_key(item: ResolvedLora) -> str:
    """Content identity of a LoRA, its key here: the weights' sha256, plus the adapter config's for PEFT folders."""
    if item.path.is_dir():
        config = hashlib.sha256((item.path / PEFT_CONFIG).read_bytes()).hexdigest()
        return f"{item.sha256}:{config}"
    return item.sha256


class LoraRamCache:
    """LRU of ``ParsedLora`` keyed by content identity, evicting least recently used entries above the budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, ParsedLora] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._pinned: set[str] = set()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def pin(self, keys: Iterable[str]) -> None:
        """Never evict these content keys (loaded now or later)."""
        with self._lock:
            self._pinned.update(keys)

    def stats(self) -> dict[str, int]:
        """Entries, bytes, budget, pinned entries and this process's hit/miss counts."""
        with self._lock:
            return {"entries": len(self._entries), "size_bytes": sum(entry.nbytes for entry in self._entries.values()),
                    "budget_bytes": self.budget_bytes, "pinned": len(self._pinned & self._entries.keys()),
                    "hits": self.hits, "misses": self.misses}

    def get_or_load(self, key: str, loader: Callable[[], ParsedLora]) -> tuple[ParsedLora, bool]:
        """The cached LoRA for ``key`` (and True), or ``loader()``'s result, cached (and False)."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key], True
            parsed = loader()
            with self._lock:
                self.misses += 1
                self._key_locks.pop(key, None)
                if parsed.nbytes <= self.budget_bytes or key in self._pinned:
                    self._entries[key] = parsed
                    self._evict_over_budget(key)
            return parsed, False

    def _evict_over_budget(self, newest: str) -> None:
        total = sum(entry.nbytes for entry in self._entries.values())
        for key in [key for key in self._entries if key not in self._pinned and key != newest]:
            if total <= self.budget_bytes:
                return
            evicted = self._entries.pop(key)
            total -= evicted.nbytes
            LOG.info("RAM cache: evicted LoRA %s (%.1f MB)", key[:16], evicted.nbytes / 1e6)
        if total > self.budget_bytes:
            LOG.warning("RAM cache: %.1f MB of LoRAs, over its budget of %.1f MB (LORA_RAM_CACHE_GB): pinned LoRAs "
                        "are never evicted", total / 1e6, self.budget_bytes / 1e6)
