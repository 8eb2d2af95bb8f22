"""Step 4 of a job: run the SDXL pipelines for validated parameters and return PIL images.

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
from sdxl_worker.generation.schedulers import make_scheduler
from sdxl_worker.request.validation import JobParams

StepCallback = Callable[[int, int], None]

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
    base_steps = len(params.timesteps or params.sigmas or []) or params.num_inference_steps
    if pipes.refiner is None:
        return base_steps, 0
    if params.high_noise_frac is not None:
        base = int(round(base_steps * params.high_noise_frac))
        refined = params.refiner_inference_steps
        return base, refined - int(round(refined * params.high_noise_frac))
    return base_steps, max(1, int(params.refiner_inference_steps * params.strength))


def first_unet(pipes: Pipelines, init_image: Image.Image | None) -> torch.nn.Module:
    """The UNet that denoises first: the refiner's for img2img when there is one, else the base model's (which the
    base img2img pipeline shares)."""
    return pipes.refiner.unet if init_image is not None and pipes.refiner is not None else pipes.base.unet


@torch.inference_mode()
def generate(
    pipes: Pipelines, params: JobParams, seed: int, init_image: Image.Image | None, on_step: StepCallback
) -> list[Image.Image]:
    """Generate ``params.num_images`` images with ``seed``; ``on_step(i, n)`` is called after each denoising step."""
    base_steps, refiner_steps = _planned_steps(params, pipes)
    total = base_steps + refiner_steps
    shared: dict[str, Any] = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "guidance_scale": params.guidance_scale,
        "generator": torch.Generator(device=pipes.device).manual_seed(seed),
        **({"eta": params.eta} if params.eta is not None else {}),
    }
    spec = params.scheduler_spec
    first = {**shared, "num_images_per_prompt": params.num_images,  # the first pipeline call, whichever it is
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
        image=base_output,
        num_inference_steps=params.refiner_inference_steps,
        callback_on_step_end=_step_reporter(on_step, base_steps, total),
        **refiner_args,
    ).images
