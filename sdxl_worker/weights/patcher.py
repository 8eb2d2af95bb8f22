"""Apply several scaled LoRAs to an SDXL pipeline by fusing them into the weights, and restore them bit for bit.

Design: for every module that any of the job's LoRAs touches, a new weight tensor is computed as
``W + sum(scale * up @ down)`` (in float32, rounded once to the weight's dtype) and swapped in as the parameter's
data; the original tensor is kept aside untouched. ``restore`` swaps the originals back: no arithmetic, no copy,
so the weights are exactly the loaded ones again however many jobs ran (unlike ``unfuse_lora``'s subtraction).
The modules stay plain ``nn.Linear``/``nn.Conv2d``, so denoising steps cost what they cost without LoRAs. Extra
memory while a job runs: one tensor per touched weight.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from sdxl_worker.errors import LoraError
from sdxl_worker.weights.load import COMPONENTS, LoraFactors, ParsedLora

LOG = logging.getLogger(__name__)
_SHOWN_PROBLEMS = 3


@dataclass
class ApplyReport:
    """What one LoRA did to the pipeline in one job."""

    label: str
    modules_patched: dict[str, int]
    unmatched_keys: list[str]
    apply_ms: float = 0.0
    skipped_zero_scale: bool = False
    reused_fused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"modules_patched": self.modules_patched, "unmatched_keys": self.unmatched_keys,
                "apply_ms": round(self.apply_ms, 2), "skipped_zero_scale": self.skipped_zero_scale,
                "reused_fused": self.reused_fused}


@dataclass
class _Target:
    module: torch.nn.Module
    parts: list[tuple[LoraFactors, float]] = field(default_factory=list)


def _fits(module: torch.nn.Module, factors: LoraFactors) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or weight is None:
        return False
    down, up = factors.down, factors.up
    if down.shape[0] != up.shape[1] or up.shape[0] != weight.shape[0]:
        return False
    if isinstance(module, torch.nn.Linear):
        return down.dim() == 2 and up.dim() == 2 and down.shape[1] == weight.shape[1]
    if down.dim() != 4 or up.dim() != 4 or up.shape[2:] != (1, 1) or down.shape[1] != weight.shape[1]:
        return False
    return down.shape[2:] == weight.shape[2:]


def fused_weight(weight: torch.Tensor, parts: list[tuple[LoraFactors, float]],
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight + sum(scale * up @ down)``, accumulated in float32, in ``weight``'s dtype and shape; ``weight`` is
    only read.

    One LoRA: a single ``addmm`` in the weight's dtype; the matrix product accumulates in float32 and the sum is
    rounded once (on a GPU, one kernel per module instead of five: casts and copies cost more than the product).
    Several: the weight in float32, the first product added out of place (reading the original once), the others in
    place, one rounding at the end. The result is written into ``out`` when given (a contiguous tensor like
    ``weight``, whose values are overwritten), else into a new tensor; the bits are the same either way.
    """
    rows = weight.shape[0]
    into = out.view(rows, -1) if out is not None else None
    if len(parts) == 1:
        (factors, scale), = parts
        up = factors.up.to(device=weight.device, dtype=weight.dtype).flatten(1)
        down = factors.down.to(device=weight.device, dtype=weight.dtype).flatten(1)
        fused = torch.addmm(weight.detach().reshape(rows, -1), up, down, alpha=scale, out=into)
        return out if into is not None else fused.view(weight.shape)
    fused = weight.detach().reshape(rows, -1).float()
    for index, (factors, scale) in enumerate(parts):
        down = factors.down.to(device=weight.device, dtype=torch.float32).flatten(1)
        up = factors.up.to(device=weight.device, dtype=torch.float32).flatten(1)
        if index:
            fused.addmm_(up, down, alpha=scale)
        elif into is not None and into.dtype == torch.float32:
            fused = torch.addmm(fused, up, down, alpha=scale, out=into)
        else:
            fused = torch.addmm(fused, up, down, alpha=scale)
    if into is None:
        return fused.to(weight.dtype).view(weight.shape)
    if fused is not into:
        into.copy_(fused)  # rounds to the weight's dtype once, as .to() does
    return out


