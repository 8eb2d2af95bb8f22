"""The job input schema in the runpod SDK's validator format (``runpod.serverless.utils.rp_validator.validate``).

Backward compatible with RunPod's own SDXL worker: every field it accepts is accepted here with the same
default. The SDK checks unknown keys, required keys and types and fills in defaults; it skips a field's
``constraints`` whenever the value has the type of the default, so ``sdxl_worker.request.validation`` runs every
constraint itself. ``constraints`` never raise on a value of the wrong type, and ``describe`` says what the
constraint accepts, for the error message.

``ACTION_SCHEMAS``: the cache actions (``{"input": {"action": "list_loras"}}`` and the others), one schema per action,
checked with the same rigor (``sdxl_worker.store.actions``). A generation job has no ``action``.
"""

from __future__ import annotations

import math
from typing import Any

from sdxl_worker.generation.schedulers import COMFY_SAMPLERS, COMFY_SCHEDULES, SCHEDULER_NAMES, TIMESTEP_SPACINGS

SCHEDULERS = SCHEDULER_NAMES
MAX_PROMPT_CHARS = 10_000
IMAGE_FORMATS = ("png", "jpeg", "webp")
MAX_IMAGES = 4
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 64, 2048
ACTIONS = ("list_loras", "prefetch", "evict", "cache_stats")
MAX_ACTION_LORAS = 32
MAX_TIMESTEPS = 150


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a finite float, not a bool; ints of any size (``math.isfinite`` would overflow on huge ones)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _int_in(low: int, high: int):
    return lambda value: _is_int(value) and low <= value <= high


def _number_in(low: float, high: float):
    return lambda value: _is_number(value) and low <= value <= high


def _image_side(value: Any) -> bool:
    return _is_int(value) and MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE and value % 8 == 0


def _text(max_chars: int):
    return lambda value: isinstance(value, str) and len(value) <= max_chars


def _descending(item):
    """A list of 1..MAX_TIMESTEPS values each passing ``item``, strictly decreasing."""
    def check(value: Any) -> bool:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_TIMESTEPS or not all(map(item, value)):
            return False
        return all(later < earlier for earlier, later in zip(value, value[1:]))

    return check


def _optional(check):
    return lambda value: value is None or check(value)


