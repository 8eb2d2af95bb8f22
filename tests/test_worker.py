"""The worker through the runpod SDK's own ``run_job`` on the embedded tiny SDXL: outputs, determinism, errors."""

from __future__ import annotations

import base64

import pytest

from schemas import SCHEDULERS
from tests.support.worker_env import image_from_png, png_from_data_uri, run_through_sdk, small_job


def test_job_returns_png_data_uris_seed_and_timings(worker_handler):
    result = run_through_sdk(worker_handler, small_job())
    assert "error" not in result, result.get("error")
    output = result["output"]
    assert len(output["images"]) == 1 and output["image_url"] == output["images"][0]
    image = image_from_png(png_from_data_uri(output["image_url"]))
    assert image.format == "PNG" and image.size == (64, 64)
    assert output["seed"] == 7
    assert {"validate", "generate", "encode"} <= set(output["timings"])
    assert not [phase for phase in output["timings"] if phase.startswith("lora")], "a job without LoRAs does no LoRA work"
    assert all(value >= 0 for value in output["timings"].values())
    assert "loras" not in output


def test_same_job_and_seed_give_the_same_bytes(worker_handler):
    first = run_through_sdk(worker_handler, small_job(seed=11))["output"]["images"][0]
    second = run_through_sdk(worker_handler, small_job(seed=11))["output"]["images"][0]
    other = run_through_sdk(worker_handler, small_job(seed=12))["output"]["images"][0]
    assert first == second
    assert first != other


def test_missing_seed_is_drawn_and_returned_so_the_image_can_be_reproduced(worker_handler):
    job = small_job()
    del job["seed"]
    output = run_through_sdk(worker_handler, job)["output"]
    assert isinstance(output["seed"], int) and output["seed"] >= 0
    again = run_through_sdk(worker_handler, small_job(seed=output["seed"]))["output"]
    assert again["images"] == output["images"]


def test_several_images_per_job(worker_handler):
    output = run_through_sdk(worker_handler, small_job(num_images=2))["output"]
    assert len(output["images"]) == 2 and output["images"][0] != output["images"][1]


def test_prompt_changes_the_image(worker_handler):
    first = run_through_sdk(worker_handler, small_job(prompt="a red boat"))["output"]["images"][0]
    second = run_through_sdk(worker_handler, small_job(prompt="a snowy mountain"))["output"]["images"][0]
    assert first != second


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_generates(worker_handler, scheduler):
    output = run_through_sdk(worker_handler, small_job(scheduler=scheduler, num_inference_steps=2))["output"]
    assert image_from_png(png_from_data_uri(output["images"][0])).size == (64, 64)


def test_scheduler_choice_leaves_no_trace_on_the_next_job(worker_handler):
    reference = run_through_sdk(worker_handler, small_job(seed=3))["output"]["images"]
    run_through_sdk(worker_handler, small_job(seed=3, scheduler="DPMSolverMultistep"))
    assert run_through_sdk(worker_handler, small_job(seed=3))["output"]["images"] == reference


def test_img2img_from_a_data_uri(worker_handler):
    source = run_through_sdk(worker_handler, small_job(height=72, width=64))["output"]["images"][0]
    output = run_through_sdk(worker_handler, small_job(image_url=source, strength=0.5))["output"]
    image = image_from_png(png_from_data_uri(output["images"][0]))
    assert image.size == (64, 72)
    assert output["images"][0] != source


def test_bad_input_is_an_error_naming_the_fields_and_the_worker_keeps_serving(worker_handler):
    result = run_through_sdk(worker_handler, {"prompt": "x", "width": 1001, "num_images": 9, "sampler": "x"})
    assert "width" in result["error"] and "num_images" in result["error"] and "sampler" in result["error"]
    assert "Traceback" not in result["error"] and "output" not in result
    assert "images" in run_through_sdk(worker_handler, small_job())["output"]


def test_input_that_is_not_an_object_is_an_error(worker_handler):
    result = run_through_sdk(worker_handler, ["prompt"])
    assert "input must be a JSON object" in result["error"]


def test_bad_image_url_is_a_clear_error_before_generation(worker_handler):
    bad = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    result = run_through_sdk(worker_handler, small_job(image_url=bad))
    assert "image_url" in result["error"]
    result = run_through_sdk(worker_handler, small_job(image_url="file:///etc/passwd"))
    assert "image_url" in result["error"]
