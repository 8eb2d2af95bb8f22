"""The job's path, in order: validate -> resolve LoRAs (cache) -> apply -> generate -> restore -> encode output.

One ``Worker`` per process holds the pipelines (loaded once), the LoRA disk and RAM caches and the patcher.
Downloads and parsing run in worker threads, so with ``MAX_CONCURRENCY`` > 1 one job's LoRA fetch overlaps another
job's generation. Everything that touches the pipeline (apply, generate, restore) runs on one dedicated thread,
which serializes jobs and keeps PyTorch's CPU thread pool warm from job to job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image

from sdxl_worker.errors import JobError, LoraError
from sdxl_worker.generation import generate
from sdxl_worker.input_image import load_init_image
from sdxl_worker.lora.cache import LoraCache, ResolvedLora
from sdxl_worker.lora.fusion import ApplyReport, LoraPatcher
from sdxl_worker.lora.memory_cache import LoraRamCache
from sdxl_worker.lora.requests import LoraRequest, parse_lora_requests
from sdxl_worker.lora.parsing import PEFT_CONFIG, ParsedLora, load_lora
from sdxl_worker.lora.redact import public_url, scrub
from sdxl_worker.models import Pipelines, choose_models, load_pipelines, pick_device_and_dtype
from sdxl_worker.output import encode_images, upload_enabled
from sdxl_worker.progress import JobProgress
from sdxl_worker.validation import JobParams, validate_job_input

LOG = logging.getLogger(__name__)


class PhaseTimer:
    """Milliseconds per named phase of one job."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round(self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000, 2)