INPUT_SCHEMA: dict[str, dict[str, Any]] = {
    "prompt": {
        "type": str,
        "required": True,
        "constraints": lambda value: _text(MAX_PROMPT_CHARS)(value) and value.strip() != "",
        "describe": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
    },
    "negative_prompt": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": _optional(_text(MAX_PROMPT_CHARS)),
        "describe": f"a string of at most {MAX_PROMPT_CHARS} characters",
    },
    "height": {
        "type": int,
        "required": False,
        "default": 1024,
        "constraints": _image_side,
        "describe": f"an integer multiple of 8 within {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}",
    },
    "width": {
        "type": int,
        "required": False,
        "default": 1024,
        "constraints": _image_side,
        "describe": f"an integer multiple of 8 within {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}",
    },
    "seed": {
        "type": int,
        "required": False,
        "default": None,
        "constraints": _optional(_int_in(0, 2**63 - 1)),
        "describe": "an integer within 0..2**63-1 (random when absent)",
    },
    "scheduler": {
        "type": str,
        "required": False,
        "default": "DDIM",
        # The name is resolved (with sampler_name) by request.validation, against generation.schedulers' table.
        "constraints": lambda value: isinstance(value, str),
        "describe": "one of " + ", ".join(SCHEDULERS) + "; with sampler_name, one of " + ", ".join(COMFY_SCHEDULES),
    },
    "sampler_name": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": _optional(lambda value: isinstance(value, str)),
        "describe": "a ComfyUI sampler name: one of " + ", ".join(COMFY_SAMPLERS),
    },
    "timestep_spacing": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": _optional(lambda value: value in TIMESTEP_SPACINGS),
        "describe": "one of " + ", ".join(TIMESTEP_SPACINGS),
    },
    "timesteps": {
        "type": list,
        "required": False,
        "default": None,
        "constraints": _optional(_descending(_int_in(0, 999))),
        "describe": f"a list of 1..{MAX_TIMESTEPS} strictly decreasing integers within 0..999",
    },
    "sigmas": {
        "type": list,
        "required": False,
        "default": None,
        "constraints": _optional(_descending(_number_in(0.0, 1000.0))),
        "describe": f"a list of 1..{MAX_TIMESTEPS} strictly decreasing numbers within 0..1000",
    },
    "eta": {
        "type": float,
        "required": False,
        "default": None,
        "constraints": _optional(_number_in(0.0, 1.0)),
        "describe": "a number within 0..1",
    },
    "num_inference_steps": {
        "type": int,
        "required": False,
        "default": 25,
        "constraints": _int_in(1, 150),
        "describe": "an integer within 1..150",
    },
    "refiner_inference_steps": {
        "type": int,
        "required": False,
        "default": 50,
        "constraints": _int_in(1, 150),
        "describe": "an integer within 1..150",
    },
    "guidance_scale": {
        "type": float,
        "required": False,
        "default": 7.5,
        "constraints": _number_in(0.0, 50.0),
        "describe": "a number within 0..50",
    },
    "strength": {
        "type": float,
        "required": False,
        "default": 0.3,
        "constraints": lambda value: _is_number(value) and 0.0 < value <= 1.0,
        "describe": "a number greater than 0 and at most 1",
    },
    "image_url": {
        "type": str,
        "required": False,
        "default": None,
        "constraints": _optional(_text(20_000_000)),
        "describe": "an http(s) URL or a data:image/... URI",
    },
    "num_images": {
        "type": int,
        "required": False,
        "default": 1,
        "constraints": _int_in(1, MAX_IMAGES),
        "describe": f"an integer within 1..{MAX_IMAGES}",
    },
    "high_noise_frac": {
        "type": float,
        "required": False,
        "default": None,
        "constraints": _optional(lambda value: _is_number(value) and 0.0 < value < 1.0),
        "describe": "a number strictly between 0 and 1",
    },
    "loras": {
        "type": list,
        "required": False,
        "default": None,
        "describe": "a list of LoRA sources (strings) or objects with path and scale",
    },
    "append_trigger_words": {
        "type": bool,
        "required": False,
        "default": False,
        "constraints": lambda value: isinstance(value, bool),
        "describe": "true or false",
    },
    "clip_skip": {
        "type": int,
        "required": False,
        "default": None,
        "constraints": _optional(_int_in(1, 12)),
        "describe": "an integer within 1..12 (A1111/Civitai counting: 2 is SDXL's usual layer)",
    },
    "image_format": {
        "type": str,
        "required": False,
        "default": "png",
        "constraints": lambda value: value in IMAGE_FORMATS,
        "describe": "one of " + ", ".join(IMAGE_FORMATS),
    },
    "image_quality": {
        "type": int,
        "required": False,
        "default": None,
        "constraints": _optional(_int_in(1, 100)),
        "describe": "an integer within 1..100 (jpeg and webp only)",
    },
}

_ACTION = {
    "type": str,
    "required": True,
    "constraints": lambda value: value in ACTIONS,
    "describe": "one of " + ", ".join(ACTIONS),
}
_ACTION_LORAS = {
    "type": list,
    "required": True,
    "constraints": lambda value: isinstance(value, list) and 1 <= len(value) <= MAX_ACTION_LORAS,
    "describe": f"a list of 1..{MAX_ACTION_LORAS} LoRA entries (the forms of a job's loras, aliases included)",
}
ACTION_SCHEMAS: dict[str, dict[str, dict[str, Any]]] = {
    "list_loras": {"action": _ACTION},
    "cache_stats": {"action": _ACTION},
    "prefetch": {"action": _ACTION, "loras": _ACTION_LORAS},
    "evict": {"action": _ACTION, "loras": _ACTION_LORAS},
}
