"""One job's LoRAs, from resolved files to restored weights: load them on a loader thread, apply them, run the
pipeline, restore the weights.

The order is chosen before the pipeline call (``LoraSession.start``), from what is known by then:

- overlapped, when the LoRAs can wait for the pipeline's first UNet call (``LORA_OVERLAP`` on, and the UNet that
  denoises first is the one they patch: not so for img2img through the refiner) and no LoRA at a non-zero scale
  may patch a text encoder (the file's tensor names say so, from its header: ``metadata.may_patch_text_encoders``).
  The load (reading, parsing, conversion, the copy to the device) runs on a loader thread while the pipeline encodes
  the prompt and prepares timesteps, latents and time ids; the LoRAs are fused right before the UNet's first call
  (``first_call.before_first_call``). Nothing computed before that call depends on a UNet-only LoRA, so the images
  are the in-order path's bytes.
- in order otherwise: the load is awaited before the pipeline is taken, the LoRAs are fused, then the pipeline runs.

The weights are restored when the pipeline call ends, also when it fails. Timings: ``lora_load`` (on the loader
thread), ``lora_wait`` (waiting for the load), ``lora_apply`` and ``lora_restore``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from sdxl_worker.generation.first_call import before_first_call
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.store.cache import LoraCache, ResolvedLora
from sdxl_worker.weights.load import ParsedLora
from sdxl_worker.weights.metadata import may_patch_text_encoders
from sdxl_worker.weights.patcher import ApplyReport, LoraPatcher, ScaledLora

Phase = Callable[[str], AbstractContextManager[None]]
Result = TypeVar("Result")


@dataclass(frozen=True)
class LoadedLora:
    """A resolved LoRA parsed (or found in the RAM cache) and ready to apply."""

    resolved: ResolvedLora
    parsed: ParsedLora
    ram_hit: bool
    load_ms: float


@dataclass(eq=False, repr=False, kw_only=True)
class LoraSession:
    """The LoRAs of one job: ``start`` (on the event loop) chooses the order and starts the load, ``run`` (on the
    pipeline thread) calls the pipeline with them applied, ``applied`` then lists each with its apply report.

    ``load`` parses the ``resolved`` LoRAs (``Worker.load_all``) on the ``loader`` executor while ``cache`` keeps
    their entries from eviction; ``first_unet``: the UNet that denoises first in this job; ``overlap``: whether the
    load may overlap the pipeline (``LORA_OVERLAP``); ``shown(request)`` names a LoRA in messages; ``phase(name)``
    times a phase of the job.
    """

    resolved: list[ResolvedLora]
    cache: LoraCache
    load: Callable[[list[ResolvedLora]], list[LoadedLora]]
    loader: Executor
    patcher: LoraPatcher
    first_unet: torch.nn.Module
    overlap: bool
    shown: Callable[[LoraRequest], str]
    phase: Phase
    _overlapped: bool = field(default=False, init=False)
    _pending: Future[list[LoadedLora]] | None = field(default=None, init=False)
    _loaded: list[LoadedLora] = field(default_factory=list, init=False)
    _reports: list[ApplyReport] = field(default_factory=list, init=False)

    async def start(self) -> str:
        """Choose the order and start the load; in order, wait for it here, so the pipeline is taken only once the
        LoRAs are ready. Returns the order chosen and why, for the log."""
        self._overlapped, order = self._choose_order()
        self._pending = self.loader.submit(self._load)
        if not self._overlapped:
            with self.phase("lora_wait"):
                self._loaded = await asyncio.wrap_future(self._pending)
        return order

    def run(self, pipeline: Callable[[], Result]) -> Result:
        """On the pipeline thread: ``pipeline()`` with the LoRAs applied (right before the first UNet call when
        overlapped), then the original weights restored, also when it fails."""
        try:
            if not self._overlapped:
                self._apply()
                return pipeline()
            with before_first_call(self.first_unet, self._wait_and_apply):
                result = pipeline()
            if self._pending is not None and not self._reports:
                self._wait_and_apply()  # the first UNet ran no step: still surface load errors and report the LoRAs
            return result
        finally:
            with self.phase("lora_restore"):
                self.patcher.restore()

    @property
    def applied(self) -> list[tuple[LoadedLora, ApplyReport]]:
        """Each LoRA, in job order, with what applying it did (after ``run``)."""
        return list(zip(self._loaded, self._reports))

    def _choose_order(self) -> tuple[bool, str]:
        if not self.overlap:
            return False, "in order: LORA_OVERLAP is off"
        if self.first_unet is not self.patcher.components.get("unet"):
            return False, "in order: the UNet that denoises first (the refiner's) carries no LoRA"
        text_encoder_lora = next((item.request for item in self.resolved
                                  if item.request.te_scale != 0 and may_patch_text_encoders(item.path)), None)
        if text_encoder_lora is not None:
            return False, (f"in order: {self.shown(text_encoder_lora)} may patch a text encoder, so the LoRAs are "
                           "applied before the prompt is encoded (rather than encoding the prompt again after them)")
        return True, "overlapped: loading while the prompt is encoded, applied at the UNet's first call"

    def _load(self) -> list[LoadedLora]:
        """On the loader thread."""
        with self.cache.in_use(self.resolved), self.phase("lora_load"):
            return self.load(self.resolved)

    def _wait_and_apply(self) -> None:
        """At the UNet's first call, on the pipeline thread."""
        with self.phase("lora_wait"):
            self._loaded = self._pending.result()
        self._apply()

    def _apply(self) -> None:
        loras = [ScaledLora(item.parsed, item.resolved.request.scale, self.shown(item.resolved.request),
                            te_scale=item.resolved.request.te_scale) for item in self._loaded]
        with self.phase("lora_apply"):
            self._reports = self.patcher.apply(loras)
