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
