"""Job input validation: defaults compatible with worker-sdxl, every bad field named, all at once."""

from __future__ import annotations

import math

import pytest

from schemas import INPUT_SCHEMA, SCHEDULERS
from sdxl_worker.errors import InputError
from sdxl_worker.request.validation import JobParams, validate_job_input


def validated(**fields) -> JobParams:
    return validate_job_input({"prompt": "a cat", **fields}, max_loras=8)


def error_of(raw) -> str:
    with pytest.raises(InputError) as caught:
        validate_job_input(raw, max_loras=8)
    return str(caught.value)


def test_defaults_match_runpod_sdxl_worker():
    params = validated()
    assert (params.height, params.width, params.num_inference_steps, params.refiner_inference_steps) == (1024, 1024, 25, 50)
    assert (params.guidance_scale, params.strength, params.scheduler, params.num_images) == (7.5, 0.3, "DDIM", 1)
    assert params.seed is None and params.image_url is None and params.negative_prompt is None
    assert params.high_noise_frac is None and params.loras == []


def test_worker_sdxl_request_is_accepted_unchanged():
    request = {
        "prompt": "a dragon", "negative_prompt": "blurry", "height": 1024, "width": 1024,
        "num_inference_steps": 25, "refiner_inference_steps": 50, "guidance_scale": 7.5, "strength": 0.3,
        "high_noise_frac": 0.8, "seed": 1337, "scheduler": "K_EULER", "num_images": 1, "image_url": None,
    }
    params = validate_job_input(request, max_loras=8)
    assert params.seed == 1337 and params.high_noise_frac == 0.8 and params.scheduler == "K_EULER"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_known_scheduler_is_accepted(name):
    assert validated(scheduler=name).scheduler == name


def test_ints_are_accepted_for_float_fields():
    params = validated(guidance_scale=5, strength=1)
    assert isinstance(params.guidance_scale, float) and params.guidance_scale == 5.0


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("width", 1004, "width: must be an integer multiple of 8 within 64..2048"),
        ("height", 4096, "height: must be an integer multiple of 8 within 64..2048"),
        ("height", 32, "height: must be"),
        ("num_inference_steps", 0, "num_inference_steps: must be an integer within 1..150"),
        ("num_inference_steps", 151, "num_inference_steps"),
        ("refiner_inference_steps", -3, "refiner_inference_steps"),
        ("num_images", 5, "num_images: must be an integer within 1..4"),
        ("num_images", 0, "num_images"),
        ("scheduler", "EULER_MAGIC", "scheduler: must be one of PNDM"),
        ("guidance_scale", math.nan, "guidance_scale"),
        ("guidance_scale", math.inf, "guidance_scale"),
        ("strength", 0.0, "strength"),
        ("high_noise_frac", 1.5, "high_noise_frac"),
        ("seed", -1, "seed"),
        ("width", True, "width"),
        ("width", "1024", "width"),
        ("guidance_scale", 10**400, "guidance_scale"),
        ("prompt", "   ", "prompt: must be a non-empty string"),
        ("loras", "not-a-list", "loras"),
    ],
)
def test_bad_field_is_named(field, value, fragment):
    message = error_of({"prompt": "a cat", field: value})
    assert fragment in message


def test_unknown_field_is_an_error():
    assert "colour" in error_of({"prompt": "a cat", "colour": "red"})


def test_missing_prompt_is_an_error():
    assert "prompt" in error_of({"width": 512})


def test_every_problem_is_reported_at_once():
    message = error_of({"prompt": "a cat", "width": 1001, "num_images": 9, "scheduler": "nope", "extra": 1})
    for name in ("width", "num_images", "scheduler", "extra"):
        assert name in message


@pytest.mark.parametrize("raw", [None, [], "prompt", 42, [{"prompt": "x"}]])
def test_input_that_is_not_an_object(raw):
    assert "input must be a JSON object" in error_of(raw)


def test_every_schema_field_documents_its_constraint():
    for name, rules in INPUT_SCHEMA.items():
        assert rules.get("describe"), name
