"""An in-memory LRU of parsed LoRAs (factors already on the pipeline's device and dtype), bounded in bytes.

A repeated LoRA skips disk, parsing, conversion and host-to-device copies. Budget: ``LORA_RAM_CACHE_GB`` (GiB,
default 2; 0 disables). Thread-safe: parsing for one key happens once even when several jobs ask at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Callable

from sdxl_worker.lora.parsing import ParsedLora

LOG = logging.getLogger(__name__)
GIB = 1024**3


class LoraRamCache:
    """LRU of ``ParsedLora`` keyed by content identity, evicting least recently used entries above the budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, ParsedLora] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_env(cls) -> "LoraRamCache":
        """Budget from ``LORA_RAM_CACHE_GB``."""
        raw = os.environ.get("LORA_RAM_CACHE_GB", "2").strip() or "2"
        try:
            budget = float(raw)
        except ValueError:
            raise ValueError(f"LORA_RAM_CACHE_GB must be a number of GiB, got {raw!r}") from None
        if budget < 0:
            raise ValueError(f"LORA_RAM_CACHE_GB must not be negative, got {raw!r}")
        return cls(int(budget * GIB))

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def stats(self) -> dict[str, int]:
        """Entries, bytes, budget and this process's hit/miss counts."""
        with self._lock:
            return {"entries": len(self._entries), "size_bytes": sum(entry.nbytes for entry in self._entries.values()),
                    "budget_bytes": self.budget_bytes, "hits": self.hits, "misses": self.misses}

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
                if parsed.nbytes <= self.budget_bytes:
                    self._entries[key] = parsed
                    self._evict_over_budget()
            return parsed, False

    def _evict_over_budget(self) -> None:
        total = sum(entry.nbytes for entry in self._entries.values())
        while total > self.budget_bytes and len(self._entries) > 1:
            key, evicted = self._entries.popitem(last=False)
            total -= evicted.nbytes
            LOG.info("RAM cache: evicted LoRA %s (%.1f MB)", key[:16], evicted.nbytes / 1e6)
