"""Apply several scaled LoRAs to an SDXL pipeline by fusing them into the weights, and restore them bit for bit.

Design: for every module that any of the job's LoRAs touches, a new weight tensor is computed by merging each LoRA's
adapter for it at its scale (``weights.adapters``; plain LoRA: ``W + sum(scale * up @ down)``) in float32, rounded
once to the weight's dtype, and swapped in as the parameter's data; the original tensor is kept aside untouched.
``restore`` swaps the originals back: no arithmetic, no copy, so the weights are exactly the loaded ones again
however many jobs ran (unlike ``unfuse_lora``'s subtraction). The modules stay plain ``nn.Linear``/``nn.Conv2d``, so
denoising steps cost what they cost without LoRAs. Extra memory while a job runs: one tensor per touched weight.
Each LoRA has one scale for the UNet and one for the text encoders (``ScaledLora``); a component at scale 0 is not
touched, so a LoRA at scale 0 everywhere leaves the pipeline bit for bit as it was.

The fused tensors of the last LoRA set are kept after ``restore`` (``reuse_fused``): a job with the same LoRAs at the
same scales swaps them in again without computing anything. They are the same bits a recomputation would give, and
the originals are never touched, so exactness is unaffected; the cost is holding one set of touched weights. A job
with another set writes its fused weights into those kept tensors where parameter and shape match, instead of
allocating new ones: the worker never holds two fused sets, and on a CPU memory that the allocator has not
used before costs a page fault per 4 KiB page on first write.

Every LoRA is checked against the pipeline (modules found, shapes fit) before any weight changes. ``apply``
restores whatever it already changed if it fails midway. Callers serialize pipeline use (one job at a time).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from sdxl_worker.errors import LoraError
from sdxl_worker.weights.adapters.base import WeightAdapter, merged_in_float32
from sdxl_worker.weights.load import COMPONENTS, ParsedLora

LOG = logging.getLogger(__name__)
_SHOWN_PROBLEMS = 3


@dataclass(frozen=True)
class ScaledLora:
    """One LoRA of a job: its parsed weights, the scales to fuse it at (``scale`` for the UNet, ``te_scale`` for the
    text encoders, ``None``: the same as ``scale``), and the label its report and errors name."""

    lora: ParsedLora
    scale: float
    label: str
    te_scale: float | None = None

    def scale_of(self, component: str) -> float:
        """The scale ``component`` (``unet``, ``text_encoder``, ``text_encoder_2``) is fused at."""
        if component == "unet" or self.te_scale is None:
            return float(self.scale)
        return float(self.te_scale)


@dataclass
class ApplyReport:
    """What one LoRA did to the pipeline in one job."""

    label: str
    modules_patched: dict[str, int]
    type: str | dict[str, str | dict[str, int]] = "lora"
    apply_ms: float = 0.0
    skipped_zero_scale: bool = False
    reused_fused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "modules_patched": self.modules_patched, "apply_ms": round(self.apply_ms, 2),
                "skipped_zero_scale": self.skipped_zero_scale,
                "reused_fused": self.reused_fused}


@dataclass
class _Target:
    module: torch.nn.Module
    path: str
    parts: list[tuple[WeightAdapter, float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def params(self) -> list[tuple[torch.nn.Parameter, bool]]:
        """The weight, and the bias when an adapter updates it, each with whether it is the bias."""
        params = [(self.module.weight, False)]
        if any(adapter.updates_bias for adapter, _ in self.parts):
            params.append((self.module.bias, True))
        return params


def fused_weight(weight: torch.Tensor, parts: list[tuple[WeightAdapter, float]],
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` with every adapter of ``parts`` merged at its scale, in ``weight``'s dtype and shape; ``weight`` is
    only read.

    One adapter: its own ``fused_alone`` (for plain LoRA a single ``addmm`` in the weight's dtype, rounded once).
    Several: merged one after another into a float32 copy of the weight, rounded once at the end
    (``merged_in_float32``). The result is written into ``out`` when given (a contiguous tensor like ``weight``,
    whose values are overwritten), else into a new tensor; the bits are the same either way.
    """
    if len(parts) == 1:
        (adapter, scale), = parts
        return adapter.fused_alone(weight, scale, out)
    return merged_in_float32(weight, parts, out)


def lora_type(lora: ParsedLora) -> str | dict[str, str | dict[str, int]]:
    """The adapter type of ``lora`` (``loha``, ``locon-tucker+dora``, ...): one name when every module has the same
    type, else per component the type, or the module count per type where a component mixes types."""
    per_component = {component: dict(Counter(adapter.label for adapter in modules.values()))
                     for component, modules in lora.components.items() if modules}
    kinds = {kind for counts in per_component.values() for kind in counts}
    if len(kinds) == 1:
        return kinds.pop()
    return {component: next(iter(counts)) if len(counts) == 1 else counts
            for component, counts in per_component.items()}


