"""Prompt tags, aliases, metadata and trigger words through the worker and the SDK's run_job, on the tiny SDXL."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import sdxl_worker.weights.load as parsing
from sdxl_worker.request.aliases import load_aliases
from tests.support.factories import cache_settings, make_worker
from tests.support.lora_forms import canonical_factors, write_kohya
from tests.support.servers.fault_http import FaultServer
from tests.support.worker_env import PROJECT_ROOT, PYTHON, error_of, output_of, small_job, subprocess_env

ALL = ("unet", "text_encoder", "text_encoder_2")
KOHYA_META = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
              "ss_output_name": "pixel-cabin", "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 9, "pixel art": 9,
                                                                                        "snow": 4}})}
MODELSPEC_META = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.title": "Film Grain XL",
                  "modelspec.trigger_phrase": "film grain"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("prompt-loras")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    unet = canonical_factors(pipe, ("unet",), rank=4, seed=61)
    return {
        "style": write_kohya(folder / "style.safetensors", canonical_factors(pipe, ALL, rank=4, seed=60)),
        "kohya-meta": write_kohya(folder / "kohya-meta.safetensors", unet, KOHYA_META),
        "modelspec": write_kohya(folder / "modelspec.safetensors", canonical_factors(pipe, ("unet",), 4, 62),
                                 MODELSPEC_META),
        "sd15-meta": write_kohya(folder / "sd15-meta.safetensors", unet,
                                 {**KOHYA_META, "ss_base_model_version": "sd_v1"}),
        "no-meta": write_kohya(folder / "no-meta.safetensors", unet),
    }


@pytest.fixture
def cache_dir(tmp_path, files):
    folder = tmp_path / "cache"
    folder.mkdir()
    for path in files.values():
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def server(files):
    with FaultServer() as running:
        running.route("/pixel.safetensors", body=files["kohya-meta"].read_bytes())
        running.route("/other.safetensors", body=files["no-meta"].read_bytes())
        yield running


def test_a_tag_gives_the_same_image_as_the_list_entry_with_the_cleaned_prompt(pipes, cache_dir):
    worker = make_worker(cache_settings(cache_dir))
    tagged = output_of(worker, small_job(seed=51, prompt="a lighthouse at dusk, <lora:style:0.7>"))
    listed = output_of(worker, small_job(seed=51, prompt="a lighthouse at dusk",
                                         loras=[{"path": "style.safetensors", "scale": 0.7}]))
    plain = output_of(worker, small_job(seed=51, prompt="a lighthouse at dusk"))
    assert tagged["images"] == listed["images"] != plain["images"]
    assert tagged["prompt"] == "a lighthouse at dusk" and "prompt" not in listed and "prompt" not in plain
    (report,) = tagged["loras"]
    assert (report["label"], report["source"], report["scale"], report["file"]) == (
        "style", "style", 0.7, "style.safetensors")


def test_aliases_from_a_json_string_or_a_file_name_the_same_lora_in_tags_and_lists(pipes, cache_dir, server, tmp_path):
    url = server.url("/pixel.safetensors")
    table = {"pixel": {"path": url, "scale": 0.6}}
    alias_file = tmp_path / "aliases.json"
    alias_file.write_text(json.dumps(table))
    from_string = make_worker(cache_settings(cache_dir), aliases=load_aliases(json.dumps(table)))
    from_file = make_worker(cache_settings(cache_dir), aliases=load_aliases(str(alias_file)))
    by_tag = output_of(from_string, small_job(seed=53, prompt="a lighthouse at dusk <lora:pixel>"))
    by_list = output_of(from_file, small_job(seed=53, loras=["pixel"]))
    by_url = output_of(from_file, small_job(seed=53, loras=[{"path": url, "scale": 0.6}]))
    assert by_tag["images"] == by_list["images"] == by_url["images"]
    for output in (by_tag, by_list):
        (report,) = output["loras"]
        assert (report["label"], report["source"], report["scale"]) == ("pixel", url, 0.6)
    assert server.count("/pixel.safetensors") == 1


def test_an_unknown_name_is_an_error_before_any_download_and_the_worker_keeps_serving(pipes, cache_dir, server):
    worker = make_worker(cache_settings(cache_dir), aliases=load_aliases('{"px": "style.safetensors"}'))
    before = server.count("/other.safetensors")
    message = error_of(worker, small_job(prompt="a cat <lora:nope:0.5>", loras=[server.url("/other.safetensors"),
                                                                                "missing.pt"]))
    assert "prompt <lora:nope:0.5>: unknown LoRA 'nope': not an alias in LORA_ALIASES and no such file" in message
    assert "loras[1]: unknown LoRA 'missing.pt'" in message
    assert server.count("/other.safetensors") == before
    assert "prompt: <lora:style>: the same LoRA as loras[0]" in error_of(
        worker, small_job(prompt="<lora:style>", loras=["px"]))
    assert output_of(worker, small_job(prompt="a cat <lora:px:0.2>"))["loras"][0]["label"] == "px"


def test_metadata_is_reported_per_lora(pipes, cache_dir):
    output = output_of(make_worker(cache_settings(cache_dir)), small_job(
        prompt="a cat <lora:modelspec:0.5>", loras=["kohya-meta.safetensors", "no-meta"]))
    assert [report["metadata"] for report in output["loras"]] == [
        {"name": "pixel-cabin", "base_model": "SDXL", "trigger_words": ["ohwx", "pixel art"]},
        {"name": None, "base_model": None, "trigger_words": []},
        {"name": "Film Grain XL", "base_model": "SDXL", "trigger_words": ["film grain"]}]
    assert {"modules_patched", "sha256", "cache_hit", "ram_cache_hit"} <= output["loras"][0].keys()


def test_a_lora_whose_metadata_names_sd15_is_refused_before_any_tensor_is_read(pipes, cache_dir, monkeypatch):
    reads: list[str] = []
    real_load_file = parsing.load_file
    monkeypatch.setattr(parsing, "load_file", lambda path, *args, **kwargs: (reads.append(path),
                                                                              real_load_file(path, *args, **kwargs))[1])
    worker = make_worker(cache_settings(cache_dir))
    message = error_of(worker, small_job(prompt="a cat, <lora:sd15-meta:0.8>"))
    assert message == ("prompt <lora:sd15-meta:0.8> (sd15-meta): its metadata says it was trained for SD 1.x "
                       "(ss_base_model_version='sd_v1'), not SDXL; use an SDXL LoRA")
    assert reads == [] and worker.ram_cache.stats()["misses"] == 0
    output_of(worker, small_job(prompt="a cat, <lora:no-meta:0.8>"))  # the control: the same tensors load
    assert len(reads) == 1 and reads[0].endswith("no-meta.safetensors")


def test_append_trigger_words_changes_the_prompt_the_model_sees(pipes, cache_dir):
    worker = make_worker(cache_settings(cache_dir))
    appended = output_of(worker, small_job(seed=52, prompt="a lighthouse, <lora:kohya-meta:0.8>",
                                           append_trigger_words=True))
    written = output_of(worker, small_job(seed=52, prompt="a lighthouse, ohwx, pixel art",
                                          loras=[{"path": "kohya-meta", "scale": 0.8}]))
    assert appended["prompt"] == "a lighthouse, ohwx, pixel art"
    assert appended["images"] == written["images"]
    without = output_of(worker, small_job(seed=52, prompt="a lighthouse, <lora:kohya-meta:0.8>"))
    assert without["prompt"] == "a lighthouse" and without["images"] != appended["images"]
    present = output_of(worker, small_job(seed=52, prompt="a lighthouse, ohwx, pixel art", append_trigger_words=True,
                                          loras=[{"path": "kohya-meta", "scale": 0.8}]))
    assert "prompt" not in present and present["images"] == written["images"]
    zero = output_of(worker, small_job(seed=52, append_trigger_words=True, loras=[{"path": "kohya-meta", "scale": 0}]))
    assert "prompt" not in zero and zero["images"] == output_of(worker, small_job(seed=52))["images"]


def test_a_bad_lora_aliases_stops_the_worker_at_start_naming_the_variable(tmp_path):
    env = subprocess_env(tmp_path / "loras", LORA_ALIASES='{"px": {"path": "ftp://host/x.safetensors"}}')
    done = subprocess.run([PYTHON, str(PROJECT_ROOT / "handler.py"), "--test_input", json.dumps(
        {"input": small_job()})], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "LORA_ALIASES['px'].path: unsupported URL scheme 'ftp'" in done.stdout + done.stderr
