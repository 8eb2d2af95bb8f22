"""Step 1 of a job: turn the raw ``input`` into typed parameters, or one error naming every bad field."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from runpod.serverless.utils.rp_validator import validate

from schemas import INPUT_SCHEMA
from sdxl_worker.errors import InputError
from sdxl_worker.lora.requests import LoraRequest, parse_lora_requests

_SDK_RULE_KEYS = ("type", "required", "default")
_MAX_SHOWN_VALUE = 60


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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


def _sdk_schema() -> dict[str, dict[str, Any]]:
    """The schema as the SDK sees it: its own rule keys only (constraints are checked here, once)."""
    return {name: {key: rules[key] for key in _SDK_RULE_KEYS if key in rules} for name, rules in INPUT_SCHEMA.items()}


def _float_overflow_errors(raw: dict[str, Any]) -> dict[str, str]:
    """Float fields holding an int beyond float range (the SDK's float() would raise there): field -> error."""
    errors = {}
    for name, rules in INPUT_SCHEMA.items():
        value = raw.get(name)
        if rules["type"] is float and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > sys.float_info.max:
                errors[name] = f"{name}: must be {rules['describe']}, got a number too large"
    return errors


def _constraint_errors(values: dict[str, Any]) -> list[str]:
    errors = []
    for name, rules in INPUT_SCHEMA.items():
        check = rules.get("constraints")
        if check is not None and name in values and not check(values[name]):
            errors.append(f"{name}: must be {rules['describe']}, got {_shown(values[name])}")
    return errors


def validate_job_input(raw: Any, max_loras: int) -> JobParams:
    """Validate a job's ``input`` against ``INPUT_SCHEMA`` and the LoRA rules; raise ``InputError`` listing all problems."""
    if not isinstance(raw, dict):
        raise InputError(f"Invalid input: input must be a JSON object, got {type(raw).__name__}")
    overflows = _float_overflow_errors(raw)
    checkable = {name: value for name, value in raw.items() if name not in overflows}
    checked = validate(checkable, _sdk_schema())
    errors = [*overflows.values(), *checked.get("errors", [])]
    values = checked.get("validated_input", checkable)
    errors += _constraint_errors(values)
    loras: list[LoraRequest] = []
    if values.get("loras") is not None:
        loras, lora_errors = parse_lora_requests(values["loras"], max_loras)
        errors += lora_errors
    if errors:
        raise InputError("Invalid input: " + "; ".join(dict.fromkeys(errors)))
    params = {name: values[name] for name in INPUT_SCHEMA if name != "loras"}
    for name in ("guidance_scale", "strength", "high_noise_frac"):
        if params[name] is not None:
            params[name] = float(params[name])
    return JobParams(**params, loras=loras)
