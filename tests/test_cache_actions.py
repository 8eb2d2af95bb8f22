"""Cache actions through the worker and the runpod SDK's run_job: list_loras, prefetch, evict, cache_stats, with a
real HTTP server, real leases from another process, and inputs checked like jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdxl_worker.request.aliases import load_aliases
from sdxl_worker.request.entries import LoraRequest
from tests.support.factories import cache_settings, make_worker
from tests.support.lora_forms import canonical_factors, write_kohya
from tests.support.servers.fault_http import FaultServer
from tests.support.servers.lora_files import lora_bytes, lora_tensors
from tests.support.worker_env import PROJECT_ROOT, output_of, run_through_sdk, small_job

TOKEN = "civitai-TOKEN-SECRET-77"
SD15_META = {"ss_base_model_version": "sd_v1", "ss_output_name": "old-style"}
LEASE_HOLDER = """
import sys, time
from pathlib import Path
from sdxl_worker.store.leases import Leases
from sdxl_worker.store.owners import Heartbeat
Leases(Path(sys.argv[1]), Heartbeat(1.0), 900).take(sys.argv[2])
print("leased", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory, tiny_model_dir) -> bytes:
    """A LoRA that fits the tiny SDXL, for the jobs of these tests."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    path = tmp_path_factory.mktemp("action-loras") / "a.safetensors"
    return write_kohya(path, canonical_factors(pipe, ("unet",), rank=4, seed=71)).read_bytes()


@pytest.fixture
def server(tmp_path, sdxl_lora):
    sd15 = tmp_path / "sd15.safetensors"
    save_file(lora_tensors(seed=5), str(sd15), metadata=SD15_META)
    with FaultServer() as running:
        running.route("/a.safetensors", body=sdxl_lora)
        running.route("/b.safetensors", body=lora_bytes(seed=2))
        running.route("/big.safetensors", body=lora_bytes(seed=3, rank=16, dim=4096), chunk_size=16_384)
        running.route("/sd15.safetensors", body=sd15.read_bytes())
        running.route("/missing.safetensors", status=404)
        yield running


def action(worker, **fields) -> dict:
    return output_of(worker, fields)


@pytest.mark.parametrize("job_input, fragments", [
    ({"action": "explode"}, ["action: must be one of list_loras, prefetch, evict, cache_stats, got 'explode'"]),
    ({"action": None}, ["action: must be one of"]),
    ({"action": "list_loras", "prompt": "a cat"}, ["prompt is not a valid input option"]),
    ({"action": "prefetch"}, ["loras is a required input"]),
    ({"action": "prefetch", "loras": []}, ["loras: must be a list of 1..32 LoRA entries"]),
    ({"action": "evict", "loras": "a.safetensors"}, ["loras: must be a list of 1..32"]),
    ({"action": "evict", "loras": ["../x", "/etc/passwd", ".locks", {"path": "a.pt", "colour": 1}], "seed": 1},
     ["loras[0]: must be an http(s) URL", "loras[1]: must be an http(s) URL",
      "loras[2]: a cache name must not start with '.'", "loras[3]: unknown key(s) 'colour'",
      "seed is not a valid input option"]),
])
def test_action_inputs_are_checked_like_jobs_with_every_problem_at_once(worker_handler, job_input, fragments):
    result = run_through_sdk(worker_handler, job_input)
    assert "output" not in result
    for fragment in fragments:
        assert fragment in result["error"]


def test_prefetch_downloads_and_verifies_each_entry_without_generating(pipes, tmp_path, server, sdxl_lora):
    worker = make_worker(cache_settings(tmp_path / "cache"))
    wrong = "0" * 64
    output = action(worker, action="prefetch", loras=[
        server.url("/a.safetensors"), {"path": server.url("/b.safetensors"), "sha256": wrong},
        server.url("/missing.safetensors"), server.url("/sd15.safetensors")])
    assert set(output) == {"action", "loras", "downloaded", "cached", "failed"} and "images" not in output
    first, bad_hash, missing, sd15 = output["loras"]
    assert first["status"] == "downloaded" and first["size_bytes"] == len(sdxl_lora)
    assert first["key"] == LoraRequest(0, server.url("/a.safetensors")).cache_key and len(first["sha256"]) == 64
    assert first["metadata"] == {"name": None, "base_model": None, "trigger_words": []}
    assert bad_hash["status"] == "error" and "loras[1]" in bad_hash["error"] and "sha256 mismatch" in bad_hash["error"]
    assert missing["status"] == "error" and "not found (HTTP 404)" in missing["error"]
    assert sd15["status"] == "error" and "trained for SD 1.x" in sd15["error"]
    assert sd15["metadata"] == {"name": "old-style", "base_model": "SD 1.x", "trigger_words": []}
    assert (output["downloaded"], output["cached"], output["failed"]) == (1, 0, 3)
    assert worker.ram_cache.stats()["misses"] == 0  # nothing parsed

    again = action(worker, action="prefetch", loras=[server.url("/a.safetensors")])
    assert again["loras"][0]["status"] == "cached" and server.count("/a.safetensors") == 1
    job = output_of(worker, small_job(loras=[server.url("/a.safetensors")]))
    assert job["loras"][0]["cache_hit"] is True and server.count("/a.safetensors") == 1


def test_prefetch_sends_progress_through_the_job_progress_callback(pipes, tmp_path, server):
    worker = make_worker(cache_settings(tmp_path / "cache"))
    messages: list[str] = []
    output = worker.actions.run({"action": "prefetch", "loras": [{"path": server.url("/big.safetensors"),
                                                                    "name": "big"}]}, messages.append)
    assert output["loras"][0]["status"] == "downloaded"
    assert messages[0] == "prefetch 1/1: big"
    assert messages[-1].startswith("loras[0] (big): downloading 100% (")


def test_list_loras_shows_entries_hand_placed_files_and_aliases_without_any_secret(pipes, tmp_path, server):
    root = tmp_path / "cache"
    server.route("/api/download/models/9", body=lora_bytes(seed=9), require_auth=f"Bearer {TOKEN}",
                 headers={"Content-Disposition": 'attachment; filename="Nine.safetensors"'})
    aliases = load_aliases(json.dumps({"nine": server.url(f"/api/download/models/9?token={TOKEN}")}))
    worker = make_worker(cache_settings(root, civitai_token=TOKEN, civitai_hosts=("127.0.0.1",)), aliases=aliases)
    action(worker, action="prefetch", loras=["nine", server.url("/a.safetensors")])
    save_file(lora_tensors(seed=4), str(root / "hand.safetensors"),
              metadata={"modelspec.title": "Hand Style", "modelspec.trigger_phrase": "hand drawn"})
    (root / "notes.txt").write_text("not a LoRA")
    (tmp_path / "outside.safetensors").write_bytes(lora_bytes(seed=6))
    os.symlink(tmp_path / "outside.safetensors", root / "escape.safetensors")

    listing = action(worker, action="list_loras")
    assert TOKEN not in json.dumps(listing)
    assert listing["cache_dir"] == str(root) and len(listing["entries"]) == 2
    newest = listing["entries"][0]
    assert set(newest) == {"key", "source", "name", "kind", "weight_name", "revision", "size_bytes", "sha256",
                           "downloaded_at", "last_used_at", "in_use", "metadata"}
    nine = next(entry for entry in listing["entries"] if entry["name"] == "Nine.safetensors")
    assert nine["source"] == server.url("/api/download/models/9") and nine["in_use"] is False
    assert nine["downloaded_at"] <= nine["last_used_at"] and nine["size_bytes"] > len(lora_bytes(seed=9))
    assert listing["hand_placed"] == [{
        "name": "hand.safetensors", "size_bytes": (root / "hand.safetensors").stat().st_size, "sha256": None,
        "metadata": {"name": "Hand Style", "base_model": None, "trigger_words": ["hand drawn"]}}]
    assert listing["aliases"] == {"nine": {"path": server.url("/api/download/models/9")}}

    action(worker, action="prefetch", loras=["hand"])  # this process hashes the file: the listing now knows it
    (hand,) = action(worker, action="list_loras")["hand_placed"]
    assert len(hand["sha256"]) == 64


def test_evict_by_key_source_and_alias_then_a_job_downloads_again_and_reuses_ram(pipes, tmp_path, server):
    root = tmp_path / "cache"
    aliases = load_aliases(json.dumps({"bee": server.url("/b.safetensors")}))
    worker = make_worker(cache_settings(root, evict_grace_s=0), aliases=aliases)
    url_a = server.url("/a.safetensors")
    first = output_of(worker, small_job(loras=[url_a]))["loras"][0]
    action(worker, action="prefetch", loras=["bee"])
    key_a = LoraRequest(0, url_a).cache_key
    output = action(worker, action="evict", loras=[key_a, "bee", server.url("/never.safetensors")])
    assert [(item["entry"], item["status"], item["key"]) for item in output["loras"]] == [
        ("loras[0]", "evicted", key_a), ("loras[1]", "evicted", LoraRequest(0, server.url("/b.safetensors")).cache_key),
        ("loras[2]", "not_cached", LoraRequest(0, server.url("/never.safetensors")).cache_key)]
    assert output["evicted"] == 2 and worker.lora_cache.stats()["evictions"] == 2
    assert sorted(path.name for path in root.iterdir()) == [".leases", ".locks"]
    again = output_of(worker, small_job(loras=[url_a]))["loras"][0]
    assert again["cache_hit"] is False and again["ram_cache_hit"] is True and again["sha256"] == first["sha256"]
    assert server.count("/a.safetensors") == 2
    (by_source,) = action(worker, action="evict", loras=[url_a + "?token=another"])["loras"]
    assert by_source["status"] == "evicted" and not (root / key_a).exists()


def test_evict_refuses_entries_in_use_here_or_leased_by_another_process(pipes, tmp_path, server):
    worker = make_worker(cache_settings(tmp_path / "cache", evict_grace_s=0))
    url = server.url("/a.safetensors")
    resolved = worker.lora_cache.resolve(LoraRequest(0, url))
    with worker.lora_cache.in_use([resolved]):
        (held,) = action(worker, action="evict", loras=[url])["loras"]
    assert held["status"] == "refused" and held["reason"] == "in use by a running job of this worker"

    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(tmp_path / "cache" / ".leases"),
                               resolved.entry_key], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "leased"
        (leased,) = action(worker, action="evict", loras=[url])["loras"]
        assert leased["status"] == "refused" and "leased by a worker" in leased["reason"]
        assert resolved.path.exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    (gone,) = action(worker, action="evict", loras=[url])["loras"]
    assert gone["status"] == "evicted" and not resolved.path.exists()


def test_evict_honours_the_grace_period_of_a_just_used_entry(pipes, tmp_path, server):
    worker = make_worker(cache_settings(tmp_path / "cache"))
    action(worker, action="prefetch", loras=[server.url("/a.safetensors")])
    (recent,) = action(worker, action="evict", loras=[server.url("/a.safetensors")])["loras"]
    assert recent["status"] == "refused" and recent["reason"].startswith("used 0 s ago, within the 120 s")


def test_evict_never_deletes_hand_placed_files_or_anything_outside_the_cache(pipes, tmp_path, server):
    root = tmp_path / "cache"
    worker = make_worker(cache_settings(root, evict_grace_s=0))
    (root / "hand.safetensors").write_bytes(lora_bytes(seed=7))
    outside = tmp_path / "outside"
    action(worker, action="prefetch", loras=[server.url("/a.safetensors")])
    entry = root / LoraRequest(0, server.url("/a.safetensors")).cache_key
    shutil.copytree(entry, outside)
    fake_key = "f" * 32
    os.symlink(outside, root / fake_key)
    os.symlink(tmp_path / "elsewhere.safetensors", root / "link.safetensors")
    (tmp_path / "elsewhere.safetensors").write_bytes(lora_bytes(seed=8))
    output = action(worker, action="evict", loras=["hand", fake_key, "link"])
    statuses = [(item["status"], item.get("reason", "")) for item in output["loras"]]
    assert statuses[0] == ("refused", "placed by hand in the cache folder: the endpoint owner's file, never deleted "
                                      "by a job")
    assert statuses[1:] == [("not_cached", ""), ("refused", "'link.safetensors' leads outside the LoRA cache")]
    assert (root / "hand.safetensors").exists() and (outside / "manifest.json").exists()
    assert (tmp_path / "elsewhere.safetensors").exists() and entry.exists()


def test_cache_stats_has_the_disk_and_ram_counters(pipes, tmp_path, server):
    worker = make_worker(cache_settings(tmp_path / "cache", cache_max_bytes=10**9))
    output_of(worker, small_job(loras=[server.url("/a.safetensors")]))
    output_of(worker, small_job(loras=[server.url("/a.safetensors")]))
    stats = action(worker, action="cache_stats")
    assert stats["disk"] == {"root": str(tmp_path / "cache"), "entries": 1, "size_bytes": stats["disk"]["size_bytes"],
                             "budget_bytes": 10**9, "user_entries": 0, "hits": 1, "misses": 1, "waits": 0,
                             "evictions": 0}
    assert stats["ram"]["entries"] == 1 and stats["ram"]["hits"] == 1 and stats["ram"]["misses"] == 1
    assert stats["ram"]["size_bytes"] > 0 and stats["ram"]["budget_bytes"] == 2 * 1024**3
