"""Workers of their own (cache folder, RAM cache, aliases) on the in-process tiny pipelines, for LoRA tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdxl_worker.store.cache import LoraCache
from sdxl_worker.weights.ram_cache import LoraRamCache
from sdxl_worker.request.entries import Aliases
from sdxl_worker.settings import GIB, CacheSettings
from sdxl_worker.worker import Worker
from tests.worker_env import run_through_sdk


@pytest.fixture(scope="session")
def pipes(worker_handler):
    """The pipelines of the session's in-process worker (loaded once)."""
    import handler

    return handler.get_worker().pipes


def worker_with(pipes, cache_dir: Path, aliases: Aliases | None = None, **settings: Any) -> Worker:
    """A worker on ``pipes`` with its own LoRA cache in ``cache_dir`` (private hosts allowed) and RAM cache."""
    options = {"allow_private_hosts": True, "retry_backoff_s": 0.01, **settings}
    return Worker(pipes, LoraCache(CacheSettings(cache_dir=cache_dir, **options)), LoraRamCache(2 * GIB), aliases)


def output_of(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    """Run one job through the runpod SDK's ``run_job``; the output, failing on an error."""
    result = run_through_sdk(worker.run, job_input)
    assert "error" not in result, result["error"]
    return result["output"]


def error_of(worker: Worker, job_input: dict[str, Any]) -> str:
    """Run one job through the SDK; its error message, failing when it succeeds."""
    result = run_through_sdk(worker.run, job_input)
    assert "error" in result and "output" not in result, result
    return result["error"]
