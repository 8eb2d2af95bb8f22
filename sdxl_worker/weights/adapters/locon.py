"""LoRA / LoCon as LyCORIS writes it (kohya names, alpha kept): ``delta W = alpha / rank * up @ down``, conv layers
included, Tucker-decomposed convs through ``lora_mid`` (``mid x_0 up x_1 down``), DoRA through ``dora_scale``.

Plain pairs without ``lora_mid`` or ``dora_scale`` take the ``LoraAdapter`` path instead (alpha folded at load).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sdxl_worker.weights.adapters.delta import ALPHA, DORA, DeltaAdapter

DOWN, UP, MID = "lora_down.weight", "lora_up.weight", "lora_mid.weight"


class LoconAdapter(DeltaAdapter):
    """One module's down/up pair, optional Tucker core ``lora_mid``, optional DoRA magnitude."""

    name: ClassVar[str] = "locon"
    key_names: ClassVar[tuple[str, ...]] = (DOWN, UP, MID, ALPHA, DORA)
    required: ClassVar[tuple[str, ...]] = (DOWN, UP)

    @property
    def label(self) -> str:
        """``locon``, ``locon-tucker`` with a Tucker core; ``+dora`` with a DoRA magnitude."""
        return super().label.replace("locon", "locon-tucker") if MID in self.tensors else super().label

    def delta(self, device: torch.device | str) -> torch.Tensor:
        """``alpha / rank * up @ down`` (the kernel from the Tucker core when there is one)."""
        down, up, mid = self.factor(DOWN, device), self.factor(UP, device), self.factor(MID, device)
        up = up * self.alpha_scale(down.shape[0])
        if mid is None:
            return up.flatten(1) @ down.flatten(1)
        return torch.einsum("m n ..., i m, n j -> i j ...", mid, up.flatten(1), down.flatten(1))

    @property
    def rank(self) -> int:
        """The inner dimension of ``up @ down``."""
        return self.tensors[DOWN].shape[0]
