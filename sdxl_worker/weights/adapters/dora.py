"""DoRA's weight decomposition, as LyCORIS's forward defines it, for any additive adapter that carries ``dora_scale``.

``W' = (W + dW) * (s * (m / ||W + dW|| - 1) + 1)``: ``dW`` is the adapter's delta at its own alpha (not at the user's
strength ``s``), the norm is taken per output row (``m`` shaped ``(out, 1, ...)``) or per input channel (``m`` shaped
``(1, in, ...)``), the two axes trainers write; ``W`` is the running weight (the base plus the job's earlier LoRAs).
"""

from __future__ import annotations

import torch


def on_output_axis(magnitude: torch.Tensor, weight_shape: torch.Size) -> bool | None:
    """True when ``magnitude`` holds one norm per output row of a weight of ``weight_shape``, False when one per
    input channel, None when it fits neither."""
    ones = (1,) * (len(weight_shape) - 1)
    if tuple(magnitude.shape) in ((weight_shape[0], *ones), (weight_shape[0],)):
        return True
    if tuple(magnitude.shape) == (1, weight_shape[1], *ones[1:]):
        return False
    return None


def decompose_into(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> None:
    """``weight`` (float32, in place) replaced by DoRA's ``(W + dW) * (strength * (m / ||W + dW|| - 1) + 1)``."""
    weight.add_(delta)
    out_axis = on_output_axis(magnitude, weight.shape)
    if out_axis:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))
    factor = magnitude.to(device=weight.device, dtype=torch.float32).reshape(norm.shape) / (
        norm + torch.finfo(torch.float32).eps)
    if strength != 1:
        factor = factor.sub_(1).mul_(strength).add_(1)
    weight.mul_(factor)
