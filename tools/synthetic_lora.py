"""Synthetic SDXL LoRAs in kohya format (the layout users download from Civitai), drawn from a seeded RNG.

Used by the demo (``tools.make_demo_loras``) and the benchmarks: any SDXL-shaped pipeline (the embedded tiny model
or the full-size architecture) gets LoRAs whose keys and shapes match its modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def target_linears(module: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of ``module`` whose dotted name ends with one of ``suffixes``."""
    return {name: child for name, child in module.named_modules()
            if isinstance(child, torch.nn.Linear) and name.endswith(tuple("." + s for s in suffixes))}


def kohya_lora(components: dict[str, torch.nn.Module], rank: int, seed: int, up_std: float = 1e-2,
               dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A kohya state dict with rank-``rank`` factors for the attention projections of ``components``.

    ``components`` maps ``unet`` / ``text_encoder`` / ``text_encoder_2`` to modules; alpha equals the rank.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for component, module in components.items():
        suffixes = UNET_ATTENTION if component == "unet" else TEXT_ATTENTION
        for name, linear in sorted(target_linears(module, suffixes).items()):
            key = f"{KOHYA_PREFIXES[component]}_{name.replace('.', '_')}"
            down = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=generator) * up_std
            state[f"{key}.lora_down.weight"] = down.to(dtype)
            state[f"{key}.lora_up.weight"] = up.to(dtype)
            state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return state


def write_kohya_lora(path: Path, components: dict[str, torch.nn.Module], rank: int, seed: int,
                     up_std: float = 1e-2, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``kohya_lora(...)`` to ``path`` as .safetensors with kohya-style metadata; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": path.stem}
    save_file(kohya_lora(components, rank, seed, up_std, dtype), str(path), metadata=metadata)
    return path
