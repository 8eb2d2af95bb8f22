"""The shared shape of the LyCORIS-style types: a delta rebuilt from named factors (in float32), scaled by the
file's ``alpha`` rule, added at the user's strength, or, with ``dora_scale``, decomposed (``weights.adapters.dora``).

A subclass names its keys (``key_names``, the required ones in ``required``) and rebuilds ``delta``; shape checks
run the same rebuild on the meta device, so no type needs a separate shape rule.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from sdxl_worker.weights.adapters.base import WeightAdapter
from sdxl_worker.weights.adapters.dora import decompose_into, on_output_axis

ALPHA, DORA = "alpha", "dora_scale"


@dataclass(frozen=True)
class DeltaAdapter(WeightAdapter):
    """One module's factors (``tensors``, by key name) whose rebuilt ``delta`` updates the module's weight."""

    required: ClassVar[tuple[str, ...]]
    modules: ClassVar[tuple[type[torch.nn.Module], ...]] = (torch.nn.Linear, torch.nn.Conv2d)

    tensors: Mapping[str, torch.Tensor]
    alpha: float | None = None

    @classmethod
    def from_keys(cls, keys: Mapping[str, torch.Tensor]) -> DeltaAdapter | None:
        """The factors when every required key is there and every key is this type's, else None."""
        if not all(name in keys for name in cls.required) or not set(keys) <= set(cls.key_names):
            return None
        alpha = keys.get(ALPHA)
        tensors = {name: value for name, value in keys.items() if name != ALPHA}
        return cls(tensors=tensors, alpha=None if alpha is None else float(alpha.reshape(()).float()))

    @abstractmethod
    def delta(self, device: torch.device | str) -> torch.Tensor:
        """The update at strength 1 (the file's alpha rule applied), in float32 on ``device``: in the weight's
        shape, or flattened to ``(out, in * kernel)`` (trainers store conv factors flattened)."""

    def factor(self, name: str, device: torch.device | str) -> torch.Tensor | None:
        """The tensor ``name`` in float32 on ``device``, None when the file does not hold it."""
        value = self.tensors.get(name)
        return None if value is None else value.to(device=device, dtype=torch.float32)

    def alpha_scale(self, rank: int) -> float:
        """``alpha / rank``; 1 when the file holds no alpha (or alpha 0), as LyCORIS reads it."""
        return 1.0 if not self.alpha else self.alpha / rank

    @property
    def label(self) -> str:
        """The type as reported: the type's name, ``+dora`` when it carries a DoRA magnitude."""
        return self.name + ("+dora" if DORA in self.tensors else "")

    def misfit(self, module: torch.nn.Module) -> str | None:
        """None when the rebuilt delta has the weight's shape or its flattened shape (and ``dora_scale`` one of DoRA's
        two axes)."""
        weight = getattr(module, "weight", None)
        if not isinstance(module, self.modules) or weight is None:
            return f"{self.name} on a {type(module).__name__}"
        try:
            shape = self.to("meta", torch.float32).delta("meta").shape
        except RuntimeError as error:
            return f"{self.name} factors do not combine ({error})"
        if shape != weight.shape and (len(shape) != 2 or shape[0] != weight.shape[0]
                                      or shape.numel() != weight.numel()):
            return f"{self.name} delta {tuple(shape)}, weight {tuple(weight.shape)}"
        if DORA in self.tensors and on_output_axis(self.tensors[DORA], weight.shape) is None:
            return f"dora_scale {tuple(self.tensors[DORA].shape)}, weight {tuple(weight.shape)}"
        return None

    def merge_into(self, weight: torch.Tensor, scale: float) -> None:
        """``weight += scale * delta``; with ``dora_scale``, DoRA's decomposition of ``weight + delta``."""
        delta = self.delta(weight.device).reshape(weight.shape)
        magnitude = self.tensors.get(DORA)
        if magnitude is None:
            weight.add_(delta, alpha=scale)
        else:
            decompose_into(weight, delta, magnitude, scale)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> DeltaAdapter:
        """Every factor on ``device`` in ``dtype``."""
        return type(self)(tensors={name: value.to(device=device, dtype=dtype) for name, value in self.tensors.items()},
                          alpha=self.alpha)

    @property
    def nbytes(self) -> int:
        """Bytes of every factor."""
        return sum(value.nbytes for value in self.tensors.values())
