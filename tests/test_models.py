"""Model selection (embedded, baked, configured) and loading through from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

from sdxl_worker.generation.models import choose_models, load_pipelines, pick_device_and_dtype
from sdxl_worker.generation.tiny_model import ensure_tiny_model
from sdxl_worker.settings import ModelSettings

models = ModelSettings.from_env


def test_tiny_selects_the_embedded_model_offline(tiny_model_dir):
    choice = choose_models(models({"SDXL_MODEL": "tiny"}))
    assert choice.origin == "embedded" and choice.offline and choice.refiner is None
    assert choice.base == str(tiny_model_dir)


def test_unset_without_baked_manifest_falls_back_to_the_embedded_model(tmp_path, tiny_model_dir):
    choice = choose_models(models({"BAKED_MODELS_MANIFEST": str(tmp_path / "missing.json")}))
    assert choice.origin == "embedded"


def test_unset_with_baked_manifest_uses_the_baked_models_offline(tmp_path, tiny_model_dir):
    manifest = tmp_path / "baked-models.json"
    manifest.write_text(json.dumps({"base": str(tiny_model_dir), "refiner": None, "vae": None, "variant": None}))
    choice = choose_models(models({"BAKED_MODELS_MANIFEST": str(manifest)}))
    assert choice.origin == "baked" and choice.offline and choice.base == str(tiny_model_dir)
    pipes = load_pipelines(choice, torch.device("cpu"), torch.float32)
    assert pipes.refiner is None and pipes.base.unet.config.block_out_channels == [32, 64]


def test_configured_hub_model_and_refiner(tmp_path):
    choice = choose_models(models({"SDXL_MODEL": "stabilityai/stable-diffusion-xl-base-1.0", "REFINER_MODEL": "",
                            "SDXL_VAE": "madebyollin/sdxl-vae-fp16-fix"}))
    assert choice.origin == "env" and not choice.offline and choice.refiner is None
    assert choice.vae == "madebyollin/sdxl-vae-fp16-fix"


def test_configured_local_folder_is_loaded_offline(tiny_model_dir):
    choice = choose_models(models({"SDXL_MODEL": str(tiny_model_dir)}))
    assert choice.origin == "env" and choice.offline


def test_embedded_model_is_deterministic_and_rewritten_only_when_stale(tmp_path):
    first = ensure_tiny_model(tmp_path / "a")
    second = ensure_tiny_model(tmp_path / "b")
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    mtime = (first / weights).stat().st_mtime_ns
    ensure_tiny_model(first)
    assert (first / weights).stat().st_mtime_ns == mtime


def test_dtype_choice():
    device, dtype = pick_device_and_dtype(models({"SDXL_DTYPE": "auto"}).dtype)
    assert dtype == (torch.float16 if device.type == "cuda" else torch.float32)
    assert pick_device_and_dtype(models({"SDXL_DTYPE": "BFloat16"}).dtype)[1] == torch.bfloat16
    with pytest.raises(ValueError, match="SDXL_DTYPE"):
        models({"SDXL_DTYPE": "int8"})
