"""Step 4 of a job: run the SDXL pipelines for validated parameters and return PIL images.

- No ``image_url``, no refiner: the base pipeline alone.
- No ``image_url``, with a refiner: the base denoises (up to ``high_noise_frac`` when given) and hands its latents to
  the refiner (from ``high_noise_frac``, else as img2img at ``strength``), as RunPod's SDXL worker does.
- ``image_url``: img2img at ``strength`` through the refiner (``refiner_inference_steps``) when there is one, else
  through the base model's img2img pipeline (``num_inference_steps``).
Every job gets a fresh scheduler built from the config loaded at start, so no scheduler state crosses jobs.
``first_unet`` names the UNet that denoises first (a job's LoRAs can load until its first call).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)
from PIL import Image

from sdxl_worker.generation.models import Pipelines
from sdxl_worker.generation.prompt_encoding import prompt_arguments
from sdxl_worker.request.validation import JobParams

StepCallback = Callable[[int, int], None]

SCHEDULER_CLASSES = {
    "PNDM": PNDMScheduler,
    "KLMS": LMSDiscreteScheduler,
    "DDIM": DDIMScheduler,
    "K_EULER": EulerDiscreteScheduler,
    "K_EULER_ANCESTRAL": EulerAncestralDiscreteScheduler,
    "DPMSolverMultistep": DPMSolverMultistepScheduler,
    "DPMSolverSinglestep": DPMSolverSinglestepScheduler,
}


# PNDM's Runge-Kutta warm-up breaks below a few steps; Stable Diffusion's own configs skip it, and so do we.
SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {"PNDM": {"skip_prk_steps": True}}


def make_scheduler(name: str, config: dict[str, Any]):
    """A new scheduler of the named kind (worker-sdxl's names) from the model's scheduler config."""
    return SCHEDULER_CLASSES[name].from_config(config, **SCHEDULER_OVERRIDES.get(name, {}))


def _step_reporter(on_step: StepCallback, offset: int, total: int):
    def callback(pipe, step: int, timestep, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(offset + step + 1, total)
        return kwargs

    return callback


def _planned_steps(params: JobParams, pipes: Pipelines) -> tuple[int, int]:
    """Steps the base and the refiner will run (diffusers' own arithmetic), for step i of N progress."""
    if params.image_url is not None:
        steps = params.refiner_inference_steps if pipes.refiner is not None else params.num_inference_steps
        return 0, max(1, int(steps * params.strength))
    if pipes.refiner is None:
        return params.num_inference_steps, 0
    if params.high_noise_frac is not None:
        base = int(round(params.num_inference_steps * params.high_noise_frac))
        refined = params.refiner_inference_steps
        return base, refined - int(round(refined * params.high_noise_frac))
    return params.num_inference_steps, max(1, int(params.refiner_inference_steps * params.strength))


def first_unet(pipes: Pipelines, init_image: Image.Image | None) -> torch.nn.Module:
    """The UNet that denoises first: the refiner's for img2img when there is one, else the base model's (which the
    base img2img pipeline shares)."""
    return pipes.refiner.unet if init_image is not None and pipes.refiner is not None else pipes.base.unet


def _prompts(pipe: Any, params: JobParams) -> dict[str, Any]:
    """The prompt arguments for ``pipe``: the strings, or A1111-style embeddings (``generation.prompt_encoding``)."""
    return prompt_arguments(pipe, params.prompt, params.negative_prompt, params.clip_skip)


@torch.inference_mode()
def generate(
    pipes: Pipelines, params: JobParams, seed: int, init_image: Image.Image | None, on_step: StepCallback
) -> list[Image.Image]:
    """Generate ``params.num_images`` images with ``seed``; ``on_step(i, n)`` is called after each denoising step."""
    base_steps, refiner_steps = _planned_steps(params, pipes)
    total = base_steps + refiner_steps
    shared: dict[str, Any] = {
        "guidance_scale": params.guidance_scale,
        "generator": torch.Generator(device=pipes.device).manual_seed(seed),
    }
    first_pipe = pipes.refiner if init_image is not None and pipes.refiner is not None else pipes.base
    first = {**shared, **_prompts(first_pipe, params),  # the first pipeline call, whichever it is
             "num_images_per_prompt": params.num_images,
             "callback_on_step_end": _step_reporter(on_step, 0, total)}
    if init_image is not None:
        if pipes.refiner is not None:
            pipe, steps = pipes.refiner, params.refiner_inference_steps
            pipe.scheduler = make_scheduler(params.scheduler, pipes.refiner_scheduler_config)
        else:
            pipe, steps = pipes.img2img, params.num_inference_steps
            pipe.scheduler = make_scheduler(params.scheduler, pipes.scheduler_config)
        return pipe(**first, image=init_image, strength=params.strength, num_inference_steps=steps).images
    pipes.base.scheduler = make_scheduler(params.scheduler, pipes.scheduler_config)
    base_output = pipes.base(
        **first,
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        denoising_end=params.high_noise_frac if pipes.refiner is not None else None,
        output_type="latent" if pipes.refiner is not None else "pil",
    ).images
    if pipes.refiner is None:
        return base_output
    pipes.refiner.scheduler = make_scheduler(params.scheduler, pipes.refiner_scheduler_config)
    refiner_args: dict[str, Any] = (
        {"denoising_start": params.high_noise_frac} if params.high_noise_frac is not None
        else {"strength": params.strength}
    )
    return pipes.refiner(
        **shared,
        **_prompts(pipes.refiner, params),
        image=base_output,
        num_inference_steps=params.refiner_inference_steps,
        callback_on_step_end=_step_reporter(on_step, base_steps, total),
        **refiner_args,
    ).images