def _reusable(buffer: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    """``buffer`` if the fused weight of ``weight`` can be written into it."""
    if buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype:
        return None
    return buffer if buffer.device == weight.device and buffer.is_contiguous() else None


class LoraPatcher:
    """Fuses LoRAs into ``pipe.unet``, ``pipe.text_encoder`` and ``pipe.text_encoder_2``; restores exactly."""

    def __init__(self, pipe: Any, reuse_fused: bool = True) -> None:
        self.components = {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}
        self._modules = {name: dict(module.named_modules()) for name, module in self.components.items()}
        self._originals: dict[torch.nn.Parameter, torch.Tensor] = {}
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
        """Map every factor pair of ``lora`` to its module, or raise ``LoraError`` with matched/total counts."""
        mapped: dict[str, dict[str, torch.nn.Module]] = {}
        missing, misfit, total = [], [], 0
        for component, modules in lora.components.items():
            mapped[component] = {}
            for path, factors in modules.items():
                total += 1
                module = self._find(component, path)
                if module is None:
                    missing.append(f"{component}.{path}")
                elif not _fits(module, factors):
                    misfit.append(f"{component}.{path} (LoRA {tuple(factors.up.shape[:1])}x"
                                  f"{tuple(factors.down.shape[1:])}, weight {tuple(module.weight.shape)})")
                else:
                    mapped[component][path] = module
        if missing or misfit:
            matched = total - len(missing) - len(misfit)
            problems = []
            if missing:
                problems.append(f"{len(missing)} name no module of this model, e.g. {missing[:_SHOWN_PROBLEMS]}")
            if misfit:
                problems.append(f"{len(misfit)} do not fit the weight's shape, e.g. {misfit[:_SHOWN_PROBLEMS]}")
            raise LoraError(f"{label}: only {matched}/{total} LoRA modules match this SDXL model; "
                            + "; ".join(problems) + " (a LoRA for another base model, such as SD 1.5 or Flux?)")
        return mapped

    @torch.no_grad()
    def apply(self, loras: list[tuple[ParsedLora, float, str]]) -> list[ApplyReport]:
        """Check all LoRAs, then fuse them at their scales; on any failure the weights are restored first."""
        if self._originals:
            raise RuntimeError("LoRAs are already applied; restore() first")
        mapped = [self.check(lora, label) for lora, _, label in loras]
        reports, targets = [], {}
        for (lora, scale, label), modules in zip(loras, mapped):
            counts = {component: len(found) for component, found in modules.items()}
            reports.append(ApplyReport(label, counts, list(lora.unmatched_keys), skipped_zero_scale=scale == 0))
            if scale == 0:
                continue
            for component, found in modules.items():
                for path, module in found.items():
                    target = targets.setdefault(id(module), _Target(module))
                    target.parts.append((lora.components[component][path], float(scale)))
        key = tuple((lora.sha256, float(scale)) for lora, scale, _ in loras if scale != 0)
        reused = self.reuse_fused and key == self._kept_key and bool(self._kept)
        buffers = self._take_buffers() if targets and not reused else {}
        start = time.perf_counter()
        try:
            for target in targets.values():
                weight = target.module.weight
                if reused:
                    fused = self._kept[weight]
                else:
                    # Outside inference mode, so the kept tensors can be written by any later apply: the overlapped
                    # path applies inside the pipeline call (inference mode), the sequential path outside it.
                    with torch.inference_mode(False):
                        fused = fused_weight(weight, target.parts, out=_reusable(buffers.pop(weight, None), weight))
                self._originals[weight] = weight.data
                weight.data = fused
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
            LOG.info("LoRA %s: patched %s, %d unmatched key(s), %.1f ms%s", report.label, report.modules_patched,
                     len(report.unmatched_keys), report.apply_ms, " (same set as last job: reused)" if reused else "")
        return reports

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original weight tensor back: the pipeline is bit-identical to before ``apply``."""
        while self._originals:
            weight, original = self._originals.popitem()
            weight.data = original

    @contextmanager
    def applied(self, loras: list[tuple[ParsedLora, float, str]]) -> Iterator[list[ApplyReport]]:
        """``apply`` for the block, ``restore`` in ``finally``."""
        reports = self.apply(loras)
        try:
            yield reports
        finally:
            self.restore()
