"""Helpers for tests that run the real worker on the embedded tiny SDXL."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from PIL import Image
from runpod.serverless.modules.rp_job import run_job

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_URI_PREFIX = "data:image/png;base64,"
SMALL_JOB: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "blurry",
    "height": 64,
    "width": 64,
    "num_inference_steps": 3,
    "scheduler": "K_EULER",
    "seed": 7,
}


def small_job(**overrides: Any) -> dict[str, Any]:
    """A fast job input for the tiny model, with ``overrides`` applied."""
    return {**SMALL_JOB, **overrides}


def run_through_sdk(handler, job_input: Any, job_id: str = "test-job") -> dict[str, Any]:
    """Run one job through the runpod SDK's own ``run_job``, as the serverless loop and --test_input do."""
    return asyncio.run(run_job(handler, {"id": job_id, "input": job_input}))


def images_of(result: dict[str, Any]) -> list[str]:
    """The images of a successful ``run_through_sdk`` result (failing with the job's error otherwise)."""
    assert "error" not in result, result["error"]
    return result["output"]["images"]


def png_from_data_uri(uri: str) -> bytes:
    assert uri.startswith(DATA_URI_PREFIX), uri[:40]
    return base64.b64decode(uri[len(DATA_URI_PREFIX):])


def image_from_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess on the tiny model with its LoRA cache in ``cache_dir``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RUNPOD_", "BUCKET_"))}
    env.update(SDXL_MODEL="tiny", LORA_CACHE_DIR=str(cache_dir), LORA_ALLOW_PRIVATE_HOSTS="1",
               PYTHONPATH=str(PROJECT_ROOT), **extra)
    return env


PYTHON = sys.executable


@contextmanager
def local_api(folder: Path, env: dict[str, str],
              start_timeout_s: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python handler.py --rp_serve_api`` (the runpod SDK's local FastAPI server) on a free port, its log in
    ``folder/server.log``; yields the base URL and the process once ``/openapi.json`` answers, and stops it after."""
    port = free_port()
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen(
            [PYTHON, str(PROJECT_ROOT / "handler.py"), "--rp_serve_api", "--rp_api_host", "127.0.0.1",
             "--rp_api_port", str(port)], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                requests.get(base + "/openapi.json", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the local API server did not start"
                time.sleep(0.5)
        yield base, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


def output_of(worker, job_input: dict[str, Any]) -> dict[str, Any]:
    """Run one job through the runpod SDK's ``run_job``; the output, failing on an error."""
    result = run_through_sdk(worker.run, job_input)
    assert "error" not in result, result["error"]
    return result["output"]


def error_of(worker, job_input: dict[str, Any]) -> str:
    """Run one job through the SDK; its error message, failing when it succeeds."""
    result = run_through_sdk(worker.run, job_input)
    assert "error" in result and "output" not in result, result
    return result["error"]
