"""One set of LoRA weights for the tiny SDXL, written in every form users bring: kohya, diffusers, PEFT folder.

``canonical_factors`` draws (down, up, alpha) per module from a seed; the writers store exactly those weights in each
layout, so every form must patch the pipeline to the same bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tools.synthetic_lora import KOHYA_PREFIXES, TEXT_ATTENTION, UNET_ATTENTION, target_linears

Factors = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]


def canonical_factors(pipe, components: tuple[str, ...], rank: int, seed: int, up_std: float = 0.3,
                      alpha: float | None = None, convs: bool = False) -> Factors:
    """(down, up, alpha) for the attention projections (and, with ``convs``, the resnet 3x3 convs) of ``components``."""
    generator = torch.Generator().manual_seed(seed)
    factors: Factors = {}
    for component in components:
        module = getattr(pipe, component)
        suffixes = UNET_ATTENTION if component == "unet" else TEXT_ATTENTION
        for name, linear in sorted(target_linears(module, suffixes).items()):
            down = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=generator) * up_std
            factors[(component, name)] = (down, up, float(alpha if alpha is not None else rank))
        if convs and component == "unet":
            for name, conv in sorted(module.named_modules()):
                if isinstance(conv, torch.nn.Conv2d) and name.endswith(("conv1", "conv2")) and "resnets" in name:
                    out_ch, in_ch, kh, kw = conv.weight.shape
                    down = torch.randn(rank, in_ch, kh, kw, generator=generator) / (in_ch * kh * kw) ** 0.5
                    up = torch.randn(out_ch, rank, 1, 1, generator=generator) * up_std
                    factors[(component, name)] = (down, up, float(alpha if alpha is not None else rank))
    return factors


def kohya_state(factors: Factors) -> dict[str, torch.Tensor]:
    """``lora_unet_<path>.lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (kohya, A1111, Civitai)."""
    state = {}
    for (component, name), (down, up, alpha) in factors.items():
        key = f"{KOHYA_PREFIXES[component]}_{name.replace('.', '_')}"
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    return state


def write_kohya(path: Path, factors: Factors, metadata: dict[str, str] | None = None) -> Path:
    """The kohya layout (``kohya_state``) as a ``.safetensors`` file, with optional header ``metadata`` (kohya's
    ``ss_*`` fields, ``modelspec.*``)."""
    save_file(kohya_state(factors), str(path), metadata=metadata)
    return path


def write_diffusers(path: Path, factors: Factors) -> Path:
    """``unet.<path>.lora_A.weight`` / ``lora_B.weight`` with alpha/rank folded into B, as diffusers saves them."""
    state = {}
    for (component, name), (down, up, alpha) in factors.items():
        state[f"{component}.{name}.lora_A.weight"] = down
        state[f"{component}.{name}.lora_B.weight"] = up.float() * (alpha / down.shape[0])
    save_file(state, str(path))
    return path


def write_old_diffusers(path: Path, factors: Factors) -> Path:
    """The older diffusers layout: ``unet.<path>.lora.down.weight`` and ``text_encoder.<path>.lora_linear_layer...``."""
    state = {}
    for (component, name), (down, up, alpha) in factors.items():
        layer = "lora" if component == "unet" else "lora_linear_layer"
        state[f"{component}.{name}.{layer}.down.weight"] = down
        state[f"{component}.{name}.{layer}.up.weight"] = up.float() * (alpha / down.shape[0])
    save_file(state, str(path))
    return path


def write_peft_folder(folder: Path, factors: Factors) -> Path:
    """A PEFT adapter folder for the UNet: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    ranks = {down.shape[0] for down, _, _ in factors.values()}
    alphas = {alpha for _, _, alpha in factors.values()}
    assert len(ranks) == 1 and len(alphas) == 1 and all(c == "unet" for c, _ in factors)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": alphas.pop(),
              "target_modules": sorted({name.rsplit(".", 1)[-1] for _, name in factors})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = {}
    for (_, name), (down, up, _) in factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = down
        state[f"base_model.model.{name}.lora_B.weight"] = up
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


def write_sd15_shaped(path: Path, rank: int = 4) -> Path:
    """A LoRA with SD 1.5's module names and 768-wide cross-attention, which does not fit SDXL."""
    state = {}
    for block in ("down_blocks_0_attentions_0", "down_blocks_1_attentions_0", "mid_block_attentions_0"):
        key = f"lora_unet_{block}_transformer_blocks_0_attn2_to_k"
        state[f"{key}.lora_down.weight"] = torch.randn(rank, 768)
        state[f"{key}.lora_up.weight"] = torch.randn(320, rank)
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path
