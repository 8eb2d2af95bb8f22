"""Read a cached LoRA file or PEFT folder into per-module low-rank factors, with diffusers' own key converters.

Accepted: kohya / A1111 / Civitai files (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*`` with ``.alpha``, sgm block
names included), diffusers files (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*`` in old and new layouts) and
PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, keys possibly prefixed
``base_model.model.``). ``.safetensors`` is read safely; ``.pt``/``.bin``/``.ckpt`` only with
``torch.load(weights_only=True)``. Types that cannot be applied exactly as a low-rank delta (LoHa, LoKr, DoRA, IA3,
OFT, full-weight diffs, GLoRA) raise ``LoraError`` naming the type instead of being dropped with a warning.

Each LoRA's ``alpha / rank`` (or PEFT's ``lora_alpha / r``) is folded into its up factor before conversion, so every
factor pair means ``delta W = up @ down``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors.torch import load_file

from sdxl_worker.errors import LoraError
from sdxl_worker.store.file_checks import PEFT_CONFIG, find_peft_weights

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *TEXT_ENCODERS)
PEFT_PREFIX = "base_model.model."
UNSUPPORTED_TYPES = {
    re.compile(r"\.hada_"): "LoHa (LyCORIS)",
    re.compile(r"\.lokr_"): "LoKr (LyCORIS)",
    re.compile(r"dora_scale|lora_magnitude_vector"): "DoRA",
    re.compile(r"\.oft_"): "OFT",
    re.compile(r"\.ia3_|\.ia3\b"): "IA3",
    re.compile(r"\.diff(_b)?$"): "full-weight difference (LyCORIS 'full')",
    re.compile(r"\.(w_norm|b_norm)$"): "norm tuning (LyCORIS)",
}
_DOWN_SUFFIXES = (".lora_down.weight", ".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight")
_UP_OF_DOWN = {".lora_down.weight": ".lora_up.weight", ".lora.down.weight": ".lora.up.weight",
               ".lora_A.weight": ".lora_B.weight", ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight"}
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank update: ``delta W = up @ down`` (conv factors are flattened on use)."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class ParsedLora:
    """A LoRA ready to patch: factors per component (``unet``, ``text_encoder``, ``text_encoder_2``) and module path."""

    sha256: str  # content identity: the weights' sha256 (plus the adapter config's hash for PEFT folders)
    components: dict[str, dict[str, LoraFactors]]
    unmatched_keys: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for modules in self.components.values() for f in modules.values())

    @property
    def module_count(self) -> int:
        return sum(len(modules) for modules in self.components.values())


def _read_file(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return load_file(str(path), device=str(device))
        if suffix in (".pt", ".bin", ".ckpt"):
            loaded = torch.load(str(path), map_location=device, weights_only=True)
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise LoraError(f"{path.name} does not hold a flat dict of tensors")
            return state
    except LoraError:
        raise
    except Exception as error:  # noqa: BLE001 - any reader failure is a bad file, reported by name
        raise LoraError(f"{path.name} could not be read as LoRA weights ({type(error).__name__}: {error})") from None
    raise LoraError(f"{path.name}: unsupported file type {suffix!r} (use .safetensors, .pt, .bin or .ckpt)")


def _peft_scale(config: dict, module_path: str) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), honouring ``rank_pattern`` and ``alpha_pattern``."""
    rank, alpha = config.get("r", 8), config.get("lora_alpha", config.get("r", 8))
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern):
            rank = value
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_peft_folder(folder: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A PEFT adapter folder as ``<component>.<module>.lora_A/B.weight`` keys with the scale folded into B."""
    config = json.loads((folder / PEFT_CONFIG).read_text())
    if config.get("use_dora"):
        raise LoraError(f"{folder.name}: DoRA adapters are not supported (use_dora in {PEFT_CONFIG})")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"{folder.name}: PEFT type {config.get('peft_type')} is not supported, only LORA")
    weights = find_peft_weights(folder)
    if weights is None:
        raise LoraError(f"{folder.name}: no adapter_model.safetensors in the PEFT folder")
    raw = _read_file(weights, device)
    text_encoder = any("text_model." in key for key in raw)
    component = "text_encoder" if text_encoder else "unet"
    state = {}
    for key, tensor in raw.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _PAIR.match(name)
        if match and match["side"] == "B":
            tensor = tensor.float() * _peft_scale(config, match["module"])
        state[f"{component}.{name}"] = tensor
    return state


def _refuse_unsupported(keys: list[str], name: str) -> None:
    for pattern, kind in UNSUPPORTED_TYPES.items():
        if any(pattern.search(key) for key in keys):
            raise LoraError(f"{name}: {kind} weights are not supported; only plain LoRA (low-rank up/down) files are")


def _cast_factors(state: dict[str, torch.Tensor], device: torch.device | str,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor but the ``.alpha`` scalars on ``device`` in ``dtype``, each in one pass, before any arithmetic.

    ``state`` was just read from the file, so a tensor already on ``device`` in ``dtype`` is kept as it is (no copy:
    on a GPU that is one kernel fewer per tensor). Each result still owns its memory, so folding can work in place:
    a tensor whose storage an earlier key shares (possible in a ``.pt`` file) is copied.
    """
    cast, seen = {}, set()
    for key, value in state.items():
        if key.endswith(".alpha"):
            cast[key] = value
            continue
        storage = value.untyped_storage().data_ptr()
        cast[key] = value.to(device=device, dtype=dtype, copy=storage in seen)
        seen.add(storage)
    return cast


def _fold_alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Multiply each up factor by ``alpha / rank`` in place and drop the ``.alpha`` keys."""
    folded = dict(state)
    alpha_keys = [key for key in state if key.endswith(".alpha")]
    if not alpha_keys:
        return folded
    # One device-to-host transfer for all alphas, not one synchronizing .item() per module.
    alphas = torch.stack([folded.pop(key).reshape(()) for key in alpha_keys]).float().cpu().tolist()
    for key, alpha in zip(alpha_keys, alphas):
        base = key[: -len(".alpha")]
        down_key = next((base + s for s in _DOWN_SUFFIXES if base + s in folded), None)
        if down_key is None:
            continue
        up_key = base + _UP_OF_DOWN[down_key[len(base):]]
        if up_key in folded:
            folded[up_key].mul_(alpha / folded[down_key].shape[0])
    return folded


def _to_peft_layout(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Component-local keys in PEFT layout (``<module>.lora_A.weight``) via diffusers' converters."""
    if component == "unet":
        converted = convert_unet_state_dict_to_peft(state)
    elif any("to_out_lora" in k or "lora_linear_layer" in k for k in state):
        converted = convert_state_dict_to_peft(state)
    else:
        converted = state
    return {key.replace(".processor.", ".").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
            for key, v in converted.items()}


def _pairs(state: dict[str, torch.Tensor]) -> tuple[dict[str, LoraFactors], list[str]]:
    downs, ups, loose = {}, {}, []
    for key, tensor in state.items():
        match = _PAIR.match(key)
        if match is None:
            loose.append(key)
        else:
            (downs if match["side"] == "A" else ups)[match["module"]] = tensor
    factors = {module: LoraFactors(down=downs[module], up=ups[module]) for module in downs.keys() & ups.keys()}
    loose += [f"{m}.lora_A.weight" for m in downs.keys() - ups.keys()]
    loose += [f"{m}.lora_B.weight" for m in ups.keys() - downs.keys()]
    return factors, loose


def load_lora(path: Path, sha256: str, unet_config: dict | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> ParsedLora:
    """Parse the LoRA at ``path`` (file or PEFT folder) into factors on ``device`` in ``dtype``.

    Tensors are read straight onto ``device``; only key names are converted, so no tensor goes through the CPU twice.
    """
    state = _read_peft_folder(path, device) if path.is_dir() else _read_file(path, device)
    if not state:
        raise LoraError(f"{path.name} holds no tensors")
    _refuse_unsupported(list(state), path.name)
    state = _fold_alphas(_cast_factors(state, device, dtype))
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet_config)
    components: dict[str, dict[str, LoraFactors]] = {}
    unmatched: list[str] = []
    for component in COMPONENTS:
        prefix = component + "."
        local = {key[len(prefix):]: value for key, value in converted.items() if key.startswith(prefix)}
        if not local:
            continue
        factors, loose = _pairs(_to_peft_layout(component, local))
        unmatched += [prefix + key for key in loose]
        components[component] = {
            module: LoraFactors(down=f.down.to(device=device, dtype=dtype), up=f.up.to(device=device, dtype=dtype))
            for module, f in factors.items()
        }
    unmatched += [key for key in converted if not key.startswith(tuple(c + "." for c in COMPONENTS))]
    if not any(components.values()):
        raise LoraError(f"{path.name} holds no LoRA weights for an SDXL UNet or text encoder "
                        f"({len(state)} tensors, e.g. {sorted(state)[0]!r})")
    return ParsedLora(sha256=sha256, components=components, unmatched_keys=sorted(unmatched))
