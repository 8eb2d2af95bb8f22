"""RunPod serverless entry point: SDXL with per-request LoRAs.

    python handler.py                        # on RunPod (or locally with test_input.json in the working folder)
    python handler.py --test_input '{...}'   # one local job
    python handler.py --rp_serve_api         # the runpod SDK's local FastAPI server

Importing this module starts nothing; the pipelines are loaded once per process, on the first job or at start.
The job's path is in ``sdxl_worker.worker``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any

import runpod

from sdxl_worker.settings import WorkerSettings
from sdxl_worker.worker import Worker

LOG = logging.getLogger("handler")

_worker: Worker | None = None
_worker_lock = threading.Lock()


@functools.cache
def get_settings() -> WorkerSettings:
    """The process's settings, read from the environment once (a malformed variable stops the worker)."""
    return WorkerSettings.from_env(os.environ)


def get_worker() -> Worker:
    """The process's worker, created (models loaded) on first use."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = Worker.start(get_settings())
        return _worker


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Serve one job: ``{"input": {...}}`` -> ``{"images", "image_url", "seed", "timings", "loras"?}`` or ``{"error"}``."""
    return await get_worker().run(job)


def concurrency_modifier(current_concurrency: int) -> int:
    """Jobs taken at once (``MAX_CONCURRENCY``, default 1); generation itself is serialized."""
    return get_settings().runtime.max_concurrency


def configure_logging() -> None:
    """Plain log lines at ``LOG_LEVEL`` (default INFO)."""
    logging.basicConfig(
        level=get_settings().runtime.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    configure_logging()
    get_worker()
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
