"""The interface every weight-adapter type implements, and the float32 merge the patcher uses for several adapters.

An adapter is one module's update read from a LoRA-style file (a low-rank pair, later LyCORIS types): built from that
module's keys, checked against the module, merged into a float32 copy of its weight in place (so additive and
multiplicative types fit the same call), moved with ``to``, sized with ``nbytes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch


class WeightAdapter(ABC):
    """One module's update of one adapter type (a class per type, listed in ``weights.adapters.ADAPTER_TYPES``)."""

    name: ClassVar[str]
    key_names: ClassVar[tuple[str, ...]]  # the keys this type reads, relative to the module path (``lora_A.weight``)

    @classmethod
    @abstractmethod
    def from_keys(cls, keys: Mapping[str, torch.Tensor]) -> WeightAdapter | None:
        """The adapter built from one module's ``keys`` (named relative to the module), or None when they are not
        (all) of this type."""

    def defect(self) -> str | None:
        """What is wrong with the adapter's own tensors whatever the model (ranks that disagree), or None."""
        return None

    @abstractmethod
    def misfit(self, module: torch.nn.Module) -> str | None:
        """None when this adapter can update ``module``'s weight, else what does not fit (shapes, for the error)."""

    @abstractmethod
    def merge_into(self, weight: torch.Tensor, scale: float) -> None:
        """Apply this update at ``scale`` to ``weight``, a contiguous float32 tensor in the weight's shape, in place."""

    @abstractmethod
    def to(self, device: torch.device | str, dtype: torch.dtype) -> WeightAdapter:
        """This adapter with its tensors on ``device`` in ``dtype`` (tensors already there are not copied)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by this adapter's tensors."""

    @property
    def label(self) -> str:
        """The type as the job report names it (``name``, refined by a type that has variants)."""
        return self.name

    @property
    def updates_bias(self) -> bool:
        """Whether this adapter also updates the module's bias (``merge_bias_into``)."""
        return False

    def merge_bias_into(self, bias: torch.Tensor, scale: float) -> None:
        """Apply this adapter's bias update at ``scale`` to ``bias`` (float32, in place); a type without one has
        nothing to do."""

    @property
    def rank(self) -> int | None:
        """The rank of a low-rank type; None where the type has none."""
        return None

    def delta_bound(self) -> torch.Tensor | None:
        """A 0-d float32 tensor bounding ``|delta W|`` elementwise at scale 1, or None where the type has none (the
        patcher then checks the fused weight whole for overflow)."""
        return None

    def fused_alone(self, weight: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` updated by this adapter alone at ``scale``, in ``weight``'s dtype and shape (``weight`` is only
        read), written into ``out`` when given. A type with a faster exact path overrides this."""
        return merged_in_float32(weight, [(self, scale)], out)


def merged_in_float32(weight: torch.Tensor, parts: Sequence[tuple[WeightAdapter, float]],
                      out: torch.Tensor | None = None, bias: bool = False) -> torch.Tensor:
    """``weight`` with every adapter of ``parts`` merged at its scale in float32, rounded once to ``weight``'s dtype.

    ``weight`` is only read. The result is written into ``out`` when given (a contiguous tensor like ``weight``,
    whose values are overwritten; used as the float32 accumulator when it is float32), else into a new tensor; the
    bits are the same either way. With ``bias``, ``weight`` is the module's bias and each adapter's bias update is
    merged instead.
    """
    if out is not None and out.dtype == torch.float32:
        merged = out.copy_(weight)
    else:
        merged = weight.detach().to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    for adapter, scale in parts:
        if bias:
            adapter.merge_bias_into(merged, scale)
        else:
            adapter.merge_into(merged, scale)
    if out is None:
        return merged.to(weight.dtype)
    if merged is not out:
        out.copy_(merged)  # rounds to the weight's dtype once, as .to() does
    return out
