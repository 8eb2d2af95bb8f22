"""Workers killed with SIGKILL, as RunPod does when it scales down or a machine dies: once during a LoRA download,
once during generation with the LoRA applied. Both are worker subprocesses (``tests.support.servers.job_runner``, the SDK's
``run_job`` on ``handler.handler``) on one cache folder, loaded together and released one after the other; a new
worker on that folder then serves the LoRA and a plain job with their reference bytes, the dead workers' lock,
leftover and lease block nothing, and no partial entry is ever visible under a final name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.store.cache import LoraCache
from tests.support.cache_audit import cache_problems, entry_keys
from tests.support.factories import FAULT_TIMINGS, cache_settings
from tests.support.servers.fault_http import FaultServer
from tests.support.servers.progress_sink import ProgressSink
from tests.support.worker_env import PROJECT_ROOT, PYTHON, images_of, run_through_sdk, small_job, subprocess_env

TOKENS = {"HF_TOKEN": "hf_KILLTEST_3c9d", "CIVITAI_TOKEN": "civitai-KILLTEST-77aa"}
LONG_STEPS = 120  # killed at the first step seen; the length is only a margin for a slow machine


def start_worker(job_input: dict, cache: Path, folder: Path, **env: str) -> subprocess.Popen:
    """A worker subprocess that loads the tiny model, then waits for ``folder/go`` before serving ``job_input``."""
    folder.mkdir()
    (folder / "jobs.json").write_text(json.dumps([job_input]))
    with (folder / "worker.log").open("w") as log:
        return subprocess.Popen([PYTHON, "-m", "tests.support.servers.job_runner", str(folder / "jobs.json"),
                                 str(folder / "out.json"), "--go", str(folder / "go")], cwd=PROJECT_ROOT,
                                env=subprocess_env(cache, **TOKENS, **env), stdout=log, stderr=subprocess.STDOUT)


def release(process: subprocess.Popen, folder: Path, timeout_s: float = 180) -> None:
    """Wait until the worker has loaded, then let it start its job."""
    deadline = time.monotonic() + timeout_s
    while not (folder / "out.json.ready").exists():
        assert process.poll() is None, (folder / "worker.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the worker did not load in time"
        time.sleep(0.02)
    (folder / "go").touch()


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], folder: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    log = folder / "worker.log"
    while not ready():
        assert process.poll() is None, f"the worker ended before the kill:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not ready to kill after {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL


def denoising_steps(sink: ProgressSink) -> list[int]:
    return [update["step"] for update in sink.updates() if update.get("phase") == "denoising"]


@pytest.fixture
def spawned():
    """Worker subprocesses of the test, killed at teardown if a failed assertion left them waiting."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.fixture
def server(lora_blobs):
    with FaultServer() as running:
        running.route("/style.safetensors", body=lora_blobs["style"], chunk_size=16_384)
        running.route("/small.safetensors", body=lora_blobs["small"])
        yield running


def test_workers_killed_mid_download_and_mid_generation_leave_a_cache_the_next_worker_serves(
        tmp_path, tiny_model_dir, make_handler, server, lora_blobs, spawned):
    root, url = tmp_path / "cache", server.url("/style.safetensors")
    key = LoraRequest(0, url).cache_key
    short = small_job(seed=81, num_inference_steps=1, loras=[url])
    with ProgressSink() as sink:
        downloading = start_worker(short, root, tmp_path / "download")
        generating = start_worker(small_job(seed=82, num_inference_steps=LONG_STEPS, loras=[url]), root,
                                  tmp_path / "generate", RUNPOD_WEBHOOK_POST_OUTPUT=sink.url, PROGRESS_INTERVAL_S="0")
        spawned += [downloading, generating]
        reference = make_handler(cache_settings(tmp_path / "reference-cache", **FAULT_TIMINGS))
        expected = {"lora": images_of(run_through_sdk(reference, short)),
                    "plain": images_of(run_through_sdk(reference, small_job(seed=81, num_inference_steps=1)))}
        sent_before = server.sent["/style.safetensors"]
        server.routes["/style.safetensors"].chunk_delay_s = 0.2  # 3.6 s for the whole file: time to kill midway

        release(downloading, tmp_path / "download")
        kill_when(downloading, lambda: server.sent["/style.safetensors"] - sent_before >= 50_000, tmp_path / "download")
        assert server.sent["/style.safetensors"] - sent_before < len(lora_blobs["style"])
        assert entry_keys(root) == [] and (root / ".locks" / f"{key}.lock").exists()
        assert [child.name for child in root.iterdir() if child.name.startswith(".tmp-")]

        server.routes["/style.safetensors"].chunk_delay_s = 0.0
        release(generating, tmp_path / "generate")
        kill_when(generating, lambda: bool(denoising_steps(sink)), tmp_path / "generate")
    assert max(denoising_steps(sink)) < LONG_STEPS
    assert "broke a stale lock" in (tmp_path / "generate" / "worker.log").read_text()
    # A job leases its entries only while it loads them (generation never reads the file): none is left behind.
    assert entry_keys(root) == [key] and not list((root / ".leases" / key).glob("*.lease"))
    leftovers = [child.name for child in root.iterdir() if child.name.startswith(".tmp-")]
    assert cache_problems(root, allow_dead_holders=True) == [f"leftover {name}" for name in leftovers]

    restarted = make_handler(cache_settings(root, **FAULT_TIMINGS))
    assert cache_problems(root, allow_dead_holders=True) == []  # the new worker removed the dead one's leftover
    served = run_through_sdk(restarted, short)
    assert images_of(served) == expected["lora"] and served["output"]["loras"][0]["cache_hit"] is True
    assert images_of(run_through_sdk(restarted, small_job(seed=81, num_inference_steps=1))) == expected["plain"]
    assert server.count("/style.safetensors") == 3  # reference, killed download, the download before generation

    evicting = LoraCache(cache_settings(root, **FAULT_TIMINGS, cache_max_bytes=1, evict_grace_s=0))
    evicting.resolve(LoraRequest(0, server.url("/small.safetensors")))
    assert key not in entry_keys(root), "a dead worker's lease kept the entry from eviction"
    assert cache_problems(root) == []
    for name in ("download", "generate"):
        text = (tmp_path / name / "worker.log").read_text()
        assert not any(token in text for token in TOKENS.values())
