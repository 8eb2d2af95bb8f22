"""Schedulers by name (worker-sdxl, A1111, ComfyUI pairs) and the fast-LoRA fields, on the embedded tiny model.

Each name must give the bytes of a direct diffusers call with the configuration the README's table documents; each
README preset runs; requests that use no new option keep the bytes they had before the scheduler table
(``tests/data/image_hashes_before_schedulers.json``, computed on main with the same jobs).
"""

from __future__ import annotations

import hashlib
import json
import re

import diffusers
import numpy as np
import pytest
import torch

import handler
from sdxl_worker.generation.prompt_encoding import needs_encoding
from sdxl_worker.generation.schedulers import A1111, COMFY_SAMPLERS, COMFY_SCHEDULES, WORKER_SDXL
from tests.support.worker_env import (PROJECT_ROOT, SMALL_JOB, image_from_png, png_from_data_uri, run_through_sdk,
                                      small_job)

README = (PROJECT_ROOT / "README.md").read_text()
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]+)` \| `(\{.*\})` \|$", re.MULTILINE)


def readme_table(marker: str) -> str:
    start = README.index(f"<!-- {marker} -->")
    return README[start:README.index("\n\n", start)]


SCHEDULER_ROWS = {name: (cls, json.loads(overrides))
                  for name, cls, overrides in ROW.findall(readme_table("scheduler table"))}
PRESETS = [json.loads(cell) for cell in re.findall(r"\| `(\{.*\})` \|$", readme_table("presets"), re.MULTILINE)]


def pixels(output: dict) -> list[bytes]:
    assert "error" not in output, output
    return [image_from_png(png_from_data_uri(image)).tobytes() for image in output["output"]["images"]]


def direct(pipes, cls: str, overrides: dict, job: dict, **call) -> list[bytes]:
    """The diffusers call, written out: the worker's own pipeline, a scheduler built as documented."""
    pipe = pipes.base
    pipe.scheduler = getattr(diffusers, cls).from_config(pipes.scheduler_config, **overrides)
    images = pipe(prompt=job["prompt"], negative_prompt=job.get("negative_prompt"), height=job["height"],
                  width=job["width"], num_inference_steps=job["num_inference_steps"],
                  guidance_scale=job.get("guidance_scale", 7.5),
                  generator=torch.Generator(device=pipes.device).manual_seed(job["seed"]), **call).images
    return [np.asarray(image).tobytes() for image in images]


def test_the_readme_table_is_the_code_table():
    code = {name: (spec.class_name, spec.overrides) for name, spec in {**WORKER_SDXL, **A1111}.items()}
    assert SCHEDULER_ROWS == code
    comfy = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|$", readme_table("comfy samplers"), re.MULTILINE))
    assert comfy == COMFY_SAMPLERS
    schedules = {name: json.loads(over) for name, over in
                 re.findall(r"^\| `(\w+)` \| `(\{.*\})` \|$", readme_table("comfy schedules"), re.MULTILINE)}
    assert schedules == COMFY_SCHEDULES


@pytest.mark.parametrize("name", sorted(SCHEDULER_ROWS))
def test_every_scheduler_name_gives_the_bytes_of_the_documented_diffusers_call(worker_handler, pipes, name):
    job = small_job(scheduler=name, num_inference_steps=3, seed=7)
    ours = pixels(run_through_sdk(worker_handler, job))
    assert ours == direct(pipes, *SCHEDULER_ROWS[name], job)


def test_names_match_case_and_space_insensitively(worker_handler):
    job = small_job(num_inference_steps=2, seed=2)
    assert pixels(run_through_sdk(worker_handler, {**job, "scheduler": " dpm++2m  KARRAS"})) == \
        pixels(run_through_sdk(worker_handler, {**job, "scheduler": "DPM++ 2M Karras"}))


@pytest.mark.parametrize("sampler_name, schedule, same_as", [
    ("dpmpp_2m_sde", "karras", "DPM++ 2M SDE Karras"), ("euler_ancestral", "normal", "Euler a"),
    ("DPMPP_2M", "Karras", "DPM++ 2M Karras")])
def test_a_comfyui_pair_is_its_a1111_name(worker_handler, sampler_name, schedule, same_as):
    job = small_job(num_inference_steps=3, seed=4)
    pair = pixels(run_through_sdk(worker_handler, {**job, "sampler_name": sampler_name, "scheduler": schedule}))
    assert pair == pixels(run_through_sdk(worker_handler, {**job, "scheduler": same_as}))


@pytest.mark.parametrize("schedule", ["exponential", "sgm_uniform", "simple", "beta"])
def test_comfyui_schedules_give_the_documented_overrides(worker_handler, pipes, schedule):
    job = small_job(num_inference_steps=3, seed=5, sampler_name="euler", scheduler=schedule)
    assert pixels(run_through_sdk(worker_handler, job)) == \
        direct(pipes, "EulerDiscreteScheduler", COMFY_SCHEDULES[schedule], job)


@pytest.mark.parametrize("fields, message", [
    ({"scheduler": "Euler b"}, "scheduler: must be one of PNDM, KLMS, DDIM"),
    ({"scheduler": "DPM++ 3M SDE Karras"}, "scheduler: DPM++ 3M SDE Karras is not supported"),
    ({"sampler_name": "dpmpp_3m_sde", "scheduler": "karras"}, "sampler_name: dpmpp_3m_sde is not supported"),
    ({"sampler_name": "lcm", "scheduler": "karras"}, "LCMScheduler has no use_karras_sigmas"),
    ({"sampler_name": "euler", "scheduler": "DDIM"}, "scheduler: with sampler_name it must be one of normal"),
    ({"sampler_name": "nope", "scheduler": "normal"}, "sampler_name: must be one of euler"),
    ({"scheduler": "DDIM", "timesteps": [999, 499]}, "timesteps: scheduler DDIM (DDIMScheduler) does not take"),
    ({"scheduler": "Euler", "timesteps": [999], "sigmas": [14.6]}, "give one of them, not both"),
    ({"scheduler": "LCM", "timesteps": [499, 999]}, "timesteps: must be a list of 1..150 strictly decreasing"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing: must be one of leading, trailing, linspace"),
    ({"eta": 1.5}, "eta: must be a number within 0..1"),
    ({"scheduler": "LCM", "timesteps": [999], "image_url": "data:image/png;base64,AAAA"},
     "timesteps: not allowed with image_url"),
])
def test_bad_scheduler_fields_are_errors_naming_them(worker_handler, fields, message):
    result = run_through_sdk(worker_handler, small_job(**fields))
    assert "output" not in result and message in result["error"]


@pytest.mark.parametrize("preset", PRESETS, ids=[preset["scheduler"] for preset in PRESETS])
def test_each_readme_preset_runs(worker_handler, preset):
    (image,) = pixels(run_through_sdk(worker_handler, small_job(seed=9, **preset)))
    assert len(image) == 64 * 64 * 3


def test_dmd2_timesteps_give_the_bytes_of_the_diffusers_call(worker_handler, pipes):
    job = small_job(seed=3, scheduler="LCM", num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=0)
    assert pixels(run_through_sdk(worker_handler, job)) == \
        direct(pipes, "LCMScheduler", {}, job, timesteps=[999, 749, 499, 249])


def test_sigmas_and_spacing_and_eta_reach_the_scheduler(worker_handler, pipes):
    sigmas = [14.6, 6.0, 2.0, 0.5]
    job = small_job(seed=3, scheduler="Euler", num_inference_steps=4, sigmas=sigmas)
    ours = pixels(run_through_sdk(worker_handler, job))
    assert ours == direct(pipes, "EulerDiscreteScheduler", {}, job, sigmas=sigmas)
    job = small_job(seed=3, scheduler="TCD", num_inference_steps=4, eta=0.3, timestep_spacing="trailing")
    ours = pixels(run_through_sdk(worker_handler, job))
    assert ours == direct(pipes, "TCDScheduler", {"timestep_spacing": "trailing"}, job, eta=0.3)
    assert ours != pixels(run_through_sdk(worker_handler, {**job, "eta": 0.9}))


def test_guidance_zero_runs_one_unet_batch(worker_handler, pipes):
    batches = []
    hook = pipes.base.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        run_through_sdk(worker_handler, small_job(num_inference_steps=2, guidance_scale=0))
        run_through_sdk(worker_handler, small_job(num_inference_steps=2, guidance_scale=7.5))
    finally:
        hook.remove()
    assert batches == [1, 1, 2, 2]


def test_existing_requests_keep_their_bytes(worker_handler):
    reference = json.loads((PROJECT_ROOT / "tests/data/image_hashes_before_schedulers.json").read_text())
    jobs = {f"scheduler-{name}": small_job(scheduler=name, num_inference_steps=3, seed=11) for name in WORKER_SDXL}
    jobs["default"] = small_job(seed=5)
    jobs["guidance0"] = small_job(seed=5, guidance_scale=0.0, num_inference_steps=3)
    for test in json.loads((PROJECT_ROOT / ".runpod/tests.json").read_text())["tests"]:
        jobs["tests.json-" + test["name"]] = {**{k: v for k, v in test["input"].items() if k != "loras"},
                                              "height": 64, "width": 64}
    assert set(jobs) == set(reference)
    pipe = handler.get_worker().pipes.base
    for name, job in jobs.items():
        images = run_through_sdk(worker_handler, job)["output"]["images"]
        hashes = [hashlib.sha256(image.encode()).hexdigest() for image in images]
        if needs_encoding(pipe, job["prompt"], job.get("negative_prompt"), None):
            # Past 77 tokens on the tiny model's small-vocabulary tokenizer (95 for tests.json's first prompt): the
            # reference was cut at 77 tokens, the prompt is now encoded whole in chunks (test_prompt_encoding.py).
            assert hashes != reference[name], name
        else:
            assert hashes == reference[name], name
    assert not needs_encoding(pipe, SMALL_JOB["prompt"], SMALL_JOB["negative_prompt"], None)
