"""Byte counts of a transfer -> throttled progress messages (percent and MB)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

LOG = logging.getLogger(__name__)
MB = 1_000_000


def format_size(size: float) -> str:
    """``"3.1 MB"``-style decimal size, down to bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} bytes"


class TransferProgress:
    """Call it with ``(done_bytes, total_bytes_or_None)``; it emits at most every ``step_pct`` percent or
    ``interval_s`` seconds, plus the final 100%. A failing ``emit`` is logged, never raised into the download."""

    def __init__(self, emit: Callable[[str], None] | None, prefix: str,
                 step_pct: float = 5.0, interval_s: float = 1.0) -> None:
        self._emit = emit
        self._prefix = prefix
        self._step_pct = step_pct
        self._interval_s = interval_s
        self._last_pct = -step_pct
        self._last_time = 0.0

    def message(self, text: str) -> None:
        """Send ``"<prefix>: <text>"`` now."""
        if self._emit is None:
            return
        try:
            self._emit(f"{self._prefix}: {text}")
        except Exception:
            LOG.warning("progress callback failed", exc_info=True)

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        pct = 100.0 * done / total if total else None
        finished = total is not None and done >= total
        due = now - self._last_time >= self._interval_s
        if pct is not None and pct - self._last_pct >= self._step_pct:
            due = True
        if not (due or finished) or (finished and self._last_pct >= 100.0):
            return
        self._last_time = now
        if pct is None:
            self.message(f"downloading {format_size(done)}")
            return
        self._last_pct = pct
        self.message(f"downloading {pct:.0f}% ({done / MB:.1f} of {total / MB:.1f} MB)")
