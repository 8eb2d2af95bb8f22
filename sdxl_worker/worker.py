"""The job's path, in order: validate -> resolve LoRAs (cache) -> apply -> generate -> restore -> encode output.

One ``Worker`` per process holds the pipelines (loaded once), the LoRA disk and RAM caches and the patcher.
Everything that touches the pipeline (apply, generate, restore) runs on one dedicated thread, which serializes jobs
and keeps PyTorch's CPU thread pool warm from job to job.

LoRA latency is hidden behind generation (``LORA_OVERLAP``, on by default). Downloads are awaited before the job
takes the pipeline thread, so a slow download never holds up other jobs. Everything else (cache verification,
reading, parsing, conversion, the copy to the device) runs on a loader thread while the pipeline encodes the prompt
and prepares timesteps, latents and time ids; the LoRAs are fused right before the UNet's first call
(``first_call.before_first_call``). The images are bit-identical to the sequential path: the text encoders and
everything before the first UNet call do not depend on a UNet-only LoRA. When a LoRA also patches a text encoder,
the first attempt stops at the UNet's first call and the job runs again in order (apply, then encode).

Timings: ``lora_fetch`` and ``lora_load`` are the LoRA work wherever it ran; ``lora_wait`` + ``lora_apply`` +
``lora_restore`` is what the LoRAs added to the job's latency (``lora_wait`` and ``lora_apply`` fall inside
``generate`` when overlapped).

LoRAs named by prompt tags arrive with the ``loras`` list from validation (``JobParams.prompt`` has the tags
removed). Before any LoRA's tensors are read, its header metadata is checked (``weights.metadata``: a LoRA trained for
another base model is refused). With ``append_trigger_words`` the LoRAs are resolved before the pipeline starts,
since their trigger words change the prompt. An input with ``action`` is a cache action (``cache_actions``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from PIL import Image

from sdxl_worker.store.actions import CacheActions, is_action
from sdxl_worker.errors import JobError, LoraError
from sdxl_worker.generation.first_call import before_first_call
from sdxl_worker.generation.generate import generate
from sdxl_worker.sources.image_url import load_init_image
from sdxl_worker.request.aliases import unknown_name_errors
from sdxl_worker.store.cache import LoraCache, ResolvedLora
from sdxl_worker.store.disk_space import FreeBytes
from sdxl_worker.store.file_checks import PEFT_CONFIG
from sdxl_worker.weights.patcher import ApplyReport, LoraPatcher, ScaledLora
from sdxl_worker.weights.ram_cache import LoraRamCache
from sdxl_worker.weights.metadata import base_model_problem, job_trigger_words, metadata_of
from sdxl_worker.weights.load import TEXT_ENCODERS, ParsedLora, load_lora
from sdxl_worker.store.pinning import parse_sources
from sdxl_worker.request.prompt_tags import with_trigger_words
from sdxl_worker.net.redact import public_source, scrub
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import WorkerSettings
from sdxl_worker.generation.models import Pipelines, choose_models, load_pipelines, pick_device_and_dtype
from sdxl_worker.output.encode import encode_images, upload_enabled
from sdxl_worker.generation.progress import JobProgress
from sdxl_worker.request.validation import JobParams, raise_if_any, validate_job_input

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

    def __init__(self, pipes: Pipelines, settings: WorkerSettings, free_bytes: FreeBytes | None = None) -> None:
        """A worker on loaded ``pipes``; ``free_bytes`` replaces the disk's free-space reading (tests)."""
        self.pipes = pipes
        self.settings = settings
        self.lora_cache = LoraCache(settings.cache, free_bytes)
        self.ram_cache = LoraRamCache(settings.loras.ram_cache_bytes)
        self.aliases = settings.loras.aliases
        self.actions = CacheActions(self.lora_cache, self.ram_cache, self.aliases)
        self.patcher = LoraPatcher(pipes.base, reuse_fused=settings.loras.reuse_fused)
        self.overlap_loras = settings.loras.overlap
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._loader_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lora-load")

    @classmethod
    def start(cls, settings: WorkerSettings) -> Worker:
        """Load the models ``settings`` choose, open the LoRA caches and preload ``PRELOAD_LORAS`` and
        ``PINNED_LORAS``."""
        device, dtype = pick_device_and_dtype(settings.models.dtype)
        worker = cls(load_pipelines(choose_models(settings.models), device, dtype), settings)
        preload = list(settings.loras.preload_sources)
        pinned = list(settings.cache.pinned_sources)
        if preload or pinned:
            worker.preload(preload, pinned)
        return worker

    def preload(self, sources: list[str], pinned: list[str] | None = None) -> None:
        """Fetch and parse LoRAs into the disk and RAM caches before the first job, ``pinned`` ones pinned in RAM
        (the disk cache pins ``PINNED_LORAS`` itself); a bad source stops the start."""
        pinned_requests = parse_sources("PINNED_LORAS", pinned or [], self.aliases)
        pinned_ids = {request.identity for request in pinned_requests}
        requests = [request for request in parse_sources("PRELOAD_LORAS", sources, self.aliases)
                    if request.identity not in pinned_ids] + pinned_requests
        resolved = self.lora_cache.resolve_all(requests)
        self.ram_cache.pin(ram_cache_key(item) for item in resolved if item.request.identity in pinned_ids)
        loaded = self.load_all(resolved)
        LOG.info("preloaded %d LoRA(s), %d pinned: %s", len(loaded), len(pinned_ids),
                 [item.resolved.display_name for item in loaded])

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
        progress = JobProgress(job, self.settings.runtime)
        if is_action(job.get("input")):
            return await asyncio.to_thread(self.actions.run, job["input"], progress.message)
        with timer.phase("validate"):
            params = validate_job_input(job.get("input"), self.lora_cache.settings.max_per_request, self.aliases)
            raise_if_any(unknown_name_errors(params.loras, self.lora_cache.name_exists))
            upload_enabled(self.settings.upload)
        init_image = None
        if params.image_url is not None:
            with timer.phase("load_image"):
                init_image = await asyncio.to_thread(load_init_image, params.image_url, self.lora_cache.settings)
        resolved = None
        if params.loras and params.append_trigger_words:
            with timer.phase("lora_wait"), timer.phase("lora_fetch"):
                resolved = await asyncio.to_thread(self.lora_cache.resolve_all, params.loras, progress.message)
            words = await asyncio.to_thread(job_trigger_words, resolved)
            params = dataclasses.replace(params, prompt=with_trigger_words(params.prompt, words))
        pending = await self._start_loras(params.loras, progress, timer, resolved) if params.loras else None
        if pending is not None and not self._overlaps(init_image):
            with timer.phase("lora_wait"):
                await asyncio.wrap_future(pending)  # the pipeline is taken only once the LoRAs are ready
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        images, loaded, reports = await asyncio.get_running_loop().run_in_executor(
            self._pipeline_thread, self._generate, params, seed, init_image, pending, progress, timer)
        with timer.phase("encode"):
            encoded = await asyncio.to_thread(encode_images, images, job_id, self.settings.upload)
        output: dict[str, Any] = {"images": encoded, "image_url": encoded[0], "seed": seed, "timings": timer.ms}
        if params.prompt != job["input"]["prompt"]:
            output["prompt"] = params.prompt
        if params.loras:
            tokens = self.lora_cache.settings.secrets
            output["loras"] = [lora_report(item, report, tokens) for item, report in zip(loaded, reports)]
            for entry in output["loras"]:
                LOG.info("job %s LoRA %s", job_id, entry)
        LOG.info("job %s done: %d image(s), seed %d, timings %s", job_id, len(encoded), seed, timer.ms)
        return output

    def load_all(self, resolved: list[ResolvedLora]) -> list[LoadedLora]:
        """Parse resolved LoRAs onto the pipeline's device, through the RAM cache, after checking every one's
        metadata (a LoRA trained for another base model is refused before any tensor is read)."""
        for item in resolved:
            problem = base_model_problem(metadata_of(item))
            if problem:
                raise LoraError(f"{self._shown(item.request)}: {problem}")
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
        """``loras[i] (label)`` (or ``prompt <lora:...>``) for messages and logs, with token values masked."""
        return f"{request.ref} ({scrub(request.label, self.lora_cache.settings.secrets)})"

    def _overlaps(self, init_image: Image.Image | None) -> bool:
        """Whether the base UNet is the first model to need the LoRAs (not so for img2img through the refiner)."""
        return self.overlap_loras and (init_image is None or self.pipes.refiner is None)

    async def _start_loras(self, requests: list[LoraRequest], progress: JobProgress, timer: PhaseTimer,
                           resolved: list[ResolvedLora] | None) -> Future[list[LoadedLora]]:
        """Start the job's LoRA work on a loader thread; downloads are awaited here, before the pipeline is taken.

        ``resolved``: the requests already resolved, or ``None``.
        """
        if resolved is None and not all(self.lora_cache.has_local_copy(request) for request in requests):
            with timer.phase("lora_wait"), timer.phase("lora_fetch"):
                resolved = await asyncio.to_thread(self.lora_cache.resolve_all, requests, progress.message)
        return self._loader_threads.submit(self._fetch_and_load, requests, resolved, progress, timer)

    def _fetch_and_load(self, requests: list[LoraRequest], resolved: list[ResolvedLora] | None,
                        progress: JobProgress, timer: PhaseTimer) -> list[LoadedLora]:
        if resolved is None:
            with timer.phase("lora_fetch"):
                resolved = self.lora_cache.resolve_all(requests, progress.message)
        with self.lora_cache.in_use(resolved), timer.phase("lora_load"):
            return self.load_all(resolved)

    def _apply(self, loaded: list[LoadedLora], timer: PhaseTimer) -> list[ApplyReport]:
        loras = [ScaledLora(item.parsed, item.resolved.request.scale, self._shown(item.resolved.request))
                 for item in loaded]
        with timer.phase("lora_apply"):
            return self.patcher.apply(loras)

    def _generate(self, params: JobParams, seed: int, init_image: Image.Image | None,
                  pending: Future[list[LoadedLora]] | None, progress: JobProgress,
                  timer: PhaseTimer) -> tuple[list[Image.Image], list[LoadedLora], list[ApplyReport]]:
        """On the pipeline thread: apply the LoRAs (at the UNet's first call when overlapping), generate, restore."""
        def run_pipeline() -> list[Image.Image]:
            with timer.phase("generate"):
                return generate(self.pipes, params, seed, init_image, progress.denoising_step)

        if pending is None:
            return run_pipeline(), [], []
        try:
            if self._overlaps(init_image):
                applied: dict[str, Any] = {}

                def apply_before_denoising() -> None:
                    with timer.phase("lora_wait"):
                        loaded = pending.result()
                    if any(item.patches_text_encoders for item in loaded):
                        raise _EncodeAfterApplying
                    applied.update(loaded=loaded, reports=self._apply(loaded, timer))

                try:
                    with before_first_call(self.pipes.base.unet, apply_before_denoising):
                        images = run_pipeline()
                    return images, applied["loaded"], applied["reports"]
                except _EncodeAfterApplying:
                    LOG.info("a LoRA patches a text encoder: encoding the prompt again after applying it")
            loaded = pending.result()
            reports = self._apply(loaded, timer)
            return run_pipeline(), loaded, reports
        finally:
            with timer.phase("lora_restore"):
                self.patcher.restore()


