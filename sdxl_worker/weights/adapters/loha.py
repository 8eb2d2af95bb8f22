"""LoHa (LyCORIS): ``delta W = alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)`` (a Hadamard product of two low-rank
products), each half Tucker-rebuilt from ``hada_t1`` / ``hada_t2`` on convs that have them."""

from __future__ import annotations

from typing import ClassVar

import torch

from sdxl_worker.weights.adapters.delta import ALPHA, DORA, DeltaAdapter

W1A, W1B, W2A, W2B, T1, T2 = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"


def tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The Tucker rebuild LyCORIS uses: ``einsum('i j ..., i p, j r -> p r ...')`` (core x_0 up x_1 down)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, up, down)


class LohaAdapter(DeltaAdapter):
    """One module's two Hadamard halves (optional Tucker cores), optional DoRA magnitude."""

    name: ClassVar[str] = "loha"
    key_names: ClassVar[tuple[str, ...]] = (W1A, W1B, W2A, W2B, T1, T2, ALPHA, DORA)
    required: ClassVar[tuple[str, ...]] = (W1A, W1B, W2A, W2B)

    def _half(self, up: str, down: str, core: str, device: torch.device | str) -> torch.Tensor:
        up_t, down_t, core_t = self.factor(up, device), self.factor(down, device), self.factor(core, device)
        if core_t is not None:
            return tucker(core_t, up_t, down_t)
        return up_t @ down_t.flatten(1)

    def delta(self, device: torch.device | str) -> torch.Tensor:
        """``alpha / rank * half1 * half2`` (rank: the rows of ``hada_w1_b``)."""
        first = self._half(W1A, W1B, T1, device)
        second = self._half(W2A, W2B, T2, device)
        return first * second * self.alpha_scale(self.tensors[W1B].shape[0])

    @property
    def rank(self) -> int:
        """The rank of each half."""
        return self.tensors[W1B].shape[0]
