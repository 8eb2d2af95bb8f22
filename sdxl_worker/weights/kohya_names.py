"""kohya-style LoRA key names (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*``) -> diffusers module paths.

kohya sd-scripts names a LoRA module ``<prefix>_<module path with dots as underscores>``; for SDXL the UNet path is
in the SGM (original Stability) layout it trains on (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``input_blocks_1_0_in_layers_2``, ``input_blocks_3_0_op``, ``output_blocks_2_2_conv``, ``middle_block_1_proj_in``,
``time_embed_0``, ``label_emb_0_0``, ``out_2``); LyCORIS, OneTrainer and others use the same scheme, some with the
diffusers UNet's paths (``down_blocks_1_attentions_0_...``). Both are mapped here, every module kind the trainers
target (attention projections, ``proj_in``/``proj_out``, ``ff_net_0_proj``/``ff_net_2``, resnet convs,
``emb_layers_1``, ``skip_connection``, down- and upsampler convs, time and label embeddings, ``conv_in``/``conv_out``,
text encoders' ``self_attn_*_proj`` and ``mlp_fc1``/``mlp_fc2``). A name that maps to nothing raises ``LoraError``
naming the key; a name that maps to a path the model lacks is refused by the patcher's check, also by name.

The underscores are read back as dots except inside the multi-word names of ``COMPOUND_NAMES``; the SGM blocks are
renumbered from the UNet config (``layers_per_block``, which up blocks have attentions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sdxl_worker.errors import LoraError

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
KOHYA_FACTORS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
# Module names holding an underscore, in the SGM UNet, the diffusers UNet and the CLIP text encoders.
COMPOUND_NAMES = frozenset({
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb", "down_blocks", "mid_block", "up_blocks", "transformer_blocks", "proj_in", "proj_out",
    "to_q", "to_k", "to_v", "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "text_projection", "token_embedding",
    "position_embedding"})
_LONGEST_COMPOUND = max(name.count("_") + 1 for name in COMPOUND_NAMES)
_SGM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
# SGM resnet layers -> diffusers ResnetBlock2D layers.
_RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
                  "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_SGM_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
            "out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}
_SDXL_UNET = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def dotted(name: str) -> str:
    """``name`` with its underscores read back as dots, except inside the names of ``COMPOUND_NAMES``."""
    tokens, parts, index = name.split("_"), [], 0
    while index < len(tokens):
        for width in range(min(_LONGEST_COMPOUND, len(tokens) - index), 0, -1):
            candidate = "_".join(tokens[index:index + width])
            if width == 1 or candidate in COMPOUND_NAMES:
                parts.append(candidate)
                index += width
                break
    return ".".join(parts)


def _resnet_layer(rest: str) -> str:
    if rest not in _RESNET_LAYERS:
        raise ValueError(f"{rest!r} is no layer of an SGM resnet block")
    return _RESNET_LAYERS[rest]


def sgm_to_diffusers(path: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """A dotted SGM UNet module path as the diffusers UNet's; ``ValueError`` (the reason) when it names no block.

    Block numbers follow the SGM layout: ``input_blocks.N`` (N >= 1) is down block ``(N-1) // (L+1)``, layer
    ``(N-1) % (L+1)`` (the last layer being the downsampler), ``output_blocks.N`` is up block ``N // (L+1)``, layer
    ``N % (L+1)``, with ``L`` the config's ``layers_per_block``; inside a layer, ``.0`` is the resnet, ``.1`` the
    attention (or the upsampler of an up block without attentions), ``.2`` the upsampler.
    """
    config = {**_SDXL_UNET, **(unet_config or {})}
    layers = config["layers_per_block"]
    for sgm, diffusers in _SGM_TOP.items():
        if path == sgm or path.startswith(sgm + "."):
            return diffusers + path[len(sgm):]
    parts = path.split(".")
    try:
        head, numbers = parts[0], [int(part) for part in parts[1:3 if parts[0] != "middle_block" else 2]]
    except ValueError:
        raise ValueError(f"{path!r} has no SGM block number") from None
    rest = ".".join(parts[1 + len(numbers):])
    if head == "middle_block":
        block = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}.get(numbers[0])
        if block is None:
            raise ValueError(f"{path!r}: the middle block has layers 0..2")
        return f"{block}.{_resnet_layer(rest) if 'resnets' in block else rest}"
    if len(numbers) < 2 or not rest:
        raise ValueError(f"{path!r} names no layer inside an SGM block")
    number, inner = numbers
    if head == "input_blocks":
        down, layer = divmod(number - 1, layers + 1)
        if inner == 0 and layer == layers:
            if rest != "op":
                raise ValueError(f"{path!r}: a downsampler has only its 'op' conv")
            return f"down_blocks.{down}.downsamplers.0.conv"
        if inner == 0:
            return f"down_blocks.{down}.resnets.{layer}.{_resnet_layer(rest)}"
        if inner == 1:
            return f"down_blocks.{down}.attentions.{layer}.{rest}"
    if head == "output_blocks":
        up, layer = divmod(number, layers + 1)
        up_types = config["up_block_types"]
        attention = up < len(up_types) and "CrossAttn" in up_types[up]
        if inner == 0:
            return f"up_blocks.{up}.resnets.{layer}.{_resnet_layer(rest)}"
        if inner == 1 and attention:
            return f"up_blocks.{up}.attentions.{layer}.{rest}"
        if inner in (1, 2):
            return f"up_blocks.{up}.upsamplers.0.{rest}"
    raise ValueError(f"{path!r} names no SGM UNet block")


def kohya_module(name: str, unet_config: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(component, diffusers module path)`` of a kohya module name (``lora_unet_...``); ``ValueError`` if none."""
    prefix = next((prefix for prefix in KOHYA_PREFIXES if name.startswith(prefix)), None)
    if prefix is None:
        raise ValueError("not a kohya module name")
    component, path = KOHYA_PREFIXES[prefix], dotted(name[len(prefix):])
    if component == "unet" and path.split(".", 1)[0] in _SGM_HEADS:
        path = sgm_to_diffusers(path, unet_config)
    return component, path


def is_kohya_key(key: str) -> bool:
    """Whether ``key`` is named the kohya way (``lora_unet_...``, ``lora_te1_...``, ``lora_te2_...``)."""
    return key.startswith(tuple(KOHYA_PREFIXES))


def convert_kohya_keys(state: Mapping[str, torch.Tensor],
                       unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with every kohya key renamed ``<component>.<diffusers path>.<name>`` (``lora_down``/``lora_up``
    as ``lora_A``/``lora_B``); other keys unchanged. ``LoraError`` names a kohya key that maps to no module."""
    converted = {}
    for key, tensor in state.items():
        if not is_kohya_key(key):
            converted[key] = tensor
            continue
        module, _, name = key.partition(".")
        try:
            component, path = kohya_module(module, unet_config)
        except ValueError as reason:
            raise LoraError(f"key {key!r} names no module of an SDXL UNet or text encoder: {reason}") from None
        converted[f"{component}.{path}.{KOHYA_FACTORS.get(name, name)}"] = tensor
    return converted
