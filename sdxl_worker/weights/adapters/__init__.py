"""The weight-adapter types a LoRA file may hold, and the types refused by name.

Adding a type: a module with a ``WeightAdapter`` subclass, listed in ``ADAPTER_TYPES`` (and its marker taken out of
``UNSUPPORTED_TYPES``). A module's keys go to the first type in ``ADAPTER_TYPES`` that builds an adapter from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from sdxl_worker.errors import LoraError
from sdxl_worker.store.file_checks import PEFT_CONFIG
from sdxl_worker.weights.adapters.base import WeightAdapter
from sdxl_worker.weights.adapters.lora import LoraAdapter

ADAPTER_TYPES: tuple[type[WeightAdapter], ...] = (LoraAdapter,)
# Longest first, so a key is split at the most specific name that ends it.
KEY_NAMES: tuple[str, ...] = tuple(sorted({name for kind in ADAPTER_TYPES for name in kind.key_names},
                                          key=len, reverse=True))
UNSUPPORTED_TYPES = {
    re.compile(r"\.hada_"): "LoHa (LyCORIS)",
    re.compile(r"\.lokr_"): "LoKr (LyCORIS)",
    re.compile(r"dora_scale|lora_magnitude_vector"): "DoRA",
    re.compile(r"\.oft_"): "OFT",
    re.compile(r"\.ia3_|\.ia3\b"): "IA3",
    re.compile(r"\.diff(_b)?$"): "full-weight difference (LyCORIS 'full')",
    re.compile(r"\.(w_norm|b_norm)$"): "norm tuning (LyCORIS)",
}


def refuse_unsupported(keys: Iterable[str], name: str) -> None:
    """Raise ``LoraError`` naming the type when any key of the file ``name`` belongs to a type not supported."""
    keys = list(keys)
    for pattern, kind in UNSUPPORTED_TYPES.items():
        if any(pattern.search(key) for key in keys):
            raise LoraError(f"{name}: {kind} weights are not supported; only plain LoRA (low-rank up/down) files are")


def refuse_unsupported_peft(config: dict, name: str) -> None:
    """Raise ``LoraError`` when the PEFT adapter config of the folder ``name`` asks for a type not supported."""
    if config.get("use_dora"):
        raise LoraError(f"{name}: DoRA adapters are not supported (use_dora in {PEFT_CONFIG})")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"{name}: PEFT type {config.get('peft_type')} is not supported, only LORA")


def adapter_for(keys: Mapping[str, torch.Tensor]) -> tuple[WeightAdapter | None, list[str]]:
    """The adapter the first fitting type builds from one module's ``keys``, and the key names it did not read
    (all of them when no type fits)."""
    for kind in ADAPTER_TYPES:
        adapter = kind.from_keys(keys)
        if adapter is not None:
            return adapter, [name for name in keys if name not in kind.key_names]
    return None, list(keys)
