"""Snapshots of a pipeline's weights, to prove that LoRA work leaves every weight bit-identical."""

from __future__ import annotations

import torch

CHECKED = ("unet", "text_encoder", "text_encoder_2", "vae")


def snapshot(pipe) -> dict[str, torch.Tensor]:
    """A copy of every weight of the UNet, both text encoders and the VAE."""
    return {f"{name}.{key}": value.detach().clone()
            for name in CHECKED for key, value in getattr(pipe, name).state_dict().items()}


def assert_bit_identical(pipe, reference: dict[str, torch.Tensor]) -> None:
    """Every weight of ``pipe`` equals ``reference`` bit for bit."""
    current = snapshot(pipe)
    assert current.keys() == reference.keys()
    changed = [key for key in reference if not torch.equal(current[key], reference[key])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"
