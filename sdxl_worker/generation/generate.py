"""Step 5 of a job (generate): run the SDXL pipelines for validated parameters and return PIL images.

- No ``image_url``, no refiner: the base pipeline alone.
- No ``image_url``, with a refiner: the base denoises (up to ``high_noise_frac`` when given) and hands its latents to
  the refiner (from ``high_noise_frac``, else as img2img at ``strength``), as RunPod's SDXL worker does.
- ``image_url``: img2img at ``strength`` through the refiner (``refiner_inference_steps``) when there is one, else
  through the base model's img2img pipeline (``num_inference_steps``).
Every job gets a fresh scheduler (``generation.schedulers``) built from the config loaded at start, so no scheduler
state crosses jobs. An explicit ``timesteps`` or ``sigmas`` list goes to the base model's text-to-image call, ``eta`` to
every call (schedulers that take it: DDIM, TCD); ``guidance_scale`` at most 1 runs no CFG batch (diffusers' rule).
``first_unet`` names the UNet that denoises first (a job's LoRAs can load until its first call).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from sdxl_worker.generation.models import Pipelines
from sdxl_worker.generation.prompt_encoding import prompt_arguments
from sdxl_worker.generation.schedulers import make_scheduler
from sdxl_worker.request.validation import JobParams

StepCallback = Callable[[int, int], None]

def _step_reporter(on_step: StepCallback, offset: int, total: int):
    def callback(pipe, step: int, timestep, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(offset + step + 1, total)
        return kwargs

    return callback


def _strength_steps(steps: int, strength: float) -> int:
    """Steps an img2img call runs at ``strength`` (diffusers' ``get_timesteps``)."""
    return min(int(steps * strength), steps)


def _strength_field(params: JobParams, has_refiner: bool) -> str | None:
    """The steps field an img2img-at-``strength`` call of this job uses, or None when no call denoises by strength."""
    if params.image_url is not None:
        return "refiner_inference_steps" if has_refiner else "num_inference_steps"
    return "refiner_inference_steps" if has_refiner and params.high_noise_frac is None else None


def step_errors(params: JobParams, has_refiner: bool) -> list[str]:
    """Why a strength-based call of this job would run no denoising step (``int(steps * strength) == 0``), naming
    the fields and the smallest values that work; empty when every call runs at least one step."""
    field = _strength_field(params, has_refiner)
    if field is None:
        return []
    steps = getattr(params, field)
    if _strength_steps(steps, params.strength) >= 1:
        return []
    least_steps = next((n for n in range(steps, 151) if _strength_steps(n, params.strength) >= 1), None)
    remedy = f"{field} to at least {least_steps} or " if least_steps is not None else ""
    call = "img2img of image_url" if params.image_url is not None else "the refiner's img2img"
    return [f"strength: {call} at strength {params.strength:g} with {field} {steps} runs no denoising step "
            f"(int({steps} * {params.strength:g}) = 0); raise {remedy}strength to at least {1 / steps:.3g}"]


def _planned_steps(params: JobParams, pipes: Pipelines) -> tuple[int, int]:
    """Steps the base and the refiner will run (diffusers' own arithmetic), for step i of N progress."""
    if params.image_url is not None:
        steps = params.refiner_inference_steps if pipes.refiner is not None else params.num_inference_steps
        return 0, _strength_steps(steps, params.strength)
    base_steps = len(params.timesteps or params.sigmas or []) or params.num_inference_steps
    if pipes.refiner is None:
        return base_steps, 0
    if params.high_noise_frac is not None:
        base = int(round(base_steps * params.high_noise_frac))
        refined = params.refiner_inference_steps
        return base, refined - int(round(refined * params.high_noise_frac))
    return base_steps, _strength_steps(params.refiner_inference_steps, params.strength)


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
        **({"eta": params.eta} if params.eta is not None else {}),
    }
    spec = params.scheduler_spec
    first_pipe = pipes.refiner if init_image is not None and pipes.refiner is not None else pipes.base
    first = {**shared, **_prompts(first_pipe, params),  # the first pipeline call, whichever it is
             "num_images_per_prompt": params.num_images,
             "callback_on_step_end": _step_reporter(on_step, 0, total)}
    if init_image is not None:
        if pipes.refiner is not None:
            pipe, steps = pipes.refiner, params.refiner_inference_steps
            pipe.scheduler = make_scheduler(spec, pipes.refiner_scheduler_config, params.timestep_spacing)
        else:
            pipe, steps = pipes.img2img, params.num_inference_steps
            pipe.scheduler = make_scheduler(spec, pipes.scheduler_config, params.timestep_spacing)
        return pipe(**first, image=init_image, strength=params.strength, num_inference_steps=steps).images
    pipes.base.scheduler = make_scheduler(spec, pipes.scheduler_config, params.timestep_spacing)
    base_output = pipes.base(
        **first,
        height=params.height,
        width=params.width,
        num_inference_steps=params.num_inference_steps,
        **({"timesteps": params.timesteps} if params.timesteps is not None else {}),
        **({"sigmas": params.sigmas} if params.sigmas is not None else {}),
        denoising_end=params.high_noise_frac if pipes.refiner is not None else None,
        output_type="latent" if pipes.refiner is not None else "pil",
    ).images
    if pipes.refiner is None:
        return base_output
    pipes.refiner.scheduler = make_scheduler(spec, pipes.refiner_scheduler_config, params.timestep_spacing)
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
