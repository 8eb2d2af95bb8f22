"""One job through each path, timed: ours (the worker's ``run``) and the plain diffusers reference.

The reference is what a LoRA worker usually does per job: download the file when it is not on disk, then
``load_lora_weights``, ``fuse_lora``, generate, ``unfuse_lora``, ``unload_lora_weights``, and encode the PNG.
Both paths generate with the same prompt, seed, size, steps and scheduler on the same pipeline object.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import torch

from sdxl_worker.generation.schedulers import make_scheduler, resolve
from sdxl_worker.output.encode import png_bytes
from sdxl_worker.worker import Worker

SCHEDULER = "K_EULER"
PROMPT = "a lighthouse on a cliff at sunset, oil painting"


@dataclass(frozen=True)
class JobShape:
    """What every benchmarked job generates."""

    height: int
    width: int
    steps: int
    seed: int = 1234

    def job_input(self, loras: list | None = None) -> dict:
        job = {"prompt": PROMPT, "height": self.height, "width": self.width, "num_inference_steps": self.steps,
               "scheduler": SCHEDULER, "seed": self.seed, "guidance_scale": 7.5}
        if loras:
            job["loras"] = loras
        return job


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, action) -> tuple[float, object]:
    """Milliseconds ``action()`` takes (device work included), and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = action()
    synchronize(device)
    return (time.perf_counter() - start) * 1000, result


def our_job(worker: Worker, shape: JobShape, loras: list | None = None) -> dict:
    """One job through the worker's full path (validate, resolve, load, apply, generate, restore, encode)."""
    output = asyncio.run(worker.run({"id": "bench", "input": shape.job_input(loras)}))
    if "error" in output:
        raise RuntimeError(output["error"])
    return output


def plain_generate(pipe, shape: JobShape, device: torch.device):
    """The pipeline call a worker without LoRA support makes."""
    pipe.scheduler = make_scheduler(resolve(SCHEDULER)[0], pipe.scheduler.config)
    return pipe(prompt=PROMPT, height=shape.height, width=shape.width, num_inference_steps=shape.steps,
                guidance_scale=7.5, generator=torch.Generator(device=device).manual_seed(shape.seed)).images


def plain_job(pipe, shape: JobShape, device: torch.device) -> str:
    """A worker without LoRA support: generate, then encode the PNG as a data URI."""
    image = plain_generate(pipe, shape, device)[0]
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def plain_download(url: str, target: Path, fsync: bool = False, sha256: bool = False) -> int:
    """A plain streaming copy with requests (1 MiB chunks), the baseline for download throughput; optionally each
    chunk is also hashed inline (``sha256``) and the file fsynced."""
    size = 0
    digest = hashlib.sha256()
    with requests.get(url, stream=True, timeout=60) as response, open(target, "wb") as out:
        response.raise_for_status()
        for chunk in response.iter_content(1024 * 1024):
            out.write(chunk)
            if sha256:
                digest.update(chunk)
            size += len(chunk)
        if fsync:
            out.flush()
            os.fsync(out.fileno())
    return size


def reference_job(pipe, shape: JobShape, device: torch.device, lora_file: Path, scale: float,
                  url: str | None = None) -> float:
    """The straightforward diffusers path for one job with one LoRA; returns the ms spent on the LoRA itself.

    Download (when ``url`` is given), ``load_lora_weights`` and ``fuse_lora`` before generation, ``unfuse_lora``
    and ``unload_lora_weights`` after it, each timed with the device synchronized.
    """
    def attach() -> None:
        if url is not None:
            plain_download(url, lora_file)
        pipe.load_lora_weights(str(lora_file), adapter_name="job")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["job"])

    def detach() -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    before_ms, _ = timed(device, attach)
    try:
        plain_job(pipe, shape, device)
    finally:
        after_ms, _ = timed(device, detach)
    return before_ms + after_ms
