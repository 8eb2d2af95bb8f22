"""Plain LoRA: ``delta W = up @ down`` for an ``nn.Linear`` or ``nn.Conv2d`` (conv factors flattened on use)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from sdxl_worker.weights.adapters.base import WeightAdapter

DOWN, UP = "lora_A.weight", "lora_B.weight"


@dataclass(frozen=True)
class LoraAdapter(WeightAdapter):
    """One module's low-rank pair, in PEFT naming (``lora_A`` = down, ``lora_B`` = up), with alpha folded into up."""

    name: ClassVar[str] = "lora"
    key_names: ClassVar[tuple[str, ...]] = (DOWN, UP)

    down: torch.Tensor
    up: torch.Tensor

    @classmethod
    def from_keys(cls, keys: Mapping[str, torch.Tensor]) -> LoraAdapter | None:
        """The pair ``lora_A.weight`` / ``lora_B.weight``, or None when either is missing."""
        if DOWN not in keys or UP not in keys:
            return None
        return cls(down=keys[DOWN], up=keys[UP])

    def defect(self) -> str | None:
        """The ranks of ``down`` (rows) and ``up`` (columns) when they disagree: no model can take that pair."""
        if self.down.dim() < 2 or self.up.dim() < 2 or self.down.shape[0] == self.up.shape[1]:
            return None
        return f"down rank {self.down.shape[0]}, up rank {self.up.shape[1]}"

    def misfit(self, module: torch.nn.Module) -> str | None:
        """None when ``up @ down`` has the shape of the Linear's or Conv2d's weight (1x1 up, down with the kernel)."""
        if self._fits(module):
            return None
        return f"LoRA {tuple(self.up.shape[:1])}x{tuple(self.down.shape[1:])}, weight {tuple(module.weight.shape)}"

    def _fits(self, module: torch.nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or weight is None:
            return False
        down, up = self.down, self.up
        if down.shape[0] != up.shape[1] or up.shape[0] != weight.shape[0]:
            return False
        if isinstance(module, torch.nn.Linear):
            return down.dim() == 2 and up.dim() == 2 and down.shape[1] == weight.shape[1]
        if down.dim() != 4 or up.dim() != 4 or up.shape[2:] != (1, 1) or down.shape[1] != weight.shape[1]:
            return False
        return down.shape[2:] == weight.shape[2:]

    def merge_into(self, weight: torch.Tensor, scale: float) -> None:
        """``weight += scale * up @ down``, the product accumulated in float32."""
        down = self.down.to(device=weight.device, dtype=torch.float32).flatten(1)
        up = self.up.to(device=weight.device, dtype=torch.float32).flatten(1)
        weight.view(weight.shape[0], -1).addmm_(up, down, alpha=scale)

    def fused_alone(self, weight: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """A single ``addmm`` in the weight's dtype: the product accumulates in float32 and the sum is rounded once
        (on a GPU, one kernel per module instead of five: casts and copies cost more than the product)."""
        rows = weight.shape[0]
        up = self.up.to(device=weight.device, dtype=weight.dtype).flatten(1)
        down = self.down.to(device=weight.device, dtype=weight.dtype).flatten(1)
        into = out.view(rows, -1) if out is not None else None
        fused = torch.addmm(weight.detach().reshape(rows, -1), up, down, alpha=scale, out=into)
        return out if out is not None else fused.view(weight.shape)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraAdapter:
        """Both factors on ``device`` in ``dtype``."""
        return LoraAdapter(down=self.down.to(device=device, dtype=dtype), up=self.up.to(device=device, dtype=dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of both factors."""
        return self.down.nbytes + self.up.nbytes

    @property
    def rank(self) -> int:
        """The inner dimension of ``up @ down``."""
        return self.down.shape[0]

    def delta_bound(self) -> torch.Tensor:
        """``|up @ down| <= rank * max|up| * max|down|``, elementwise."""
        return self.up.abs().amax().float() * self.down.abs().amax().float() * self.rank
