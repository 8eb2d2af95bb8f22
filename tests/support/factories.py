"""The tests' one settings factory (``cache_settings``, ``worker_settings``) and one worker factory
(``make_worker``): workers of their own (LoRA cache folder, RAM cache, aliases) on the session's tiny pipelines."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sdxl_worker.request.entries import Aliases
from sdxl_worker.settings import GIB, CacheSettings, LoraSettings, UploadSettings, WorkerSettings
from sdxl_worker.store.disk_space import FreeBytes
from sdxl_worker.worker import Worker

# Fault tests: short timeouts and quick retries, so a dead or slow server costs seconds.
FAULT_TIMINGS: dict[str, Any] = {"connect_timeout_s": 2.0, "read_timeout_s": 1.5, "download_retries": 2,
                                 "retry_backoff_s": 0.05, "retry_wait_max_s": 2.0}


def cache_settings(cache_dir: Path, **overrides: Any) -> CacheSettings:
    """LoRA cache settings for tests: servers on 127.0.0.1 allowed, 5 s timeouts, 0.01 s retry backoff."""
    options: dict[str, Any] = {"allow_private_hosts": True, "retry_backoff_s": 0.01, "connect_timeout_s": 5.0,
                               "read_timeout_s": 5.0, **overrides}
    return CacheSettings(cache_dir=cache_dir, **options)


def worker_settings(cache: CacheSettings, aliases: Aliases | None = None, ram_cache_bytes: int = 2 * GIB,
                    overlap: bool = True, upload: UploadSettings | None = None) -> WorkerSettings:
    """The settings of a worker on the tiny model with these LoRA caches, aliases and overlap."""
    loras = LoraSettings(ram_cache_bytes=ram_cache_bytes, overlap=overlap,
                         aliases=MappingProxyType(dict(aliases or {})))
    return dataclasses.replace(WorkerSettings.from_env({"SDXL_MODEL": "tiny"}), cache=cache, loras=loras,
                               upload=upload or UploadSettings())


def make_worker(cache: CacheSettings, *, aliases: Aliases | None = None, ram_cache_bytes: int = 2 * GIB,
                overlap: bool = True, upload: UploadSettings | None = None,
                free_bytes: FreeBytes | None = None) -> Worker:
    """A new ``Worker`` on the session worker's pipelines (loaded once) with its own caches."""
    import handler

    settings = worker_settings(cache, aliases, ram_cache_bytes, overlap, upload)
    return Worker(handler.get_worker().pipes, settings, free_bytes)
