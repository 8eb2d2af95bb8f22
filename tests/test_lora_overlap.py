"""LoRA loading overlapped with generation (``LORA_OVERLAP``): the sequential path's bytes, real overlap, clean failures.

Two workers share the in-process tiny pipelines: one overlaps (the default), one applies every LoRA before the
pipeline call. Each test gives them their own cache folders and RAM caches, so every tier (download, disk, RAM)
is exercised on both paths.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdxl_worker.worker import Worker
from tests.support.factories import cache_settings, make_worker
from tests.support.lora_forms import canonical_factors, write_kohya, write_sd15_shaped
from tests.support.servers.fault_http import FaultServer
from tests.support.weights import assert_bit_identical, snapshot
from tests.support.worker_env import small_job

ALL = ("unet", "text_encoder", "text_encoder_2")
REENCODE_LOG = "encoding the prompt again"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("overlap-loras")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    not_a_lora = folder / "not-a-lora.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}, str(not_a_lora))
    return {
        "unet": write_kohya(folder / "unet.safetensors", canonical_factors(pipe, ("unet",), rank=8, seed=31)),
        "unet2": write_kohya(folder / "unet2.safetensors", canonical_factors(pipe, ("unet",), rank=4, seed=32)),
        "all": write_kohya(folder / "all.safetensors", canonical_factors(pipe, ALL, rank=4, seed=33)),
        "sd15": write_sd15_shaped(folder / "sd15.safetensors"),
        "not-a-lora": not_a_lora,
    }


@pytest.fixture(scope="module")
def server(lora_files):
    with FaultServer() as running:
        for name, path in lora_files.items():
            running.route(f"/{name}.safetensors", body=path.read_bytes())
        yield running


def overlap_worker(cache_dir: Path, overlap: bool, lora_files: dict[str, Path]) -> Worker:
    """A worker on the shared tiny pipelines with its own caches; ``lora_files`` placed in its cache by name."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path in lora_files.values():
        shutil.copy(path, cache_dir / path.name)
    return make_worker(cache_settings(cache_dir), ram_cache_bytes=1024**3, overlap=overlap)


def run(worker: Worker, **job) -> dict:
    return asyncio.run(worker.run({"id": "overlap-test", "input": small_job(**job)}))


def images(output: dict) -> list[str]:
    assert "error" not in output, output.get("error")
    return output["images"]


LORA_SETS = {
    "one UNet LoRA by cache name": lambda url: ["unet.safetensors"],
    "two UNet LoRAs, scales 0.7 and -0.5": lambda url: [{"path": "unet.safetensors", "scale": 0.7},
                                                       {"path": "unet2.safetensors", "scale": -0.5}],
    "a UNet LoRA downloaded by URL": lambda url: [{"path": url("/unet.safetensors"), "scale": 1.2}],
    "a LoRA on the UNet and both text encoders": lambda url: [{"path": "all.safetensors", "scale": 0.9}],
    "a text-encoder LoRA at scale 0 beside a UNet LoRA": lambda url: [{"path": "all.safetensors", "scale": 0},
                                                                      "unet2.safetensors"],
}


@pytest.mark.parametrize("case", LORA_SETS)
def test_overlapped_jobs_give_the_sequential_bytes_on_every_cache_tier(worker_handler, server, lora_files,
                                                                       tmp_path, caplog, case):
    loras = LORA_SETS[case](server.url)
    sequential = overlap_worker(tmp_path / "sequential", overlap=False, lora_files=lora_files)
    overlapped = overlap_worker(tmp_path / "overlapped", overlap=True, lora_files=lora_files)
    reference = images(run(sequential, seed=51, num_images=2, loras=loras))
    caplog.set_level(logging.INFO, logger="sdxl_worker.worker")
    outputs = [run(overlapped, seed=51, num_images=2, loras=loras) for _ in range(3)]  # miss, RAM hit, same set
    for output in outputs:
        assert images(output) == reference
        assert "lora_wait" in output["timings"] and "lora_apply" in output["timings"]
    assert [output["loras"][0]["ram_cache_hit"] for output in outputs] == [False, True, True]
    patches_text_encoders = case == "a LoRA on the UNet and both text encoders"
    assert (REENCODE_LOG in caplog.text) == patches_text_encoders