def _reusable(buffer: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """``buffer`` if the fused weight of ``weight`` can be written into it."""
    if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
        return None
    return buffer if buffer.device == weight.device and buffer.is_contiguous() else None


def _refuse_non_finite(targets: list[_Target], sums: list[torch.Tensor]) -> None:
    """Raise ``LoraError`` naming the LoRAs of the first module whose fused weight holds NaN or an infinity (the merge
    overflowed the weight's dtype). ``sums`` holds each target's float32 sum, non-finite exactly when an element is
    (a sum of real weights stays far below float32's range); a sum costs a sixth of ``isfinite(w).all()`` on a CPU,
    and all are read in one device-to-host transfer."""
    if not sums:
        return
    flags = torch.isfinite(torch.stack(sums)).cpu().tolist()
    bad = [target for target, ok in zip(targets, flags) if not ok]
    if bad:
        first = bad[0]
        scales = ", ".join(f"{label} at scale {scale:g}" for label, (_, scale) in zip(first.labels, first.parts))
        raise LoraError(f"{'; '.join(dict.fromkeys(first.labels))}: fusing gives NaN or infinite weights in "
                        f"{len(bad)} module(s), e.g. {first.path} ({scales}; the result overflows "
                        f"{first.module.weight.dtype}); use a smaller scale")


class LoraPatcher:
    """Fuses LoRAs into ``pipe.unet``, ``pipe.text_encoder`` and ``pipe.text_encoder_2``; restores exactly."""

    def __init__(self, pipe: Any, reuse_fused: bool = True) -> None:
        self.components = {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}
        self._modules = {name: dict(module.named_modules()) for name, module in self.components.items()}
        self._originals: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._absmax: dict[torch.nn.Parameter, torch.Tensor] = {}  # max|W| of each original weight touched
        self.reuse_fused = reuse_fused
        self._kept_key: tuple | None = None
        self._kept: dict[torch.nn.Parameter, torch.Tensor] = {}

    def forget_fused(self) -> None:
        """Forget which LoRA set the kept fused tensors hold: the next job computes its fused weights again (into
        those tensors, where they fit)."""
        self._kept_key = None

    def release_fused(self) -> None:
        """Drop the kept fused tensors (frees their memory)."""
        self._kept_key, self._kept = None, {}

    def _take_buffers(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """The kept fused tensors, handed over to be overwritten: from now on they hold no LoRA set."""
        buffers, self._kept_key, self._kept = self._kept, None, {}
        return buffers

    def _find(self, component: str, path: str) -> torch.nn.Module | None:
        modules = self._modules.get(component, {})
        found = modules.get(path) or modules.get("text_model." + path)
        if found is None and component != "unet" and path.startswith("text_model."):
            found = modules.get(path[len("text_model."):])
        return found

    def check(self, lora: ParsedLora, label: str) -> dict[str, dict[str, torch.nn.Module]]:
        """Map every adapter of ``lora`` to its module, or raise ``LoraError`` with matched/total counts: adapters whose
        own ranks disagree (a broken file) are told apart from those that do not fit this model."""
        mapped: dict[str, dict[str, torch.nn.Module]] = {}
        broken, missing, misfit, total = [], [], [], 0
        per_type: dict[str, list[int]] = {}  # type -> [matched, total]
        for component, modules in lora.components.items():
            mapped[component] = {}
            for path, adapter in modules.items():
                total += 1
                counts = per_type.setdefault(adapter.label, [0, 0])
                counts[1] += 1
                module = self._find(component, path)
                if (defect := adapter.defect()) is not None:
                    broken.append(f"{component}.{path} ({defect})")
                elif module is None:
                    missing.append(f"{component}.{path}")
                elif (problem := adapter.misfit(module)) is not None:
                    misfit.append(f"{component}.{path} ({problem})")
                else:
                    mapped[component][path] = module
                    counts[0] += 1
        broken_text = (f"{len(broken)} are broken in the file itself: their up and down ranks disagree, e.g. "
                       f"{broken[:_SHOWN_PROBLEMS]} (a corrupt or badly converted LoRA)") if broken else ""
        if not missing and not misfit:
            if broken:
                raise LoraError(f"{label}: {len(broken)}/{total} LoRA modules cannot be applied to any model; "
                                + broken_text)
            return mapped
        problems = [broken_text] if broken else []
        if missing:
            problems.append(f"{len(missing)} name no module of this model, e.g. {missing[:_SHOWN_PROBLEMS]}")
        if misfit:
            problems.append(f"{len(misfit)} do not fit the weight's shape, e.g. {misfit[:_SHOWN_PROBLEMS]}")
        if len(per_type) > 1:
            problems.append("per type " + ", ".join(f"{kind} {hit}/{of}" for kind, (hit, of) in sorted(per_type.items())))
        matched = total - len(broken) - len(missing) - len(misfit)
        raise LoraError(f"{label}: only {matched}/{total} LoRA modules match this SDXL model; " + "; ".join(problems)
                        + " (a LoRA for another base model, such as SD 1.5 or Flux?)")

    def _may_overflow(self, targets: list[_Target]) -> list[bool]:
        """Per target, whether its fused weight could leave its dtype's range, from a bound: ``max|W|`` (measured once
        per weight, on the original) plus each adapter's ``delta_bound`` at its scale. Only those are summed after
        fusing (the exact check costs about a third of the fuse); one device-to-host transfer for all bounds. The
        inputs are already known finite (``load.refuse_non_finite``)."""
        bounds, unbounded = [], []
        for target in targets:
            weight = target.module.weight
            if weight not in self._absmax:
                self._absmax[weight] = weight.detach().abs().amax().float()
            parts = [(adapter.delta_bound(), scale) for adapter, scale in target.parts]
            unbounded.append(target.module.bias is not None and any(a.updates_bias for a, _ in target.parts)
                             or any(bound is None for bound, _ in parts))
            total = self._absmax[weight]
            for bound, scale in parts:
                if bound is not None:
                    total = total + bound.to(total.device) * abs(scale)
            bounds.append(total)
        if not bounds:
            return []
        values = torch.stack(bounds).cpu().tolist()
        return [skip or value * 1.01 >= torch.finfo(target.module.weight.dtype).max
                for skip, value, target in zip(unbounded, values, targets)]

    @torch.no_grad()
    def apply(self, loras: list[ScaledLora]) -> list[ApplyReport]:
        """Check all LoRAs, then fuse them at their scales; on any failure the weights are restored first."""
        if self._originals:
            raise RuntimeError("LoRAs are already applied; restore() first")
        mapped = [self.check(item.lora, item.label) for item in loras]
        reports, targets = [], {}
        for item, modules in zip(loras, mapped):
            # A part at scale 0 is left untouched; a LoRA at scale 0 everywhere changes nothing.
            active = {component: found for component, found in modules.items() if item.scale_of(component) != 0}
            counts = {component: len(found) for component, found in (active or modules).items()}
            reports.append(ApplyReport(item.label, counts, lora_type(item.lora), skipped_zero_scale=not active))
            for component, found in active.items():
                for path, module in found.items():
                    target = targets.setdefault(id(module), _Target(module, f"{component}.{path}"))
                    target.parts.append((item.lora.components[component][path], item.scale_of(component)))
                    target.labels.append(item.label)
        key = tuple((item.lora.sha256, *(item.scale_of(component) for component in COMPONENTS)) for item in loras
                    if any(item.scale_of(component) != 0 for component in item.lora.components))
        reused = self.reuse_fused and key == self._kept_key and bool(self._kept)
        buffers = self._take_buffers() if targets and not reused else {}
        start = time.perf_counter()
        sums: list[torch.Tensor] = []
        checked: list[_Target] = []
        may_overflow = self._may_overflow(list(targets.values())) if not reused else []
        try:
            for index, target in enumerate(targets.values()):
                target_sums = []
                for param, is_bias in target.params():
                    if reused:
                        fused = self._kept[param]
                    else:
                        # Outside inference mode, so the kept tensors can be written by any later apply: the
                        # overlapped path applies inside the pipeline call (inference mode), the sequential path
                        # outside it.
                        with torch.inference_mode(False):
                            out = _reusable(buffers.pop(param, None), param)
                            fused = (merged_in_float32(param, target.parts, out, bias=True) if is_bias
                                     else fused_weight(param, target.parts, out=out))
                        if may_overflow[index]:
                            target_sums.append(fused.sum(dtype=torch.float32))  # NaN or inf iff an element is
                    self._originals[param] = param.data
                    param.data = fused
                if target_sums:
                    sums.append(torch.stack(target_sums).sum())
                    checked.append(target)
            _refuse_non_finite(checked, sums)
            if self.reuse_fused and targets and not reused:
                self._kept_key, self._kept = key, {weight: weight.data for weight in self._originals}
            if weight_device := next((t.module.weight.device for t in targets.values()), None):
                if weight_device.type == "cuda":
                    torch.cuda.synchronize(weight_device)  # so apply_ms is the real cost, not a kernel launch
        except BaseException:
            self.restore()
            raise
        elapsed_ms = (time.perf_counter() - start) * 1000
        patched = sum(sum(r.modules_patched.values()) for r in reports if not r.skipped_zero_scale) or 1
        for report in reports:
            share = 0 if report.skipped_zero_scale else sum(report.modules_patched.values()) / patched
            report.apply_ms = elapsed_ms * share
            report.reused_fused = reused
            LOG.info("LoRA %s: patched %s, %.1f ms%s", report.label, report.modules_patched, report.apply_ms,
                     " (same set as last job: reused)" if reused else "")
        return reports

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original weight tensor back: the pipeline is bit-identical to before ``apply``."""
        while self._originals:
            weight, original = self._originals.popitem()
            weight.data = original

    @contextmanager
    def applied(self, loras: list[ScaledLora]) -> Iterator[list[ApplyReport]]:
        """``apply`` for the block, ``restore`` in ``finally``."""
        reports = self.apply(loras)
        try:
            yield reports
        finally:
            self.restore()
