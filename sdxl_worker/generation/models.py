"""Which SDXL weights the worker serves, and loading them once per process.

Selection (logged at start):
- ``SDXL_MODEL=tiny``: the embedded tiny SDXL, written from its fixed seed if missing; never touches the network.
- ``SDXL_MODEL=<repo id or local diffusers folder>``: that model; ``SDXL_VAE`` optionally replaces its VAE and
  ``REFINER_MODEL`` adds a refiner (empty disables it).
- unset: the models baked into the Docker image by ``download_weights.py`` when its manifest
  (``BAKED_MODELS_MANIFEST``, default ``/models/baked-models.json``) exists, loaded offline; else the embedded one.
``SDXL_DTYPE`` (auto|float16|bfloat16|float32) overrides the dtype; auto is float16 on CUDA, float32 on CPU.
The variables are read by ``sdxl_worker.settings`` (``ModelSettings``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdxl_worker.generation.tiny_model import ensure_tiny_model
from sdxl_worker.settings import ModelSettings

LOG = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelChoice:
    """The weights to load: where they come from and whether the network may be used."""

    base: str
    refiner: str | None
    vae: str | None
    origin: str  # "env", "baked" or "embedded"
    offline: bool
    variant: str | None = None


@dataclass
class Pipelines:
    """The loaded pipelines. ``img2img`` shares the base's modules; ``refiner`` is None when disabled."""

    base: Any
    img2img: Any
    refiner: Any | None
    device: torch.device
    dtype: torch.dtype
    scheduler_config: dict[str, Any]
    refiner_scheduler_config: dict[str, Any] | None
    choice: ModelChoice


def _embedded_choice() -> ModelChoice:
    return ModelChoice(base=str(ensure_tiny_model()), refiner=None, vae=None, origin="embedded", offline=True)


def choose_models(settings: ModelSettings) -> ModelChoice:
    """Decide which models to serve (see the module docstring)."""
    requested = settings.sdxl_model
    if requested == TINY_MODEL_NAME:
        return _embedded_choice()
    if requested:
        return ModelChoice(base=requested, refiner=settings.refiner_model or None, vae=settings.vae, origin="env",
                           offline=Path(requested).is_dir())
    if settings.baked_manifest.is_file():
        baked = json.loads(settings.baked_manifest.read_text())
        refiner = baked.get("refiner") if settings.refiner_model is None else settings.refiner_model
        return ModelChoice(base=baked["base"], refiner=refiner or None, vae=baked.get("vae"), origin="baked",
                           offline=True, variant=baked.get("variant"))
    return _embedded_choice()


def pick_device_and_dtype(dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA with float16 when available, else CPU with float32; ``dtype`` (``SDXL_DTYPE``) overrides the dtype."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[dtype]


def load_pipelines(choice: ModelChoice, device: torch.device, dtype: torch.dtype) -> Pipelines:
    """Load the base pipeline (and refiner) with ``from_pretrained`` and move them to ``device``."""
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    LOG.info("Loading SDXL (%s): base=%s refiner=%s vae=%s on %s/%s", choice.origin, choice.base,
             choice.refiner, choice.vae, device, dtype)
    common: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": choice.offline, "use_safetensors": True}
    if choice.variant:
        common["variant"] = choice.variant
    extra: dict[str, Any] = {}
    if choice.vae:
        extra["vae"] = AutoencoderKL.from_pretrained(choice.vae, torch_dtype=dtype, local_files_only=choice.offline)
    base = StableDiffusionXLPipeline.from_pretrained(choice.base, add_watermarker=False, **common, **extra).to(device)
    refiner = None
    if choice.refiner:
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            choice.refiner, vae=base.vae, text_encoder_2=base.text_encoder_2, add_watermarker=False, **common
        ).to(device)
    img2img = StableDiffusionXLImg2ImgPipeline(**base.components)
    for pipe in (base, img2img, refiner):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    return Pipelines(
        base=base,
        img2img=img2img,
        refiner=refiner,
        device=device,
        dtype=dtype,
        scheduler_config=dict(base.scheduler.config),
        refiner_scheduler_config=dict(refiner.scheduler.config) if refiner is not None else None,
        choice=choice,
    )
