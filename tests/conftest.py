"""Shared fixtures: the embedded tiny SDXL, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_worker.generation.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny SDXL folder (diffusers format), generated from its fixed seed if missing."""
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    """A float32 CPU StableDiffusionXLPipeline loaded from the tiny model through from_pretrained."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def worker_cache_dir(tmp_path_factory) -> Path:
    """The LoRA cache folder of the in-process worker."""
    return tmp_path_factory.mktemp("worker-lora-cache")


@pytest.fixture(scope="session")
def worker_handler(tiny_model_dir, worker_cache_dir):
    """``handler.handler`` served by one in-process worker on the tiny model, LoRA cache in a temp folder."""
    import os

    os.environ.update(SDXL_MODEL="tiny", LORA_CACHE_DIR=str(worker_cache_dir), LORA_ALLOW_PRIVATE_HOSTS="1")
    for name in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "RUNPOD_WEBHOOK_POST_OUTPUT"):
        os.environ.pop(name, None)
    import handler

    handler.get_worker()
    return handler.handler


@pytest.fixture(scope="session")
def make_handler(worker_handler):
    """``make_handler(cache_settings)``: the ``run`` of a new in-process worker (``support.factories.make_worker``) on
    the session worker's pipelines, to hand to ``run_through_sdk``."""
    from tests.support.factories import make_worker

    return lambda settings: make_worker(settings).run


@pytest.fixture(scope="session")
def pipes(worker_handler):
    """The pipelines of the session's in-process worker (loaded once)."""
    import handler

    return handler.get_worker().pipes


@pytest.fixture(scope="session")
def lora_blobs(worker_handler) -> dict[str, bytes]:
    """Kohya LoRA files for the tiny SDXL, as bytes: ``style`` (UNet and both text encoders, rank 4, 0.3 MB),
    ``small`` (UNet, rank 1, 60 kB) and ``big`` (UNet, rank 64, 3.2 MB)."""
    from safetensors.torch import save

    from handler import get_worker
    from tests.support.lora_forms import canonical_factors, kohya_state

    pipe = get_worker().pipes.base
    shapes = {"style": (("unet", "text_encoder", "text_encoder_2"), 4, 31), "small": (("unet",), 1, 33),
              "big": (("unet",), 64, 32)}
    return {name: save(kohya_state(canonical_factors(pipe, components, rank=rank, seed=seed)))
            for name, (components, rank, seed) in shapes.items()}