@contextmanager
def loads_only_after_encoding(worker: Worker, wait_s: float) -> Iterator[None]:
    """Within the block, ``worker``'s LoRA loader waits until the second text encoder has run, then loads."""
    encoded = threading.Event()
    load_all = worker.load_all

    def load_after_encoding(resolved):
        if not encoded.wait(wait_s):
            raise TimeoutError("the prompt was not encoded while the LoRAs loaded")
        return load_all(resolved)

    worker.load_all = load_after_encoding
    hook = worker.pipes.base.text_encoder_2.register_forward_hook(lambda *_: encoded.set())
    try:
        yield
    finally:
        hook.remove()
        del worker.load_all


def test_the_prompt_is_encoded_while_the_loras_load(worker_handler, lora_files, tmp_path):
    """Only an overlapping worker can finish a job whose LoRA loader waits for the prompt encoding."""
    overlapped = overlap_worker(tmp_path / "overlapped", overlap=True, lora_files=lora_files)
    with loads_only_after_encoding(overlapped, wait_s=60):
        output = run(overlapped, seed=52, loras=["unet.safetensors"])
    assert "error" not in output, output.get("error")

    sequential = overlap_worker(tmp_path / "sequential", overlap=False, lora_files=lora_files)
    with loads_only_after_encoding(sequential, wait_s=2):
        output = run(sequential, seed=52, loras=["unet.safetensors"])
    assert "the prompt was not encoded while the LoRAs loaded" in output["error"]


@pytest.mark.parametrize("loras, fragment", [
    (["not-a-lora.safetensors"], "loras[0] (not-a-lora.safetensors): not-a-lora.safetensors holds no LoRA weights"),
    (["unet.safetensors", {"path": "sd15.safetensors", "name": "old"}], "loras[1] (old): only 0/3 LoRA modules match"),
    (["all.safetensors", "sd15.safetensors"], "loras[1] (sd15.safetensors): only 0/3 LoRA modules match"),
])
def test_a_lora_failing_midway_errors_cleanly_and_restores_the_pipeline(worker_handler, lora_files, tmp_path,
                                                                         loras, fragment):
    overlapped = overlap_worker(tmp_path / "overlapped", overlap=True, lora_files=lora_files)
    pipe = overlapped.pipes.base
    weights = snapshot(pipe)
    baseline = images(run(overlapped, seed=53))
    with_lora = images(run(overlapped, seed=53, loras=["unet.safetensors"]))
    output = run(overlapped, seed=53, loras=loras)
    assert fragment in output["error"], output["error"]
    assert_bit_identical(pipe, weights)
    assert images(run(overlapped, seed=53)) == baseline
    assert images(run(overlapped, seed=53, loras=["unet.safetensors"])) == with_lora


def test_overlapped_and_sequential_applies_alternate_on_one_worker(worker_handler, lora_files, tmp_path):
    """The overlapped path fuses inside the pipeline call (inference mode), the text-encoder fallback outside it; the
    fused tensors one job leaves are written by the next, whichever path each takes."""
    jobs = [["unet.safetensors"], ["all.safetensors"], [{"path": "unet2.safetensors", "scale": -0.6}],
            [{"path": "all.safetensors", "scale": 0.4}], ["unet.safetensors", "unet2.safetensors"]]
    sequential = overlap_worker(tmp_path / "sequential", overlap=False, lora_files=lora_files)
    expected = [images(run(sequential, seed=54, loras=loras)) for loras in jobs]
    overlapped = overlap_worker(tmp_path / "overlapped", overlap=True, lora_files=lora_files)
    assert [images(run(overlapped, seed=54, loras=loras)) for loras in jobs + jobs] == expected + expected
