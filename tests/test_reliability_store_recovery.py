"""The store and the patcher after faults a running worker meets: its cache folder deleted under it, a lock file
holding garbage, a LoRA file whose own ranks disagree. Driven through the real worker (the runpod SDK's ``run_job``),
with the default lock staleness (180 s) where it matters; each job after the fault returns its reference bytes.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from safetensors.torch import save

from sdxl_worker.request.entries import LoraRequest
from tests.support.cache_audit import cache_problems
from tests.support.factories import FAULT_TIMINGS, cache_settings
from tests.support.lora_forms import canonical_factors, kohya_state
from tests.support.servers.fault_http import FaultServer
from tests.support.worker_env import images_of, run_through_sdk, small_job


def job(loras: list | None = None) -> dict:
    return small_job(seed=83, num_inference_steps=1, **({"loras": loras} if loras else {}))


@pytest.fixture(scope="module")
def server(lora_blobs):
    with FaultServer() as running:
        for name in ("small", "style"):
            running.route(f"/{name}.safetensors", body=lora_blobs[name])
        yield running


@pytest.fixture(scope="module")
def references(make_handler, tmp_path_factory, server) -> dict[str, list[str]]:
    """Images of the jobs below from a worker with an undisturbed cache."""
    handler = make_handler(cache_settings(tmp_path_factory.mktemp("reference-cache"), **FAULT_TIMINGS))
    return {name: images_of(run_through_sdk(handler, job(loras))) for name, loras in (
        ("plain", None), ("small", [server.url("/small.safetensors")]), ("style", [server.url("/style.safetensors")]))}


def test_a_cache_folder_deleted_while_the_worker_runs_is_recreated_on_demand(make_handler, tmp_path, server,
                                                                             references):
    root = tmp_path / "cache"
    handler = make_handler(cache_settings(root, **FAULT_TIMINGS))
    assert images_of(run_through_sdk(handler, job([server.url("/small.safetensors")]))) == references["small"]
    shutil.rmtree(root)
    for name in ("small", "style", "small"):  # a re-fetch, a new LoRA, then a hit on the recreated cache
        result = run_through_sdk(handler, job([server.url(f"/{name}.safetensors")]))
        assert images_of(result) == references[name], result
    assert images_of(run_through_sdk(handler, job())) == references["plain"]
    assert server.count("/small.safetensors") == 3  # reference, first job, the re-fetch after the deletion
    assert cache_problems(root) == []


@pytest.mark.parametrize("garbage", [b"", b"\x00\xffnot json", b'{"host": "x", "pid"', b"[1, 2]"])
def test_a_lock_file_holding_garbage_is_broken_at_once_when_old_enough(make_handler, tmp_path, server, references,
                                                                       garbage, caplog):
    root = tmp_path / "cache"
    handler = make_handler(cache_settings(root, **FAULT_TIMINGS))  # lock_stale_s: the default 180 s
    url = server.url("/small.safetensors")
    lock = root / ".locks" / f"{LoraRequest(0, url).cache_key}.lock"
    lock.write_bytes(garbage)
    old = time.time() - 60
    os.utime(lock, (old, old))
    start = time.monotonic()
    result = run_through_sdk(handler, job([url]))
    assert time.monotonic() - start < 30, "waited for a lock that has no holder"
    assert images_of(result) == references["small"], result
    assert "broke a stale lock of an unknown holder" in caplog.text
    assert cache_problems(root) == []


def _rank_mismatch_lora(pipe) -> bytes:
    """A kohya LoRA for the tiny SDXL whose first module has a rank 4 down and a rank 3 up factor."""
    state = kohya_state(canonical_factors(pipe, ("unet",), rank=4, seed=41))
    first_up = sorted(key for key in state if key.endswith(".lora_up.weight"))[0]
    state[first_up] = state[first_up][:, :3].contiguous()
    return save(state)


def test_a_lora_whose_own_ranks_disagree_is_called_broken_not_a_base_model_mismatch(make_handler, tmp_path, pipes,
                                                                                    references):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "torn.safetensors").write_bytes(_rank_mismatch_lora(pipes.base))
    handler = make_handler(cache_settings(root, **FAULT_TIMINGS))
    error = run_through_sdk(handler, job(["torn.safetensors"]))["error"]
    assert error.startswith("loras[0] (torn.safetensors): 1/"), error
    assert "LoRA modules cannot be applied to any model; 1 are broken in the file itself: their up and down ranks " \
           "disagree, e.g. ['unet." in error and "(down rank 4, up rank 3)" in error, error
    assert "base model" not in error and "SD 1.5" not in error
    assert images_of(run_through_sdk(handler, job())) == references["plain"]
