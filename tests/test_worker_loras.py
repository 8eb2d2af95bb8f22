"""LoRA jobs through the runpod SDK's run_job: URL and cache sources, reports, errors, and no trace left behind."""

from __future__ import annotations

import asyncio

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from tests.support.cache_audit import cache_problems
from tests.support.factories import cache_settings, make_worker
from tests.support.lora_forms import canonical_factors, write_kohya, write_peft_folder, write_sd15_shaped
from tests.support.servers.fault_http import FaultServer
from tests.support.worker_env import run_through_sdk, small_job

ALL = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("lora-files")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    return {
        "style": write_kohya(folder / "style.safetensors", canonical_factors(pipe, ALL, rank=4, seed=21)),
        "unet": write_kohya(folder / "unet.safetensors", canonical_factors(pipe, ("unet",), rank=8, seed=22)),
        "peft": write_peft_folder(folder / "peft-adapter", canonical_factors(pipe, ("unet",), rank=4, seed=23)),
        "sd15": write_sd15_shaped(folder / "sd15.safetensors"),
    }


@pytest.fixture(scope="module")
def server(lora_files):
    with FaultServer() as running:
        for name in ("style", "unet", "sd15"):
            running.route(f"/{name}.safetensors", body=lora_files[name].read_bytes())
        running.route("/missing.safetensors", status=404)
        running.route("/page.safetensors", body=b"<!doctype html><html><body>Sign in</body></html>",
                      headers={"Content-Type": "text/html"})
        yield running


def images_of(result) -> list[str]:
    assert "error" not in result, result.get("error")
    return result["output"]["images"]


def test_url_lora_downloads_once_then_hits_disk_and_ram_with_the_same_image(worker_handler, server):
    url = server.url("/style.safetensors")
    job = small_job(seed=40, loras=[{"path": url, "scale": 0.9, "name": "style"}])
    first = run_through_sdk(worker_handler, job)["output"]
    second = run_through_sdk(worker_handler, job)["output"]
    assert server.count("/style.safetensors") == 1
    assert first["images"] == second["images"]
    report, again = first["loras"][0], second["loras"][0]
    assert report["cache_hit"] is False and again["cache_hit"] is True and again["ram_cache_hit"] is True
    assert report["label"] == "style" and report["scale"] == 0.9 and report["source"] == url
    assert report["modules_patched"] == {"unet": 96, "text_encoder": 20, "text_encoder_2": 20}
    assert "unmatched_keys" not in report and len(report["sha256"]) == 64 and report["type"] == "lora"
    assert report["te_scale"] == 0.9  # the entry's scale, as no te_scale was given
    assert {"fetch_ms", "load_ms", "apply_ms"} <= report.keys()
    assert {"lora_fetch", "lora_load", "lora_apply", "lora_restore"} <= first["timings"].keys()


def test_loras_change_the_image_and_leave_no_trace(worker_handler, server, lora_files, worker_cache_dir):
    (worker_cache_dir / "unet-style.safetensors").write_bytes(lora_files["unet"].read_bytes())
    plain = images_of(run_through_sdk(worker_handler, small_job(seed=41)))
    with_loras = images_of(run_through_sdk(worker_handler, small_job(seed=41, loras=[
        server.url("/style.safetensors"), {"path": "unet-style.safetensors", "scale": -0.7}])))
    assert with_loras != plain
    assert images_of(run_through_sdk(worker_handler, small_job(seed=41))) == plain


def test_a_job_without_loras_is_the_plain_diffusers_call_pixel_for_pixel(worker_handler, server, tiny_pipeline):
    """What a worker without LoRA support computes: a separately loaded pipeline, called directly."""
    from diffusers import EulerDiscreteScheduler

    from tests.support.worker_env import image_from_png, png_from_data_uri

    run_through_sdk(worker_handler, small_job(seed=44, loras=[server.url("/style.safetensors")]))  # LoRAs used before
    ours = image_from_png(png_from_data_uri(images_of(run_through_sdk(worker_handler, small_job(seed=44)))[0]))
    job = small_job(seed=44)
    tiny_pipeline.scheduler = EulerDiscreteScheduler.from_config(tiny_pipeline.scheduler.config)
    plain = tiny_pipeline(prompt=job["prompt"], negative_prompt=job["negative_prompt"], height=job["height"],
                          width=job["width"], num_inference_steps=job["num_inference_steps"], guidance_scale=7.5,
                          generator=torch.Generator("cpu").manual_seed(44)).images[0]
    assert ours.size == plain.size and ours.tobytes() == plain.convert(ours.mode).tobytes()


