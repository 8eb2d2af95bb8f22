"""Step 1 of a job: turn the raw ``input`` into typed parameters, or one error naming every bad field.

LoRAs come from the ``loras`` list and from ``<lora:NAME:WEIGHT>`` tags in ``prompt`` (``request.prompt_tags``), both
resolved through ``LORA_ALIASES``; ``JobParams.prompt`` is the prompt the model sees, tags removed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from runpod.serverless.utils.rp_validator import validate

from sdxl_worker.errors import InputError
from sdxl_worker.generation.schedulers import SchedulerSpec, accepts, resolve
from sdxl_worker.request.entries import Aliases, LoraRequest, parse_lora_requests
from sdxl_worker.request.prompt_tags import extract_lora_tags, merge_tag_requests, negative_prompt_errors
from sdxl_worker.request.schema import INPUT_SCHEMA

_SDK_RULE_KEYS = ("type", "required", "default")
_MAX_SHOWN_VALUE = 60
Schema = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class JobParams:
    """A validated generation job. ``seed`` is None when the caller left it to the worker."""

    prompt: str
    negative_prompt: str | None = None
    height: int = 1024
    width: int = 1024
    seed: int | None = None
    scheduler: str = "DDIM"
    num_inference_steps: int = 25
    refiner_inference_steps: int = 50
    guidance_scale: float = 7.5
    strength: float = 0.3
    image_url: str | None = None
    num_images: int = 1
    high_noise_frac: float | None = None
    loras: list[LoraRequest] = field(default_factory=list)
    append_trigger_words: bool = False
    clip_skip: int | None = None
    image_format: str = "png"
    image_quality: int | None = None
    sampler_name: str | None = None
    timestep_spacing: str | None = None
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    eta: float | None = None

    @property
    def scheduler_spec(self) -> SchedulerSpec:
        """The diffusers scheduler class and overrides that ``scheduler`` (and ``sampler_name``) name."""
        spec, error = resolve(self.scheduler, self.sampler_name)
        if spec is None:
            raise InputError(f"Invalid input: {error}")
        return spec


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


def _sdk_schema(schema: Schema) -> Schema:
    """The schema as the SDK sees it: its own rule keys only (constraints are checked here, once)."""
    return {name: {key: rules[key] for key in _SDK_RULE_KEYS if key in rules} for name, rules in schema.items()}


def _float_overflow_errors(raw: dict[str, Any], schema: Schema) -> dict[str, str]:
    """Float fields holding an int beyond float range (the SDK's float() would raise there): field -> error."""
    errors = {}
    for name, rules in schema.items():
        value = raw.get(name)
        if rules["type"] is float and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > sys.float_info.max:
                errors[name] = f"{name}: must be {rules['describe']}, got a number too large"
    return errors


def _constraint_errors(values: dict[str, Any], schema: Schema) -> list[str]:
    errors = []
    for name, rules in schema.items():
        check = rules.get("constraints")
        if check is not None and name in values and not check(values[name]):
            errors.append(f"{name}: must be {rules['describe']}, got {_shown(values[name])}")
    return errors


def require_object(raw: Any) -> dict[str, Any]:
    """``raw`` when it is a JSON object, else ``InputError``."""
    if not isinstance(raw, dict):
        raise InputError(f"Invalid input: input must be a JSON object, got {type(raw).__name__}")
    return raw


def raise_if_any(errors: list[str]) -> None:
    """One ``InputError`` listing every problem (each once), if there are any."""
    if errors:
        raise InputError("Invalid input: " + "; ".join(dict.fromkeys(errors)))


def check_fields(raw: dict[str, Any], schema: Schema) -> tuple[dict[str, Any], list[str]]:
    """``raw`` against ``schema``: the SDK's checks (unknown keys, required, types, defaults), then every constraint.

    Returns ``(values with defaults filled in, errors)``.
    """
    overflows = _float_overflow_errors(raw, schema)
    checkable = {name: value for name, value in raw.items() if name not in overflows}
    checked = validate(checkable, _sdk_schema(schema))
    values = checked.get("validated_input", checkable)
    return values, [*overflows.values(), *checked.get("errors", []), *_constraint_errors(values, schema)]


def scheduler_errors(values: dict[str, Any]) -> list[str]:
    """The scheduler name (or ComfyUI pair) resolved, and an explicit ``timesteps``/``sigmas`` list checked against
    it: one is allowed, for text-to-image, where the scheduler takes it."""
    if not isinstance(values.get("scheduler"), str) or not isinstance(values.get("sampler_name") or "", str):
        return []
    spec, error = resolve(values["scheduler"], values.get("sampler_name"))
    if spec is None:
        return [error]
    errors = []
    given = [name for name in ("timesteps", "sigmas") if values.get(name) is not None]
    if len(given) == 2:
        errors.append("timesteps, sigmas: give one of them, not both")
    for name in given:
        if values.get("image_url") is not None:
            errors.append(f"{name}: not allowed with image_url (it sets the schedule of text-to-image only)")
        if not accepts(spec, name):
            errors.append(f"{name}: scheduler {values['scheduler']} ({spec.class_name}) does not take {name}")
    return errors


def validate_job_input(raw: Any, max_loras: int, aliases: Aliases | None = None) -> JobParams:
    """Validate a job's ``input`` against ``INPUT_SCHEMA`` and the LoRA rules; raise ``InputError`` listing all
    problems.

    ``aliases`` (``LORA_ALIASES``) resolve names in ``loras`` and in prompt tags.
    """
    values, errors = check_fields(require_object(raw), INPUT_SCHEMA)
    prompt, tags = values.get("prompt"), []
    if INPUT_SCHEMA["prompt"]["constraints"](prompt):
        prompt, tags = extract_lora_tags(prompt, errors)
    if isinstance(values.get("negative_prompt"), str):
        errors += negative_prompt_errors(values["negative_prompt"])
    listed, lora_errors = parse_lora_requests(values.get("loras"), max_loras, aliases)
    errors += lora_errors
    errors += scheduler_errors(values)
    listed_count = len(values["loras"]) if isinstance(values.get("loras"), list) else 0
    loras = merge_tag_requests(listed, tags, listed_count, max_loras, aliases or {}, errors)
    if values.get("image_quality") is not None and values.get("image_format") == "png":
        errors.append("image_quality: applies to jpeg and webp only, not png")
    raise_if_any(errors)
    params = {name: values[name] for name in INPUT_SCHEMA if name not in ("loras", "prompt")}
    if params["sigmas"] is not None:
        params["sigmas"] = [float(sigma) for sigma in params["sigmas"]]
    for name in ("guidance_scale", "strength", "high_noise_frac", "eta"):
        if params[name] is not None:
            params[name] = float(params[name])
    return JobParams(prompt=prompt, **params, loras=loras)
