"""How long a download may take and how slow it may get: a total deadline and a minimum throughput.

- ``LORA_DOWNLOAD_DEADLINE_S``: one download, every attempt, redirect and retry wait together, ends when it has run
  this long (checked between reads, so it is passed by at most one read timeout).
- ``LORA_MIN_THROUGHPUT_KBPS``: a body that brings fewer kB/s than this over a window of ``throughput_window_s``
  is cut off as too slow (a retryable failure: another connection may be faster); 0 turns the check off.

The read timeout alone bounds only the gap between two bytes: a server dripping one byte just under it would hold
the download, its cache lock and every waiter for hours.
"""

from __future__ import annotations

import time

from sdxl_worker.errors import LoraError
from sdxl_worker.net.transfer_progress import format_size
from sdxl_worker.settings import CacheSettings


class TooSlow(LoraError):
    """The body came in under the minimum throughput over a whole window."""


class DeadlinePassed(LoraError):
    """The download has run longer than its total deadline."""


class Pace:
    """The clock of one download: started at creation, checked with ``check_deadline`` and ``check_body``."""

    def __init__(self, settings: CacheSettings) -> None:
        self._deadline_s = settings.download_deadline_s
        self._min_bps = settings.min_throughput_kbps * 1000
        self._window_s = settings.throughput_window_s
        self._ends = time.monotonic() + self._deadline_s
        self._window_start, self._window_bytes = time.monotonic(), 0

    def check_deadline(self) -> None:
        """Raise ``DeadlinePassed`` once the deadline has passed."""
        if time.monotonic() >= self._ends:
            raise DeadlinePassed(f"the download took longer than {self._deadline_s:g} s (LORA_DOWNLOAD_DEADLINE_S)")

    def start_body(self) -> None:
        """Start the throughput window at the first body read of an attempt."""
        self._window_start, self._window_bytes = time.monotonic(), 0

    def check_body(self, done: int) -> None:
        """After a read that brought the body to ``done`` bytes: ``DeadlinePassed`` or ``TooSlow`` when due."""
        self.check_deadline()
        now = time.monotonic()
        elapsed = now - self._window_start
        if self._min_bps <= 0 or elapsed < self._window_s:
            return
        rate = (done - self._window_bytes) / elapsed
        if rate < self._min_bps:
            raise TooSlow(f"the download slowed to {format_size(int(rate))}/s over {elapsed:.0f} s, under "
                          f"{self._min_bps / 1000:g} kB/s (LORA_MIN_THROUGHPUT_KBPS)")
        self._window_start, self._window_bytes = now, done