class _EncodeAfterApplying(Exception):
    """Stops an overlapped attempt at the UNet's first call: a LoRA patches a text encoder, so it must come first."""


@dataclass(frozen=True)
class LoadedLora:
    """A resolved LoRA parsed (or found in the RAM cache) and ready to apply."""

    resolved: ResolvedLora
    parsed: ParsedLora
    ram_hit: bool
    load_ms: float

    @property
    def patches_text_encoders(self) -> bool:
        """Whether applying it changes a text encoder (so the prompt must be encoded after it is applied)."""
        return self.resolved.request.scale != 0 and any(self.parsed.components.get(name) for name in TEXT_ENCODERS)


def ram_cache_key(item: ResolvedLora) -> str:
    """Content identity of a LoRA: the weights' sha256, plus the adapter config's for PEFT folders."""
    if item.path.is_dir():
        config = hashlib.sha256((item.path / PEFT_CONFIG).read_bytes()).hexdigest()
        return f"{item.sha256}:{config}"
    return item.sha256


def lora_report(item: LoadedLora, report: ApplyReport, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The per-LoRA entry of a job's output; URLs lose secret query parameters, token values are masked."""
    request = item.resolved.request
    return {
        "source": scrub(public_source(request.source), secrets),
        "label": scrub(request.label, secrets),
        "scale": request.scale,
        "file": scrub(item.resolved.display_name, secrets),
        "cache_hit": item.resolved.cache_hit,
        "ram_cache_hit": item.ram_hit,
        "sha256": item.resolved.sha256,
        "fetch_ms": round(item.resolved.fetch_ms, 2),
        "load_ms": round(item.load_ms, 2),
        **report.as_dict(),
        "metadata": metadata_of(item.resolved).report(),
    }