class Worker:
    """Serves jobs on pipelines loaded once; see the module docstring for the order of the steps."""

    def __init__(self, pipes: Pipelines, lora_cache: LoraCache, ram_cache: LoraRamCache) -> None:
        self.pipes = pipes
        self.lora_cache = lora_cache
        self.ram_cache = ram_cache
        self.patcher = LoraPatcher(pipes.base, reuse_fused=os.environ.get("LORA_REUSE_FUSED", "1") != "0")
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")

    @classmethod
    def from_env(cls) -> Worker:
        """Load the models chosen by the environment, open the LoRA caches and preload ``PRELOAD_LORAS``."""
        device, dtype = pick_device_and_dtype()
        pipes = load_pipelines(choose_models(), device, dtype)
        worker = cls(pipes, LoraCache.from_env(), LoraRamCache.from_env())
        preload = [source.strip() for source in os.environ.get("PRELOAD_LORAS", "").split(",") if source.strip()]
        if preload:
            worker.preload(preload)
        return worker

    def preload(self, sources: list[str]) -> None:
        """Fetch and parse LoRAs into the disk and RAM caches before the first job; a bad source stops the start."""
        requests, errors = parse_lora_requests(sources, max_per_request=len(sources))
        if errors:
            raise ValueError("PRELOAD_LORAS: " + "; ".join(errors))
        loaded = self.load_all(self.lora_cache.resolve_all(requests))
        LOG.info("preloaded %d LoRA(s): %s", len(loaded), [item.resolved.display_name for item in loaded])

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Serve one RunPod job; errors come back as ``{"error": ...}`` and the worker keeps serving."""
        job_id = str(job.get("id", "local"))
        try:
            return await self._run(job_id, job)
        except JobError as error:
            message = scrub(str(error), self.lora_cache.settings.secrets)
            LOG.warning("job %s failed: %s", job_id, message)
            return {"error": message}
        except Exception as error:  # noqa: BLE001 - the caller gets a message, the log keeps the traceback
            LOG.exception("job %s failed unexpectedly", job_id)
            message = f"Internal error: {type(error).__name__}: {error}"
            return {"error": scrub(message, self.lora_cache.settings.secrets)}

    async def _run(self, job_id: str, job: dict[str, Any]) -> dict[str, Any]:
        timer = PhaseTimer()
        progress = JobProgress(job)
        with timer.phase("validate"):
            params = validate_job_input(job.get("input"), self.lora_cache.settings.max_per_request)
            upload_enabled()
        init_image = None
        if params.image_url is not None:
            with timer.phase("load_image"):
                init_image = await asyncio.to_thread(load_init_image, params.image_url, self.lora_cache.settings)
        with timer.phase("lora_fetch"):
            resolved = await asyncio.to_thread(self.lora_cache.resolve_all, params.loras, progress.message)
        with self.lora_cache.in_use(resolved):
            with timer.phase("lora_load"):
                loaded = await asyncio.to_thread(self.load_all, resolved)
            seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
            images, reports = await asyncio.get_running_loop().run_in_executor(
                self._pipeline_thread, self._generate, params, seed, init_image, loaded, progress, timer)
        with timer.phase("encode"):
            encoded = await asyncio.to_thread(encode_images, images, job_id)
        output: dict[str, Any] = {"images": encoded, "image_url": encoded[0], "seed": seed, "timings": timer.ms}
        if params.loras:
            tokens = self.lora_cache.settings.secrets
            output["loras"] = [lora_report(item, report, tokens) for item, report in zip(loaded, reports)]
            for entry in output["loras"]:
                LOG.info("job %s LoRA %s", job_id, entry)
        LOG.info("job %s done: %d image(s), seed %d, timings %s", job_id, len(encoded), seed, timer.ms)
        return output

    def load_all(self, resolved: list[ResolvedLora]) -> list[LoadedLora]:
        loaded = []
        for item in resolved:
            start = time.perf_counter()
            parsed, ram_hit = self.ram_cache.get_or_load(ram_cache_key(item), lambda item=item: self._parse(item))
            loaded.append(LoadedLora(item, parsed, ram_hit, (time.perf_counter() - start) * 1000))
        return loaded

    def _parse(self, item: ResolvedLora) -> ParsedLora:
        try:
            return load_lora(item.path, ram_cache_key(item), unet_config=self.pipes.base.unet.config,
                             device=self.pipes.device, dtype=self.pipes.dtype)
        except LoraError as error:
            raise LoraError(f"{self._shown(item.request)}: {error}") from None

    def _shown(self, request: LoraRequest) -> str:
        """``loras[i] (label)`` for messages and logs, with token values masked."""
        return f"loras[{request.index}] ({scrub(request.label, self.lora_cache.settings.secrets)})"

    def _generate(self, params: JobParams, seed: int, init_image: Image.Image | None, loaded: list[LoadedLora],
                  progress: JobProgress, timer: PhaseTimer) -> tuple[list[Image.Image], list[ApplyReport]]:
        loras = [(item.parsed, item.resolved.request.scale, self._shown(item.resolved.request)) for item in loaded]
        with timer.phase("lora_apply"):
            reports = self.patcher.apply(loras)
        try:
            with timer.phase("generate"):
                images = generate(self.pipes, params, seed, init_image, progress.denoising_step)
        finally:
            with timer.phase("lora_restore"):
                self.patcher.restore()
        return images, reports


@dataclass(frozen=True)
class LoadedLora:
    """A resolved LoRA parsed (or found in the RAM cache) and ready to apply."""

    resolved: ResolvedLora
    parsed: ParsedLora
    ram_hit: bool
    load_ms: float


def ram_cache_key(item: ResolvedLora) -> str:
    """Content identity of a LoRA: the weights' sha256, plus the adapter config's for PEFT folders."""
    if item.path.is_dir():
        config = hashlib.sha256((item.path / PEFT_CONFIG).read_bytes()).hexdigest()
        return f"{item.sha256}:{config}"
    return item.sha256


def lora_report(item: LoadedLora, report: ApplyReport, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The per-LoRA entry of a job's output; URLs lose secret query parameters, token values are masked."""
    request = item.resolved.request
    source = public_url(request.source) if request.kind == "url" else request.source
    return {
        "source": scrub(source, secrets),
        "label": scrub(request.label, secrets),
        "scale": request.scale,
        "file": scrub(item.resolved.display_name, secrets),
        "cache_hit": item.resolved.cache_hit,
        "ram_cache_hit": item.ram_hit,
        "sha256": item.resolved.sha256,
        "fetch_ms": round(item.resolved.fetch_ms, 2),
        "load_ms": round(item.load_ms, 2),
        **report.as_dict(),
    }