def test_scale_zero_gives_the_same_bytes_as_no_lora(worker_handler, server):
    plain = images_of(run_through_sdk(worker_handler, small_job(seed=42)))
    zero = images_of(run_through_sdk(worker_handler, small_job(
        seed=42, loras=[{"path": server.url("/style.safetensors"), "scale": 0}])))
    assert zero == plain


def test_each_part_takes_its_own_scale_and_the_report_shows_both(worker_handler, server):
    plain = images_of(run_through_sdk(worker_handler, small_job(seed=43)))
    url = server.url("/style.safetensors")
    off = run_through_sdk(worker_handler, small_job(seed=43, loras=[{"path": url, "scale": 0, "te_scale": 0}]))
    assert images_of(off) == plain and off["output"]["loras"][0]["skipped_zero_scale"] is True
    tag_free = run_through_sdk(worker_handler, small_job(seed=43, loras=[{"path": url, "scale": 0.9, "te_scale": 0}]))
    report = tag_free["output"]["loras"][0]
    assert (report["scale"], report["te_scale"]) == (0.9, 0.0)
    assert report["modules_patched"] == {"unet": 96}
    text_only = run_through_sdk(worker_handler, small_job(seed=43, loras=[{"path": url, "scale": 0, "te_scale": 1}]))
    assert text_only["output"]["loras"][0]["modules_patched"] == {"text_encoder": 20, "text_encoder_2": 20}
    assert len({images_of(tag_free)[0], images_of(text_only)[0], plain[0]}) == 3


def test_peft_folder_in_the_cache_is_applied(worker_handler, lora_files, worker_cache_dir):
    import shutil

    shutil.copytree(lora_files["peft"], worker_cache_dir / "my-peft-adapter", dirs_exist_ok=True)
    output = run_through_sdk(worker_handler, small_job(loras=["my-peft-adapter"]))["output"]
    assert output["loras"][0]["modules_patched"] == {"unet": 96}


@pytest.mark.parametrize("path, fragment", [
    ("/sd15.safetensors", "only 0/3 LoRA modules match this SDXL model"),
    ("/missing.safetensors", "404"),
    ("/page.safetensors", "HTML"),
])
def test_bad_lora_is_an_error_naming_it_and_the_next_job_is_unaffected(worker_handler, server, worker_cache_dir,
                                                                      path, fragment):
    plain = images_of(run_through_sdk(worker_handler, small_job(seed=43)))
    result = run_through_sdk(worker_handler, small_job(seed=43, loras=[
        {"path": server.url("/style.safetensors"), "scale": 1.0}, {"path": server.url(path), "name": "bad one"}]))
    assert "loras[1]" in result["error"] and fragment in result["error"], result["error"]
    assert "output" not in result
    assert cache_problems(worker_cache_dir) == []
    assert images_of(run_through_sdk(worker_handler, small_job(seed=43))) == plain


def test_malformed_lora_entries_are_reported_with_index_and_field_before_any_download(worker_handler, server):
    before = server.count("/unet.safetensors")
    result = run_through_sdk(worker_handler, small_job(loras=[
        server.url("/unet.safetensors"), {"path": "a/b", "scale": "strong"}, {"scale": 1}, 42]))
    assert "loras[1].scale" in result["error"] and "loras[2]" in result["error"] and "loras[3]" in result["error"]
    assert server.count("/unet.safetensors") == before


def test_preloaded_loras_are_in_ram_before_the_first_job(worker_handler, server, tmp_path):
    worker = make_worker(cache_settings(tmp_path))
    worker.preload([server.url("/unet.safetensors")])
    output = asyncio.run(worker.run({"id": "after-preload", "input": small_job(
        loras=[server.url("/unet.safetensors")])}))
    assert output["loras"][0]["cache_hit"] is True and output["loras"][0]["ram_cache_hit"] is True
