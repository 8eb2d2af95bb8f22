"""The job's path, in order: validate -> resolve LoRAs (cache) -> load and apply -> generate -> restore -> encode.

One ``Worker`` per process holds the pipelines (loaded once), the LoRA disk and RAM caches and the patcher.
Everything that touches the pipeline (apply, generate, restore) runs on one dedicated thread, which serializes jobs
and keeps PyTorch's CPU thread pool warm from job to job.

A job's LoRAs are resolved (downloaded, or their cache entries checked) before the job takes the pipeline thread, so
a slow download never holds up other jobs. Downloads (LoRAs, ``image_url``, cache actions) run on a pool of their
own, one thread per ``MAX_CONCURRENCY``, never on the event loop's default pool that the runpod SDK and each job's
short steps (trigger words, encoding) use. A ``LoraSession`` per job then loads, applies and restores them: with
``LORA_OVERLAP`` (on by default) the load runs on a loader thread while the pipeline encodes the prompt, and the
LoRAs are fused right before the UNet's first call, unless a LoRA may patch a text encoder (then in order); see
``weights.session``. The images are bit-identical either way.

Timings: ``lora_fetch`` and ``lora_load`` are the LoRA work wherever it ran; ``lora_wait`` + ``lora_apply`` +
``lora_restore`` is what the LoRAs added to the job's latency (``lora_wait`` and ``lora_apply`` fall inside
``generate`` when overlapped).

LoRAs named by prompt tags arrive with the ``loras`` list from validation (``JobParams.prompt`` has the tags
removed). Before any LoRA's tensors are read, its header metadata is checked (``weights.metadata``: a LoRA trained for
another base model is refused). With ``append_trigger_words`` the resolved LoRAs' trigger words are added to the
prompt. An input with ``action`` is a cache action (``store.actions``). The output: ``output.result``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from PIL import Image

from sdxl_worker.errors import JobError, LoraError
from sdxl_worker.generation.generate import first_unet, generate, step_errors
from sdxl_worker.generation.models import Pipelines, choose_models, load_pipelines, pick_device_and_dtype
from sdxl_worker.generation.progress import JobProgress
from sdxl_worker.generation.prompt_encoding import truncation_notes
from sdxl_worker.net.redact import scrub
from sdxl_worker.output.encode import encode_images, upload_enabled
from sdxl_worker.output.result import job_output
from sdxl_worker.request.aliases import unknown_name_errors
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.request.prompt_tags import with_trigger_words
from sdxl_worker.request.validation import JobParams, raise_if_any, validate_job_input
from sdxl_worker.settings import WorkerSettings
from sdxl_worker.sources.image_url import load_init_image
from sdxl_worker.store.actions import CacheActions, is_action
from sdxl_worker.store.cache import LoraCache, ResolvedLora
from sdxl_worker.store.disk_space import FreeBytes
from sdxl_worker.store.pinning import parse_sources
from sdxl_worker.weights.load import ParsedLora, load_lora
from sdxl_worker.weights.metadata import base_model_problem, job_trigger_words, metadata_of
from sdxl_worker.weights.patcher import LoraPatcher
from sdxl_worker.weights.ram_cache import LoraRamCache, ram_cache_key
from sdxl_worker.weights.session import LoadedLora, LoraSession

LOG = logging.getLogger(__name__)
T = TypeVar("T")


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
        # downloads (LoRAs, image_url, cache actions) never take the event loop's default pool, which the runpod SDK
        # and the short steps of every job need: one thread per job the worker takes at once
        self._fetch_threads = ThreadPoolExecutor(max_workers=settings.runtime.max_concurrency,
                                                 thread_name_prefix="fetch")

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

    async def _fetch(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on the download pool."""
        return await asyncio.get_running_loop().run_in_executor(self._fetch_threads, call, *args)

    async def _run(self, job_id: str, job: dict[str, Any]) -> dict[str, Any]:
        timer = PhaseTimer()
        progress = JobProgress(job, self.settings.runtime)
        if is_action(job.get("input")):
            return await self._fetch(self.actions.run, job["input"], progress.message)
        with timer.phase("validate"):
            params = validate_job_input(job.get("input"), self.lora_cache.settings.max_per_request, self.aliases)
            raise_if_any(unknown_name_errors(params.loras, self.lora_cache.name_exists))
            upload_enabled(self.settings.upload)
        init_image = None
        if params.image_url is not None:
            with timer.phase("load_image"):
                init_image = await self._fetch(load_init_image, params.image_url, self.lora_cache.settings)
        raise_if_any(step_errors(params, self.pipes.refiner is not None))  # after image_url's own errors
        session = None
        if params.loras:
            with timer.phase("lora_wait"), timer.phase("lora_fetch"):
                resolved = await self._fetch(self.lora_cache.resolve_all, params.loras, progress.message)
            if params.append_trigger_words:
                words = await asyncio.to_thread(job_trigger_words, resolved)
                params = dataclasses.replace(params, prompt=with_trigger_words(params.prompt, words))
            session = self._lora_session(resolved, init_image, timer)
            order = await session.start()
            LOG.info("job %s: LoRAs %s", job_id, order)
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        images = await asyncio.get_running_loop().run_in_executor(
            self._pipeline_thread, self._generate, params, seed, init_image, session, progress, timer)
        with timer.phase("encode"):
            encoded = await asyncio.to_thread(encode_images, images, job_id, self.settings.upload,
                                            params.image_format, params.image_quality)
        rewritten = params.prompt if params.prompt != job["input"]["prompt"] else None
        output = job_output(encoded, seed, timer.ms, rewritten, session.applied if session is not None else None,
                            self.lora_cache.settings.secrets)
        notes = truncation_notes(self.pipes.base, params.prompt, params.negative_prompt)
        if notes:
            output["warnings"] = notes
        for entry in output.get("loras", ()):
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

    def _lora_session(self, resolved: list[ResolvedLora], init_image: Image.Image | None,
                      timer: PhaseTimer) -> LoraSession:
        return LoraSession(resolved=resolved, cache=self.lora_cache, load=self.load_all, loader=self._loader_threads,
                           patcher=self.patcher, first_unet=first_unet(self.pipes, init_image),
                           overlap=self.overlap_loras, shown=self._shown, phase=timer.phase)

    def _generate(self, params: JobParams, seed: int, init_image: Image.Image | None, session: LoraSession | None,
                  progress: JobProgress, timer: PhaseTimer) -> list[Image.Image]:
        """On the pipeline thread: the images, generated with the job's LoRAs applied when it has any."""
        def run_pipeline() -> list[Image.Image]:
            with timer.phase("generate"):
                return generate(self.pipes, params, seed, init_image, progress.denoising_step)

        return session.run(run_pipeline) if session is not None else run_pipeline()
