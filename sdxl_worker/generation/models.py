"""Which SDXL weights the worker serves, and loading them once per process.

Selection (logged at start):
- ``SDXL_MODEL=tiny``: the embedded tiny SDXL, written from its fixed seed if missing; never touches the network.
- ``SDXL_MODEL=<repo id or local diffusers folder>``: that model; ``SDXL_VAE`` optionally replaces its VAE and
  ``REFINER_MODEL`` adds a refiner (empty disables it).
- unset: the models baked into the Docker image by ``download_weights.py`` when its manifest
  (``BAKED_MODELS_MANIFEST``, default ``/models/baked-models.json``) exists, loaded offline; else the embedded one.
``SDXL_DTYPE`` (auto|float16|bfloat16|float32) overrides the dtype; auto is float16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdxl_worker.generation.tiny_model import ensure_tiny_model

LOG = logging.getLogger(__name__)

DEFAULT_BAKED_MANIFEST = Path("/models/baked-models.json")
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


def choose_models(env: dict[str, str] | None = None) -> ModelChoice:
    """Decide which models to serve from the environment (see the module docstring)."""
    env = dict(os.environ) if env is None else env
    requested = env.get("SDXL_MODEL", "").strip()
    if requested == TINY_MODEL_NAME:
        return _embedded_choice()
    if requested:
        return ModelChoice(
            base=requested,
            refiner=env.get("REFINER_MODEL", "").strip() or None,
            vae=env.get("SDXL_VAE", "").strip() or None,
            origin="env",
            offline=Path(requested).is_dir(),
        )
    manifest_path = Path(env.get("BAKED_MODELS_MANIFEST", str(DEFAULT_BAKED_MANIFEST)))
    if manifest_path.is_file():
        baked = json.loads(manifest_path.read_text())
        refiner = env.get("REFINER_MODEL", baked.get("refiner") or "").strip() or None
        return ModelChoice(
            base=baked["base"],
            refiner=refiner,
            vae=baked.get("vae"),
            origin="baked",
            offline=True,
            variant=baked.get("variant"),
        )
    return _embedded_choice()


def pick_device_and_dtype(env: dict[str, str] | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA with float16 when available, else CPU with float32; ``SDXL_DTYPE`` overrides the dtype."""
    env = dict(os.environ) if env is None else env
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    requested = env.get("SDXL_DTYPE", "auto").strip().lower()
    if requested == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    if requested not in _DTYPES:
        raise ValueError(f"SDXL_DTYPE must be auto, float16, bfloat16 or float32, got {requested!r}")
    return device, _DTYPES[requested]


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
