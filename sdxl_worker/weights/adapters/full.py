"""Whole-tensor differences (LyCORIS): ``full`` (``diff``, ``diff_b`` for the bias) on Linear and Conv2d layers, and
norm tuning (``w_norm``, ``b_norm``) on GroupNorm and LayerNorm: ``W += strength * diff``, no alpha."""

from __future__ import annotations

from typing import ClassVar

import torch

from sdxl_worker.weights.adapters.delta import DeltaAdapter


class FullAdapter(DeltaAdapter):
    """One module's weight difference and optional bias difference."""

    name: ClassVar[str] = "full"
    weight_key: ClassVar[str] = "diff"
    bias_key: ClassVar[str] = "diff_b"
    key_names: ClassVar[tuple[str, ...]] = ("diff", "diff_b")
    required: ClassVar[tuple[str, ...]] = ("diff",)

    def delta(self, device: torch.device | str) -> torch.Tensor:
        """The weight difference as stored."""
        return self.factor(self.weight_key, device)

    @property
    def updates_bias(self) -> bool:
        """True when the file holds a bias difference."""
        return self.bias_key in self.tensors

    def merge_bias_into(self, bias: torch.Tensor, scale: float) -> None:
        """``bias += scale * bias difference`` (nothing without one)."""
        if self.updates_bias:
            bias.add_(self.factor(self.bias_key, bias.device), alpha=scale)

    def misfit(self, module: torch.nn.Module) -> str | None:
        """The weight check, and the bias difference against the module's bias."""
        problem = super().misfit(module)
        bias = self.tensors.get(self.bias_key)
        if problem is None and bias is not None and (module.bias is None or bias.shape != module.bias.shape):
            has = None if module.bias is None else tuple(module.bias.shape)
            return f"{self.bias_key} {tuple(bias.shape)}, bias {has}"
        return problem


class NormAdapter(FullAdapter):
    """One norm layer's weight difference and optional bias difference."""

    name: ClassVar[str] = "norm"
    weight_key: ClassVar[str] = "w_norm"
    bias_key: ClassVar[str] = "b_norm"
    key_names: ClassVar[tuple[str, ...]] = ("w_norm", "b_norm")
    required: ClassVar[tuple[str, ...]] = ("w_norm",)
    modules: ClassVar[tuple[type[torch.nn.Module], ...]] = (torch.nn.GroupNorm, torch.nn.LayerNorm)
