"""The scheduler table: every accepted sampler name -> a diffusers scheduler class and its config overrides.

Three kinds of names, matched case- and space-insensitively (``scheduler_key``):

- worker-sdxl's names (``DDIM``, ``K_EULER``, ...), unchanged;
- A1111's sampler names as users paste them (``DPM++ 2M Karras``, ``Euler a``, ...), from diffusers' own table of the
  A1111/k-diffusion correspondence (``docs/source/en/api/schedulers/overview.md``), plus ``UniPC``, ``LCM``, ``TCD``;
- ComfyUI's pair (``sampler_name`` ``dpmpp_2m_sde`` with ``scheduler`` ``karras``): the sampler's entry plus the
  schedule's overrides, from the same page's "noise schedules" table. A pair whose scheduler class has no such
  option is refused.

Classes are named, not imported, so the request stage reads the table without loading diffusers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class (by name) and the config values that override the model's."""

    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)


KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}

# worker-sdxl's names (PNDM's Runge-Kutta warm-up breaks below a few steps; Stable Diffusion's configs skip it).
WORKER_SDXL = {
    "PNDM": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "KLMS": SchedulerSpec("LMSDiscreteScheduler"),
    "DDIM": SchedulerSpec("DDIMScheduler"),
    "K_EULER": SchedulerSpec("EulerDiscreteScheduler"),
    "K_EULER_ANCESTRAL": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "DPMSolverMultistep": SchedulerSpec("DPMSolverMultistepScheduler"),
    "DPMSolverSinglestep": SchedulerSpec("DPMSolverSinglestepScheduler"),
}
A1111 = {
    "DPM++ 2M": SchedulerSpec("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SchedulerSpec("DPMSolverMultistepScheduler", KARRAS),
    "DPM++ 2M SDE": SchedulerSpec("DPMSolverMultistepScheduler", SDE),
    "DPM++ 2M SDE Karras": SchedulerSpec("DPMSolverMultistepScheduler", {**KARRAS, **SDE}),
    "DPM++ SDE": SchedulerSpec("DPMSolverSinglestepScheduler"),
    "DPM++ SDE Karras": SchedulerSpec("DPMSolverSinglestepScheduler", KARRAS),
    "DPM2": SchedulerSpec("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SchedulerSpec("KDPM2DiscreteScheduler", KARRAS),
    "DPM2 a": SchedulerSpec("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SchedulerSpec("KDPM2AncestralDiscreteScheduler", KARRAS),
    "Euler": SchedulerSpec("EulerDiscreteScheduler"),
    "Euler a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "Heun": SchedulerSpec("HeunDiscreteScheduler"),
    "LMS": SchedulerSpec("LMSDiscreteScheduler"),
    "LMS Karras": SchedulerSpec("LMSDiscreteScheduler", KARRAS),
    "UniPC": SchedulerSpec("UniPCMultistepScheduler"),
    "LCM": SchedulerSpec("LCMScheduler"),
    "TCD": SchedulerSpec("TCDScheduler"),
}
# Names users paste that diffusers has no documented exact equivalent for: refused by name, with the reason.
REFUSED = {
    "DPM++ 3M SDE Karras": "diffusers documents no equivalent of A1111's DPM++ 3M SDE",
    "DPM++ 3M SDE": "diffusers documents no equivalent of A1111's DPM++ 3M SDE",
    "DPM++ 2S a": "diffusers documents no equivalent (only 'very similar to DPMSolverSinglestepScheduler')",
    "DPM++ 2S a Karras": "diffusers documents no equivalent (only 'very similar to DPMSolverSinglestepScheduler')",
    "dpmpp_3m_sde": "diffusers documents no equivalent of DPM++ 3M SDE",
    "dpmpp_2s_ancestral": "diffusers documents no equivalent of DPM++ 2S a",
}
# ComfyUI's sampler_name -> its A1111 name; its scheduler -> config overrides.
COMFY_SAMPLERS = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "lcm": "LCM",
    "tcd": "TCD",
}
COMFY_SCHEDULES: dict[str, dict[str, Any]] = {
    "normal": {},
    "karras": KARRAS,
    "exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "beta": {"timestep_spacing": "linspace", "use_beta_sigmas": True},
}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def scheduler_key(name: str) -> str:
    """``name`` as matched: lower case, spaces removed."""
    return "".join(name.split()).lower()


SCHEDULERS = {scheduler_key(name): spec for name, spec in {**WORKER_SDXL, **A1111}.items()}
SCHEDULER_NAMES = tuple(dict.fromkeys([*WORKER_SDXL, *A1111]))
REFUSED_BY_KEY = {scheduler_key(name): (name, why) for name, why in REFUSED.items()}
COMFY_SAMPLER_KEYS = {scheduler_key(name): name for name in COMFY_SAMPLERS}
COMFY_SCHEDULE_KEYS = {scheduler_key(name): name for name in COMFY_SCHEDULES}


def scheduler_class(class_name: str) -> type:
    """The diffusers scheduler class named ``class_name``."""
    import diffusers

    return getattr(diffusers, class_name)


def _unsupported(spec: SchedulerSpec) -> list[str]:
    accepted = inspect.signature(scheduler_class(spec.class_name).__init__).parameters
    return [option for option in spec.overrides if option not in accepted]


def resolve(scheduler: str, sampler_name: str | None = None) -> tuple[SchedulerSpec | None, str | None]:
    """The spec for ``scheduler`` (an A1111 or worker-sdxl name), or for the ComfyUI pair ``sampler_name`` +
    ``scheduler`` (a ComfyUI schedule); ``(None, error)`` when it is unknown, refused or unsupported."""
    if sampler_name is None:
        key = scheduler_key(scheduler)
        if key in REFUSED_BY_KEY:
            return None, "scheduler: {} is not supported: {}".format(*REFUSED_BY_KEY[key])
        if key not in SCHEDULERS:
            return None, f"scheduler: must be one of {', '.join(SCHEDULER_NAMES)} (or a ComfyUI schedule with " \
                         f"sampler_name), got {scheduler!r}"
        return SCHEDULERS[key], None
    sampler_key = scheduler_key(sampler_name)
    if sampler_key in REFUSED_BY_KEY:
        return None, "sampler_name: {} is not supported: {}".format(*REFUSED_BY_KEY[sampler_key])
    if sampler_key not in COMFY_SAMPLER_KEYS:
        return None, f"sampler_name: must be one of {', '.join(COMFY_SAMPLERS)}, got {sampler_name!r}"
    schedule_key = scheduler_key(scheduler)
    if schedule_key not in COMFY_SCHEDULE_KEYS:
        return None, (f"scheduler: with sampler_name it must be one of {', '.join(COMFY_SCHEDULES)}, "
                      f"got {scheduler!r}")
    base = SCHEDULERS[scheduler_key(COMFY_SAMPLERS[COMFY_SAMPLER_KEYS[sampler_key]])]
    spec = SchedulerSpec(base.class_name, {**base.overrides, **COMFY_SCHEDULES[COMFY_SCHEDULE_KEYS[schedule_key]]})
    missing = _unsupported(spec)
    if missing:
        return None, (f"scheduler: {sampler_name} with {scheduler} is not supported: {spec.class_name} has no "
                      f"{', '.join(missing)}")
    return spec, None


def accepts(spec: SchedulerSpec, argument: str) -> bool:
    """Whether the spec's ``set_timesteps`` takes ``argument`` (``timesteps``, ``sigmas``)."""
    return argument in inspect.signature(scheduler_class(spec.class_name).set_timesteps).parameters


def make_scheduler(spec: SchedulerSpec, config: dict[str, Any], timestep_spacing: str | None = None):
    """A new scheduler of ``spec`` from the model's scheduler config (``timestep_spacing`` overrides both)."""
    overrides = {**spec.overrides, **({"timestep_spacing": timestep_spacing} if timestep_spacing else {})}
    return scheduler_class(spec.class_name).from_config(config, **overrides)
