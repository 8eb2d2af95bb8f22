"""Shared fixtures: the embedded tiny SDXL, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_worker.tiny_model import ensure_tiny_model


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
