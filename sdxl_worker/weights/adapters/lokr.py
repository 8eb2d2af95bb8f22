"""LoKr (LyCORIS): ``delta W = scale * kron(w1, w2)``, each side whole (``lokr_w1``, ``lokr_w2``) or factored
(``lokr_w1_a @ lokr_w1_b``; ``lokr_w2_a @ lokr_w2_b``, Tucker-rebuilt with ``lokr_t2``). ``scale`` is
``alpha / rank`` when a side is factored (rank: that factor's inner size, w1's first) and 1 when neither is, as
LyCORIS's module sets it."""

from __future__ import annotations

from typing import ClassVar

import torch

from sdxl_worker.weights.adapters.delta import ALPHA, DORA, DeltaAdapter
from sdxl_worker.weights.adapters.loha import tucker

W1, W1A, W1B, W2, W2A, W2B, T2 = "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"


class LokrAdapter(DeltaAdapter):
    """One module's Kronecker halves in any of LyCORIS's layouts, optional DoRA magnitude."""

    name: ClassVar[str] = "lokr"
    key_names: ClassVar[tuple[str, ...]] = (W1, W1A, W1B, W2, W2A, W2B, T2, ALPHA, DORA)
    required: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_keys(cls, keys):
        """The halves when each side is whole or a full factor pair, else None."""
        whole_or_pair = all(side in keys or (a in keys and b in keys) for side, a, b in ((W1, W1A, W1B),
                                                                                         (W2, W2A, W2B)))
        return super().from_keys(keys) if whole_or_pair else None

    def _scale(self) -> float:
        factored = self.tensors.get(W1A, self.tensors.get(W2A))
        return 1.0 if factored is None or W1 in self.tensors and W2 in self.tensors else \
            self.alpha_scale(factored.shape[1])

    def delta(self, device: torch.device | str) -> torch.Tensor:
        """``scale * kron(w1, w2)``, w1 broadcast over w2's kernel axes on convs."""
        w1 = self.factor(W1, device)
        if w1 is None:
            w1 = self.factor(W1A, device) @ self.factor(W1B, device)
        w2 = self.factor(W2, device)
        if w2 is None:
            w2a, w2b, core = self.factor(W2A, device), self.factor(W2B, device), self.factor(T2, device)
            if core is not None:
                w2 = tucker(core, w2a, w2b)
            else:
                w2 = w2a @ w2b.flatten(1)
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
        return torch.kron(w1, w2.contiguous()) * self._scale()

    @property
    def rank(self) -> int | None:
        """The inner size of the factored side; None when both sides are whole."""
        factored = self.tensors.get(W1A, self.tensors.get(W2A))
        return None if factored is None else factored.shape[1]
