"""Network faults and corrupted cache entries, driven through the real worker (the SDK's ``run_job``): each job either
succeeds after retries with the undisturbed image or ends with an error naming the LoRA and the cause; the cache
never holds a partial or unverified entry; the next LoRA job and the next plain job return their reference bytes.

The faults come from ``tests.support.servers.fault_http.FaultServer`` on 127.0.0.1: connection reset midway, body shorter
than ``Content-Length``, a stalled server, 429 with ``Retry-After``, 5xx, redirect loops, a redirect to the cloud
metadata address or to ``file://``, files over ``LORA_MAX_BYTES``, valid safetensors files that are not LoRAs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from runpod.serverless.modules.rp_job import run_job
from safetensors.torch import save

from sdxl_worker.request.entries import LoraRequest
from tests.support.cache_audit import cache_problems, entry_keys
from tests.support.factories import FAULT_TIMINGS, cache_settings
from tests.support.servers.fault_http import FaultServer
from tests.support.worker_env import images_of, run_through_sdk, small_job

MAX_BYTES = 1_000_000
SEED = 51


def job(loras: list | None = None) -> dict[str, Any]:
    return small_job(seed=SEED, num_inference_steps=1, **({"loras": loras} if loras else {}))


@dataclass
class Env:
    """The fault server, the worker's cache folder and handler, and the reference images of the next jobs."""

    server: FaultServer
    root: Path
    handler: Callable[[dict], Awaitable[dict]]
    plain: list[str] = field(default_factory=list)
    with_good: list[str] = field(default_factory=list)

    def good_url(self) -> str:
        return self.server.url("/good.safetensors")

    def assert_next_jobs_unaffected(self) -> None:
        """The next LoRA job and the next plain job give their reference bytes; the cache is sound."""
        assert images_of(run_through_sdk(self.handler, job([self.good_url()]))) == self.with_good
        assert images_of(run_through_sdk(self.handler, job())) == self.plain
        assert cache_problems(self.root) == []


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_handler, lora_blobs) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("fault-cache")
    with FaultServer() as server:
        server.route("/good.safetensors", body=lora_blobs["style"])
        state = Env(server, root, make_handler(cache_settings(root, **FAULT_TIMINGS, max_bytes=MAX_BYTES)))
        state.plain = images_of(run_through_sdk(state.handler, job()))
        state.with_good = images_of(run_through_sdk(state.handler, job([state.good_url()])))
        assert state.with_good != state.plain
        yield state


@dataclass(frozen=True)
class Fault:
    """One fault: the route's options, and either the request count of a recovery or the error's fragments."""

    name: str
    route: dict[str, Any]
    recovers_after: int | None = None          # requests the successful download took
    waits_s: float = 0.0                       # at least this long before the retry (Retry-After)
    error: tuple[str, ...] = ()
    body: str = "style"


