"""LyCORIS files for the tiny SDXL written by the trainer's own code (``lycoris-lora``'s kohya network), and the
reference weights its functional API (``lycoris.functional``) gives for them: the oracle of the type tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from lycoris.functional import general, locon, loha, lokr
from lycoris.kohya import create_network
from safetensors.torch import load_file

PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention"]
text_encoder_target_name = []
"""
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def write_lycoris(pipe, path: Path, algo: str, seed: int, rank: int = 4, alpha: float = 2.0, std: float = 0.15,
                  **options) -> Path:
    """A ``.safetensors`` file of LyCORIS type ``algo`` on the attention, resnet and conv layers of ``pipe``'s UNet
    and text encoders, its factors drawn from ``seed`` (trainers initialize one side to zero), DoRA magnitudes moved
    off the weight norms they start at."""
    preset = path.with_suffix(".preset.toml")
    preset.write_text(PRESET)
    torch.manual_seed(seed)
    # Copies: the network rewires the forward of the modules it is applied to.
    text_encoders = [copy.deepcopy(pipe.text_encoder), copy.deepcopy(pipe.text_encoder_2)]
    unet = copy.deepcopy(pipe.unet)
    network = create_network(1.0, rank, alpha, pipe.vae, text_encoders, unet, algo=algo, conv_dim=rank,
                             conv_alpha=alpha, preset=str(preset), **options)
    network.apply_to(text_encoders, unet, True, True)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith("dora_scale"):
                param.mul_(1 + 0.3 * torch.rand_like(param))
            else:
                param.normal_(0, std)
    network.save_weights(str(path), torch.float32, None)
    return path


def pipe_modules(pipe) -> dict[str, torch.nn.Module]:
    """Every module of the UNet and both text encoders by its kohya name (``lora_unet_down_blocks_0_...``)."""
    return {f"{prefix}_{name.replace('.', '_')}": module for component, prefix in PREFIXES.items()
            for name, module in getattr(pipe, component).named_modules() if name}


def reference_weight(weight: torch.Tensor, keys: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """One module's weight with its LyCORIS keys merged at ``strength`` in float32 by ``lycoris.functional``:
    ``W + strength * delta``, or with ``dora_scale`` LyCORIS's ``weight_decompose(W + delta, dora, strength)``."""
    weight = weight.float()
    get = keys.get
    alpha = float(keys["alpha"]) if "alpha" in keys else None
    if "lora_down.weight" in keys:
        down = get("lora_down.weight")
        delta = locon.diff_weight(down, get("lora_up.weight"), get("lora_mid.weight"),
                                  gamma=(alpha or down.shape[0]) / down.shape[0], backend="torch")
    elif "hada_w1_a" in keys:
        rank = get("hada_w1_b").shape[0]
        delta = loha.diff_weight(get("hada_w1_b"), get("hada_w1_a"), get("hada_w2_b"), get("hada_w2_a"),
                                 get("hada_t1"), get("hada_t2"), gamma=(alpha or rank) / rank, backend="torch")
    elif any(name.startswith("lokr_") for name in keys):
        delta = lokr.diff_weight(get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"), get("lokr_w2_a"),
                                 get("lokr_w2_b"), get("lokr_t2"), gamma=alpha or 1.0, backend="torch")
    elif "diff" in keys:
        delta = get("diff")
    else:
        delta = get("w_norm")
    delta = delta.reshape(weight.shape)
    if "dora_scale" in keys:
        dora = keys["dora_scale"]
        return general.weight_decompose(weight + delta, dora, strength, wd_on_out=dora.shape[0] == weight.shape[0]
                                        and dora.numel() == weight.shape[0], backend="torch")
    return general.add_scaled(weight, delta, strength, backend="torch")


def merge_reference(pipe, path: Path, strength: float) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Merge the LyCORIS file at ``path`` into ``pipe``'s weights (and biases, for ``diff_b``/``b_norm``) at
    ``strength`` with ``reference_weight``; the replaced tensors by parameter (``restore`` puts them back)."""
    replaced = {}
    state = load_file(str(path))
    modules = pipe_modules(pipe)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, name = key.split(".", 1)
        per_module.setdefault(module, {})[name] = value
    with torch.no_grad():
        for module, keys in per_module.items():
            target = modules[module]
            replaced[target.weight] = target.weight.data
            target.weight.data = reference_weight(target.weight, keys, strength).to(target.weight.dtype)
            bias = keys.get("diff_b", keys.get("b_norm"))
            if bias is not None:
                replaced[target.bias] = target.bias.data
                target.bias.data = general.add_scaled(target.bias.float(), bias, strength, backend="torch")
    return replaced


def restore(replaced: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """Put back the tensors ``merge_reference`` replaced."""
    for param, data in replaced.items():
        param.data = data
