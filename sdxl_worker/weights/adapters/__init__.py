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
from sdxl_worker.weights.adapters.delta import DeltaAdapter
from sdxl_worker.weights.adapters.full import FullAdapter, NormAdapter
from sdxl_worker.weights.adapters.locon import LoconAdapter
from sdxl_worker.weights.adapters.loha import LohaAdapter
from sdxl_worker.weights.adapters.lokr import LokrAdapter
from sdxl_worker.weights.adapters.lora import LoraAdapter

# The types read from a file's own (kohya / LyCORIS) key names, alpha kept: a module with any of their keys
# other than a plain pair's (``lora_down.weight``, ``lora_up.weight``, ``alpha``) is read by them.
LYCORIS_TYPES: tuple[type[DeltaAdapter], ...] = (LoconAdapter, LohaAdapter, LokrAdapter, FullAdapter, NormAdapter)
ADAPTER_TYPES: tuple[type[WeightAdapter], ...] = (LoraAdapter, *LYCORIS_TYPES)
# Longest first, so a key is split at the most specific name that ends it.
KEY_NAMES: tuple[str, ...] = tuple(sorted({name for kind in ADAPTER_TYPES for name in kind.key_names},
                                          key=len, reverse=True))
LYCORIS_KEY_NAMES: tuple[str, ...] = tuple(name for name in KEY_NAMES
                                           if any(name in kind.key_names for kind in LYCORIS_TYPES))
LYCORIS_MARKERS: frozenset[str] = frozenset(LYCORIS_KEY_NAMES) - {"lora_down.weight", "lora_up.weight", "alpha"}
UNSUPPORTED_TYPES = {
    re.compile(r"lora_magnitude_vector"): "PEFT DoRA",
    re.compile(r"\.oft_|^oft_"): "OFT",
    re.compile(r"\.ia3_|\.ia3\b|\.on_input$|^lora_(unet|te\d?)_[^.]+\.weight$"): "IA3",
    re.compile(r"\.a[12]\.weight$|\.b[12]\.weight$"): "GLoRA",
}


def refuse_unsupported(keys: Iterable[str], name: str) -> None:
    """Raise ``LoraError`` naming the type when any key of the file ``name`` belongs to a type not supported."""
    keys = list(keys)
    for pattern, kind in UNSUPPORTED_TYPES.items():
        if any(pattern.search(key) for key in keys):
            raise LoraError(f"{name}: {kind} weights are not supported; supported are LoRA/LoCon (Tucker), LoHa, "
                            "LoKr, DoRA, full and norm")


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