HALF = 150_000
FAULTS = [
    Fault("reset-once", {"reset_at": HALF, "reset_first": 1}, recovers_after=2),
    Fault("reset-always", {"reset_at": HALF}, error=(
        "the download broke off after", "connection reset by the server", "gave up after 3 attempts")),
    Fault("short-once", {"truncate_at": HALF, "truncate_first": 1}, recovers_after=2),
    Fault("short-always", {"truncate_at": HALF}, error=(
        "the server closed the connection before the end", "gave up after 3 attempts")),
    Fault("stall-once", {"delay_s": 4.0, "delay_first": 1}, recovers_after=2),
    Fault("stall-always", {"delay_s": 4.0}, error=("timed out", "read 1.5 s", "gave up after 3 attempts")),
    Fault("429-retry-after", {"fail_first": 1, "fail_status": 429, "retry_after": "1"}, recovers_after=2, waits_s=1),
    Fault("500-then-ok", {"fail_first": 2, "fail_status": 500}, recovers_after=3),
    Fault("503-always", {"fail_first": 100}, error=("HTTP 503 from", "gave up after 3 attempts")),
    Fault("redirect-loop", {"redirect_to": "/redirect-loop.safetensors"}, error=("more than 10 redirects",)),
    Fault("redirect-to-metadata", {"redirect_to": "http://169.254.169.254/latest/meta-data/iam"},
          error=("refused URL http://169.254.169.254/latest/meta-data/iam", "a cloud metadata address")),
    Fault("redirect-to-file", {"redirect_to": "file:///etc/passwd"},
          error=("refused URL file:///etc/passwd", "only http and https")),
    Fault("over-limit-declared", {}, body="big", error=("the file is 3.2 MB, over the limit of 1.0 MB",
                                                         "LORA_MAX_BYTES")),
    Fault("over-limit-streamed", {"send_length": False}, body="big", error=("the download passed", "over the limit")),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_http_fault_through_the_worker(env, lora_blobs, fault):
    path = f"/{fault.name}.safetensors"
    env.server.route(path, body=lora_blobs[fault.body], **fault.route)
    url = env.server.url(path)
    result = run_through_sdk(env.handler, job([{"path": url, "name": fault.name}]))
    key = LoraRequest(0, url).cache_key
    if fault.recovers_after is not None:
        assert images_of(result) == env.with_good
        assert env.server.count(path) == fault.recovers_after
        report = result["output"]["loras"][0]
        assert report["sha256"] == hashlib.sha256(lora_blobs["style"]).hexdigest()
        assert report["fetch_ms"] >= fault.waits_s * 1000 * 0.95
        assert key in entry_keys(env.root)
    else:
        assert "output" not in result
        assert result["error"].startswith(f"loras[0] ({fault.name}): "), result["error"]
        for fragment in fault.error:
            assert fragment in result["error"], result["error"]
        assert key not in entry_keys(env.root)
    env.assert_next_jobs_unaffected()


def test_a_redirect_loop_across_two_paths_ends_with_a_clear_error(env):
    env.server.route("/ping.safetensors", redirect_to="/pong.safetensors")
    env.server.route("/pong.safetensors", redirect_to=env.server.url("/ping.safetensors"))
    result = run_through_sdk(env.handler, job([env.server.url("/ping.safetensors")]))
    assert result["error"].startswith("loras[0] (127.0.0.1:") and "more than 10 redirects" in result["error"]
    assert env.server.count("/ping.safetensors") + env.server.count("/pong.safetensors") == 11
    env.assert_next_jobs_unaffected()


def _embedding() -> bytes:
    """An SDXL textual-inversion embedding: a valid safetensors file people mistake for a LoRA."""
    return save({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)})


def _checkpoint_slice() -> bytes:
    """Tensors named like a full SDXL checkpoint (weights, not low-rank factors)."""
    return save({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3),
                 "first_stage_model.decoder.conv_in.bias": torch.randn(64)})


@pytest.mark.parametrize("make_body", [_embedding, _checkpoint_slice], ids=["embedding", "checkpoint-slice"])
def test_a_valid_safetensors_file_that_is_not_a_lora_is_refused_by_name(env, make_body):
    """The file is a faithful, verified copy of what the server sent, so the cache may keep it (the next request for
    the same URL fails fast from disk); what matters is that it is never applied and the job says why."""
    body = make_body()
    path = f"/{make_body.__name__.strip('_')}.safetensors"
    env.server.route(path, body=body)
    result = run_through_sdk(env.handler, job([{"path": env.server.url(path), "name": "not-a-lora"}]))
    assert result["error"].startswith("loras[0] (not-a-lora): "), result["error"]
    assert "holds no LoRA weights for an SDXL UNet or text encoder" in result["error"]
    env.assert_next_jobs_unaffected()


def _flip_last_byte_keeping_mtime(path) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_flipped_bytes_in_a_cached_entry_are_refetched_by_a_restarted_worker(env, make_handler):
    key = LoraRequest(0, env.good_url()).cache_key
    weights = next((env.root / key).glob("weights.*"))
    _flip_last_byte_keeping_mtime(weights)
    before = env.server.count("/good.safetensors")
    restarted = make_handler(cache_settings(env.root, **FAULT_TIMINGS, max_bytes=MAX_BYTES))
    result = run_through_sdk(restarted, job([env.good_url()]))
    assert images_of(result) == env.with_good
    assert result["output"]["loras"][0]["cache_hit"] is False
    assert env.server.count("/good.safetensors") == before + 1
    assert weights.read_bytes() == env.server.routes["/good.safetensors"].body
    env.assert_next_jobs_unaffected()


