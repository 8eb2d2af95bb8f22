"""Issue 8's cache features through the worker on the tiny SDXL: a Civitai AIR in a job, a pinned LoRA that stays
in RAM under pressure, and jobs without LoRAs that never look at the free-disk floor."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from sdxl_worker.request.entries import parse_lora_requests
from sdxl_worker.worker import Worker
from tests.support.factories import cache_settings, make_worker
from tests.support.lora_forms import canonical_factors, write_kohya
from tests.support.servers.fake_civitai import FakeCivitai
from tests.support.servers.fault_http import FaultServer
from tests.support.worker_env import small_job


@pytest.fixture(scope="module")
def lora_bodies(tmp_path_factory, tiny_model_dir) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("feature-loras")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    files = {name: write_kohya(folder / f"{name}.safetensors", canonical_factors(pipe, ("unet",), rank=4, seed=60 + i))
             for i, name in enumerate(("pinned", "one", "two", "civitai"))}
    save_file(load_file(files["civitai"]), str(files["civitai"]),
              metadata={"modelspec.trigger_phrase": "filestyle, TinyStyle"})  # its own words, one shared
    return {name: path.read_bytes() for name, path in files.items()}


@pytest.fixture(scope="module")
def server(lora_bodies):
    with FaultServer() as running:
        for name, body in lora_bodies.items():
            running.route(f"/{name}.safetensors", body=body)
        FakeCivitai(running).add_version(5150, lora_bodies["civitai"], trained_words=["tinystyle"])
        yield running


def feature_worker(tmp_path, server, ram_budget: int = 2 * 1024**3, free_bytes=None, **settings) -> Worker:
    cache = cache_settings(tmp_path / "cache", civitai_api_base=server.url(""), **settings)
    return make_worker(cache, ram_cache_bytes=ram_budget, free_bytes=free_bytes)


def run(worker: Worker, **job) -> dict:
    return asyncio.run(worker.run({"id": "feature-job", "input": small_job(**job)}))


def test_a_civitai_air_in_a_job_is_fetched_once_and_applied(worker_handler, server, tmp_path):
    worker = feature_worker(tmp_path, server)
    plain = run(worker, seed=70)["images"]
    first = run(worker, seed=70, loras=["urn:air:sdxl:lora:civitai:1@5150"])
    second = run(worker, seed=70, loras=[{"path": "civitai:5150", "scale": 1.0}])
    assert "error" not in first and first["images"] != plain and first["images"] == second["images"]
    report = first["loras"][0]
    assert report["cache_hit"] is False and report["modules_patched"] == {"unet": 96}
    assert report["file"] == "pixel-style.safetensors" and second["loras"][0]["cache_hit"] is True
    assert server.count(FakeCivitai.api_path(5150)) == 1
    requests, _ = parse_lora_requests(["civitai:5150"], 8)
    assert worker.lora_cache.resolve_all(requests)[0].trigger_words == ("tinystyle",)
    assert report["metadata"]["trigger_words"] == ["tinystyle", "filestyle"]  # Civitai's first, each word once
    appended = run(worker, seed=70, loras=["civitai:5150"], append_trigger_words=True)
    assert appended["prompt"] == small_job()["prompt"] + ", tinystyle, filestyle"
    assert appended["images"] == run(worker, seed=70, loras=["civitai:5150"],
                                     prompt=appended["prompt"])["images"]


def test_a_pasted_civitai_url_token_never_reaches_the_output_or_the_log(worker_handler, server, tmp_path, caplog):
    worker = feature_worker(tmp_path, server)
    output = run(worker, seed=71, loras=["https://civitai.com/api/download/models/5150?type=Model&token=sekrit-77"])
    assert "error" not in output, output.get("error")
    assert output["loras"][0]["source"] == "https://civitai.com/api/download/models/5150?type=Model"
    assert "sekrit-77" not in json.dumps(output) and "sekrit-77" not in caplog.text


def test_the_evict_action_refuses_a_pinned_entry(worker_handler, server, tmp_path):
    pinned, other = server.url("/pinned.safetensors"), server.url("/one.safetensors")
    worker = feature_worker(tmp_path, server, pinned_sources=(pinned,), evict_grace_s=0.0)
    worker.preload([other], [pinned])
    result = asyncio.run(worker.run({"id": "evict", "input": {"action": "evict", "loras": [pinned, other]}}))
    assert [entry["status"] for entry in result["loras"]] == ["refused", "evicted"], result
    assert "pinned" in result["loras"][0]["reason"]
    assert run(worker, loras=[pinned])["loras"][0]["cache_hit"] is True


def test_a_pinned_lora_is_preloaded_and_stays_in_ram_while_others_are_evicted(worker_handler, server, tmp_path):
    pinned = server.url("/pinned.safetensors")
    worker = feature_worker(tmp_path, server, ram_budget=1, pinned_sources=(pinned,))
    worker.preload([], [pinned])
    for name in ("one", "two"):
        assert run(worker, loras=[server.url(f"/{name}.safetensors")])["loras"][0]["ram_cache_hit"] is False
    reports = run(worker, loras=[pinned, server.url("/one.safetensors")])["loras"]
    assert [report["ram_cache_hit"] for report in reports] == [True, False]
    assert [report["cache_hit"] for report in reports] == [True, True]


def test_a_bad_pinned_source_stops_the_start_naming_the_variable(worker_handler, server, tmp_path):
    worker = feature_worker(tmp_path, server)
    with pytest.raises(ValueError, match=r"^PINNED_LORAS: PINNED_LORAS\[1\]: 'civitai:' must name a model version"):
        worker.preload([server.url("/one.safetensors")], [server.url("/two.safetensors"), "civitai:x"])
    with pytest.raises(ValueError, match=r"^PRELOAD_LORAS: PRELOAD_LORAS\[0\]: unsupported URL scheme"):
        worker.preload(["ftp://example.com/x.safetensors"], [])


def test_jobs_without_loras_never_read_the_free_space(worker_handler, server, tmp_path):
    reads = []

    def full_disk() -> int:
        reads.append(1)
        return 0

    worker = feature_worker(tmp_path, server, free_bytes=full_disk, min_free_bytes=1)
    plain = run(worker, seed=71)
    assert reads == [] and "error" not in plain
    refused = run(worker, seed=71, loras=[server.url("/one.safetensors")])
    assert refused["error"].startswith("loras[0] (") and "not enough free disk space" in refused["error"]
    assert reads  # the control: a job with a new LoRA does read it
    assert run(worker, seed=71)["images"] == plain["images"]
