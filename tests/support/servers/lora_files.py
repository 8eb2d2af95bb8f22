"""Small LoRA-like weight files for tests, generated on the fly (never committed)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from safetensors.torch import save, save_file

_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def lora_tensors(seed: int = 0, rank: int = 4, dim: int = 32) -> dict[str, torch.Tensor]:
    """Kohya-style tensors: lora_down, lora_up and alpha for one attention projection."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{_MODULE}.lora_down.weight": torch.randn(rank, dim, generator=generator),
        f"{_MODULE}.lora_up.weight": torch.randn(dim, rank, generator=generator),
        f"{_MODULE}.alpha": torch.tensor(float(rank)),
    }


def lora_bytes(seed: int = 0, rank: int = 4, dim: int = 32) -> bytes:
    """A LoRA-like ``.safetensors`` file as bytes."""
    return save(lora_tensors(seed, rank, dim))


def write_lora(path: Path, seed: int = 0) -> Path:
    """Write a LoRA-like ``.safetensors`` file with ``safetensors.torch.save_file``."""
    save_file(lora_tensors(seed), str(path))
    return path


def torch_lora_bytes(seed: int = 0) -> bytes:
    """The same tensors as a PyTorch ``.pt`` file (zip format, plain tensors only)."""
    buffer = io.BytesIO()
    torch.save(lora_tensors(seed), buffer)
    return buffer.getvalue()


class _RunsCode:
    """Pickles into a call of ``open(marker, "w")``: loading it with plain pickle would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_pickle_bytes(marker: Path) -> bytes:
    """A ``.pt`` (torch zip format) whose unpickling would create ``marker``."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, buffer)
    return buffer.getvalue()


def legacy_pickle_bytes(marker: Path) -> bytes:
    """A plain (non-zip) pickle, the old ``.bin``/``.ckpt`` layout, whose unpickling would create ``marker``."""
    return pickle.dumps({"lora_unet_x.lora_down.weight": _RunsCode(marker)}, protocol=2)
