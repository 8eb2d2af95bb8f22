"""Job progress: logged always, sent with ``runpod.serverless.progress_update`` when running on RunPod.

The SDK posts each update to ``RUNPOD_WEBHOOK_POST_OUTPUT``, which only RunPod's cloud (or a test standing in for
it) sets; locally the updates are only logged. Denoising updates are throttled to one per
``PROGRESS_INTERVAL_S`` seconds (default 1.0), the last step always sent.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import runpod

from sdxl_worker.settings import RuntimeSettings

LOG = logging.getLogger(__name__)


class JobProgress:
    """Progress reporter bound to one job."""

    def __init__(self, job: dict[str, Any], settings: RuntimeSettings) -> None:
        self._job = job
        self._remote = settings.progress_remote
        self._interval = settings.progress_interval_s
        self._last_sent = 0.0

    def send(self, update: dict[str, Any]) -> None:
        """Log ``update`` and post it to RunPod when running there."""
        LOG.debug("job %s progress %s", self._job.get("id"), update)
        if self._remote:
            runpod.serverless.progress_update(self._job, update)
        self._last_sent = time.monotonic()

    def message(self, text: str) -> None:
        """A free-form progress line (downloads, loading)."""
        LOG.info("job %s: %s", self._job.get("id"), text)
        self.send({"message": text})

    def denoising_step(self, step: int, total: int) -> None:
        """Step ``step`` of ``total`` finished."""
        if step == total or time.monotonic() - self._last_sent >= self._interval:
            self.send({"phase": "denoising", "step": step, "total": total, "message": f"step {step}/{total}"})