def test_flipped_bytes_in_an_entry_named_directly_are_reported(env, make_handler):
    """An entry addressed by its cache name has no source to re-fetch from: the job says the entry is corrupt."""
    key = LoraRequest(0, env.good_url()).cache_key
    weights = next((env.root / key).glob("weights.*"))
    original = weights.read_bytes()
    _flip_last_byte_keeping_mtime(weights)
    restarted = make_handler(cache_settings(env.root, **FAULT_TIMINGS, max_bytes=MAX_BYTES))
    result = run_through_sdk(restarted, job([key]))
    assert result["error"] == (f"loras[0] ({key}): the cache entry failed verification (its file changed or is "
                               "corrupt)")
    assert images_of(run_through_sdk(restarted, job())) == env.plain
    weights.write_bytes(original)
    assert images_of(run_through_sdk(restarted, job([key]))) == env.with_good
    env.assert_next_jobs_unaffected()


DRIP = {"chunk_size": 2000, "chunk_delay_s": 0.2}  # 10 kB/s, each gap far under the 1.5 s read timeout


@pytest.mark.parametrize("limits, fragments, requests", [
    ({"min_throughput_kbps": 50, "throughput_window_s": 1.0},
     ("the download slowed to", "under 50 kB/s (LORA_MIN_THROUGHPUT_KBPS)", "gave up after 3 attempts"), 3),
    ({"min_throughput_kbps": 0, "download_deadline_s": 2.0},
     ("the download took longer than 2 s (LORA_DOWNLOAD_DEADLINE_S)",), 1),
], ids=["min-throughput", "deadline"])
def test_a_server_dripping_bytes_under_the_read_timeout_is_cut_off(tmp_path, make_handler, lora_blobs, limits,
                                                                    fragments, requests):
    """A body of 294 kB at 10 kB/s (about 30 s) never trips the read timeout; the throughput floor or the total
    deadline ends it within seconds, as a LoRA and as ``image_url``, and the worker serves the next job."""
    with FaultServer() as server:
        server.route("/drip.safetensors", body=lora_blobs["style"], **DRIP)
        server.route("/good.safetensors", body=lora_blobs["style"])
        handler = make_handler(cache_settings(tmp_path / "cache", **FAULT_TIMINGS, **limits))
        started = time.monotonic()
        result = run_through_sdk(handler, job([{"path": server.url("/drip.safetensors"), "name": "drip"}]))
        elapsed = time.monotonic() - started
        assert result.get("error", "").startswith("loras[0] (drip): "), result
        for fragment in fragments:
            assert fragment in result["error"], result["error"]
        assert elapsed < 12 and server.count("/drip.safetensors") == requests
        image = run_through_sdk(handler, small_job(seed=SEED, num_inference_steps=1,
                                                   image_url=server.url("/drip.safetensors")))
        assert image["error"].startswith("image_url: ") and fragments[0] in image["error"], image
        assert "output" in run_through_sdk(handler, job([server.url("/good.safetensors")]))
    assert cache_problems(tmp_path / "cache") == [] and len(entry_keys(tmp_path / "cache")) == 1


def test_stalled_downloads_leave_the_event_loops_default_pool_to_other_jobs(tmp_path, make_handler, lora_blobs):
    """A download stalled for 10 s while the event loop's default pool (one thread here, as ``asyncio.to_thread``
    and the runpod SDK share it) is all there is: a plain job started meanwhile finishes long before the download
    does, because downloads run on the worker's own pool."""
    async def scenario(handler, stalled_url: str) -> tuple[float, bool, dict]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
        stalled = asyncio.create_task(run_job(handler, {"id": "stalled", "input": job([stalled_url])}))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        plain = await run_job(handler, {"id": "plain", "input": job()})
        plain_s, stalled_done = time.monotonic() - started, stalled.done()
        await stalled
        return plain_s, stalled_done, plain

    with FaultServer() as server:
        server.route("/stalled.safetensors", body=lora_blobs["style"], delay_s=10.0)
        timings = {**FAULT_TIMINGS, "read_timeout_s": 15.0, "download_retries": 0}
        handler = make_handler(cache_settings(tmp_path / "cache", **timings))
        run_through_sdk(handler, job())  # warm: the first job of a worker pays one-off costs
        plain_s, stalled_done, plain = asyncio.run(scenario(handler, server.url("/stalled.safetensors")))
    assert images_of(plain) and not stalled_done and plain_s < 8, (plain_s, stalled_done)
