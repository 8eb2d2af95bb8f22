"""Read a cached LoRA file or PEFT folder into per-module weight adapters, with diffusers' own key converters.

Accepted: kohya / A1111 / Civitai / LyCORIS / OneTrainer files (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*`` with
``.alpha``, SGM block names included: ``weights.kohya_names`` maps them), diffusers files (``unet.*``,
``text_encoder.*``, ``text_encoder_2.*`` in old and new layouts) and
PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, keys possibly prefixed
``base_model.model.``). ``.safetensors`` is read safely; ``.pt``/``.bin``/``.ckpt`` only with
``torch.load(weights_only=True)``. LyCORIS types (LoCon/Tucker, LoHa, LoKr, DoRA, full, norm) are read from the
file's own module names (``split_lycoris``), their module paths found with the same converters; types without an
adapter (IA3, GLoRA, OFT, BOFT, PEFT DoRA: ``weights.adapters.UNSUPPORTED_TYPES``) raise ``LoraError`` naming the type
instead of being dropped with a warning.

Every key of a file is applied or the file is refused: a key no adapter reads (a factor without its pair, an
``alpha`` of a module without factors, a name of no known layout) raises ``LoraError`` naming the key and why.

Steps, in ``load_lora``'s order: read the file, refuse unsupported types, cast, fold each LoRA's ``alpha / rank`` (or
PEFT's ``lora_alpha / r``) into its up factor (so every pair means ``delta W = up @ down``), rename kohya keys
(``weights.kohya_names``), convert the other keys to PEFT layout with diffusers' converters, group the keys per
module, build each module's adapter (``weights.adapters.ADAPTER_TYPES``), refuse any key left over.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors.torch import load_file

from sdxl_worker.errors import LoraError
from sdxl_worker.store.file_checks import PEFT_CONFIG, find_peft_weights
from sdxl_worker.weights.adapters import (KEY_NAMES, LYCORIS_KEY_NAMES, LYCORIS_MARKERS, WeightAdapter, adapter_for,
                                          refuse_unsupported, refuse_unsupported_peft)
from sdxl_worker.weights.kohya_names import convert_kohya_keys

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *TEXT_ENCODERS)
PEFT_PREFIX = "base_model.model."
_DOWN_SUFFIXES = (".lora_down.weight", ".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight")
_UP_OF_DOWN = {".lora_down.weight": ".lora_up.weight", ".lora.down.weight": ".lora.up.weight",
               ".lora_A.weight": ".lora_B.weight", ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight"}
_FACTOR_SUFFIXES = (*_DOWN_SUFFIXES, *_UP_OF_DOWN.values())
_SHOWN_KEYS = 5
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


@dataclass
class ParsedLora:
    """A LoRA ready to patch: an adapter per component (``unet``, ``text_encoder``, ``text_encoder_2``) and module
    path."""

    sha256: str  # content identity: the weights' sha256 (plus the adapter config's hash for PEFT folders)
    components: dict[str, dict[str, WeightAdapter]]

    @property
    def nbytes(self) -> int:
        return sum(adapter.nbytes for modules in self.components.values() for adapter in modules.values())

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


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_peft_config(config: object, name: str) -> None:
    """Raise ``LoraError`` naming the field when the ``adapter_config.json`` of the folder ``name`` cannot give each
    module's scale: ``r`` a positive integer, ``lora_alpha`` a finite number, ``rank_pattern``/``alpha_pattern``
    objects of those."""
    if not isinstance(config, dict):
        raise LoraError(f"{name}: {PEFT_CONFIG} is not a JSON object")
    problems = []
    if not _positive_int(config.get("r", 8)):
        problems.append(f"r must be a positive integer, got {config.get('r')!r:.40}")
    if not _finite_number(config.get("lora_alpha", 8)):
        problems.append(f"lora_alpha must be a finite number, got {config.get('lora_alpha')!r:.40}")
    for field_name, valid, what in (("rank_pattern", _positive_int, "positive integers"),
                                    ("alpha_pattern", _finite_number, "finite numbers")):
        pattern = config.get(field_name) or {}
        if not isinstance(pattern, dict) or not all(valid(value) for value in pattern.values()):
            problems.append(f"{field_name} must map module names to {what}, got {pattern!r:.60}")
    if problems:
        raise LoraError(f"{name}: {PEFT_CONFIG}: " + "; ".join(problems))


def _peft_scale(config: dict, module_path: str) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), honouring ``rank_pattern`` and ``alpha_pattern``
    (``config`` passed ``check_peft_config``)."""
    rank = config.get("r", 8)
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern):
            rank = value
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_peft_folder(folder: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A PEFT adapter folder as ``<component>.<module>.lora_A/B.weight`` keys with the scale folded into B."""
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise LoraError(f"{folder.name}: {PEFT_CONFIG} could not be read ({type(error).__name__})") from None
    check_peft_config(config, folder.name)
    refuse_unsupported_peft(config, folder.name)
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


def cast_factors(state: dict[str, torch.Tensor], device: torch.device | str,
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


def check_factors(state: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise ``LoraError`` naming the keys when a factor of the file ``name`` is not a matrix (or conv kernel) with
    every dimension above 0, or an ``.alpha`` is not a single number."""
    bad = [f"{key} {tuple(tensor.shape)}" for key, tensor in state.items()
           if (key.endswith(_FACTOR_SUFFIXES) and (tensor.dim() < 2 or 0 in tensor.shape))
           or (key.endswith(".alpha") and tensor.numel() != 1)]
    if bad:
        raise LoraError(f"{name}: {len(bad)} malformed tensor(s): factors must be matrices of rank >= 1 and each "
                        f"alpha a single number, e.g. {bad[:_SHOWN_KEYS]}")


def refuse_non_finite(state: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise ``LoraError`` naming the keys when a tensor of the file ``name`` (factors in the pipeline's dtype,
    alphas) holds NaN or an infinity. One device-to-host transfer for all tensors."""
    if not state:
        return
    keys = list(state)
    sums = torch.stack([state[key].sum(dtype=torch.float32) for key in keys])  # NaN or inf iff an element is
    finite = torch.isfinite(sums).cpu().tolist()
    bad = [key for key, ok in zip(keys, finite) if not ok]
    if bad:
        raise LoraError(f"{name}: {len(bad)} tensor(s) hold NaN or infinite values (or overflow the pipeline's "
                        f"dtype), e.g. {bad[:_SHOWN_KEYS]}")


def fold_alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Multiply each up factor by ``alpha / rank`` in place and drop the ``.alpha`` keys; an ``.alpha`` of a module
    without both factors stays (and is refused as a key no adapter reads)."""
    folded = dict(state)
    alpha_keys = [key for key in state if key.endswith(".alpha")]
    if not alpha_keys:
        return folded
    # One device-to-host transfer for all alphas, not one synchronizing .item() per module.
    alphas = torch.stack([folded.pop(key).reshape(()) for key in alpha_keys]).float().cpu().tolist()
    for key, alpha in zip(alpha_keys, alphas):
        base = key[: -len(".alpha")]
        down_key = next((base + s for s in _DOWN_SUFFIXES if base + s in folded), None)
        up_key = down_key and base + _UP_OF_DOWN[down_key[len(base):]]
        if up_key not in folded:
            folded[key] = state[key]
            continue
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


def _group_by_module(state: dict[str, torch.Tensor], names: tuple[str, ...] = KEY_NAMES
                     ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The keys per module path, named relative to it (``lora_A.weight``), split at ``names`` (the key names the
    adapter types read, longest first); and the keys that end in none of those names."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    loose = []
    for key, tensor in state.items():
        name = next((name for name in names if key.endswith("." + name) and len(key) > len(name) + 1), None)
        if name is None:
            loose.append(key)
        else:
            groups.setdefault(key[: -len(name) - 1], {})[name] = tensor
    return groups, loose


def split_lycoris(state: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The keys of plain LoRA pairs, and the modules (by the file's own module name) that a LyCORIS-style type reads:
    those with any key beyond a plain pair's (``lora_mid``, ``dora_scale``, ``hada_*``, ``lokr_*``, ``diff``, ...),
    all their keys kept, alpha included."""
    groups, _ = _group_by_module(state, LYCORIS_KEY_NAMES)
    lycoris = {module: keys for module, keys in groups.items() if LYCORIS_MARKERS & set(keys)}
    taken = {f"{module}.{name}" for module, keys in lycoris.items() for name in keys}
    return {key: value for key, value in state.items() if key not in taken}, lycoris


def _module_paths(modules: list[str], unet_config: dict | None) -> dict[str, tuple[str, str]]:
    """``(component, module path)`` for each of the file's module names, found by passing a 1x1 placeholder pair
    per module (valued by its index) through the same diffusers converters the plain pairs go through."""
    placeholders = {}
    for index, module in enumerate(modules):
        down, up = (".lora_down.weight", ".lora_up.weight") if module.startswith("lora_") else (".lora_A.weight",
                                                                                                ".lora_B.weight")
        placeholders[module + down] = torch.full((1, 1), float(index))
        placeholders[module + up] = torch.ones(1, 1)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(placeholders, unet_config=unet_config)
    found = {}
    for component in COMPONENTS:
        prefix = component + "."
        local = {key[len(prefix):]: value for key, value in converted.items() if key.startswith(prefix)}
        for key, value in _to_peft_layout(component, local).items():
            if key.endswith(".lora_A.weight"):
                found[modules[int(value.item())]] = (component, key[: -len(".lora_A.weight")])
    return found


def _adapters(groups: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device | str,
              dtype: torch.dtype) -> tuple[dict[str, WeightAdapter], list[str]]:
    """Each module's adapter on ``device`` in ``dtype``, and the keys no adapter read."""
    adapters, unread = {}, []
    for module, keys in groups.items():
        adapter, left = adapter_for(keys)
        if adapter is not None:
            adapters[module] = adapter.to(device, dtype)
        unread += [f"{module}.{name}" for name in left]
    return adapters, unread


def _why_unread(key: str) -> str:
    if key.endswith(".alpha"):
        return "an alpha of a module without lora_down/lora_up factors"
    if key.endswith(KEY_NAMES):
        return "a factor without the rest of its adapter"
    return "a weight of no adapter type this worker applies"


def refuse_unread(name: str, keys: list[str]) -> None:
    """Raise ``LoraError`` naming the keys of the file ``name`` that no adapter reads, and why, if there are any."""
    if keys:
        shown = "; ".join(f"{key!r} ({_why_unread(key)})" for key in sorted(keys)[:_SHOWN_KEYS])
        more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
        raise LoraError(f"{name}: {len(keys)} key(s) would not be applied, so the file is refused: {shown}{more}")


def load_lora(path: Path, sha256: str, unet_config: dict | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> ParsedLora:
    """Parse the LoRA at ``path`` (file or PEFT folder) into adapters on ``device`` in ``dtype``.

    Tensors are read straight onto ``device``; only key names are converted, so no tensor goes through the CPU twice.
    """
    state = _read_peft_folder(path, device) if path.is_dir() else _read_file(path, device)
    if not state:
        raise LoraError(f"{path.name} holds no tensors")
    refuse_unsupported(state, path.name)
    check_factors(state, path.name)
    state = cast_factors(state, device, dtype)
    refuse_non_finite(state, path.name)
    plain, lycoris = split_lycoris(state)
    converted = StableDiffusionXLPipeline.lora_state_dict(convert_kohya_keys(fold_alphas(plain), unet_config),
                                                          unet_config=unet_config)[0] if plain else {}
    components: dict[str, dict[str, WeightAdapter]] = {}
    unmatched: list[str] = []
    for component in COMPONENTS:
        prefix = component + "."
        local = {key[len(prefix):]: value for key, value in converted.items() if key.startswith(prefix)}
        if not local:
            continue
        groups, loose = _group_by_module(_to_peft_layout(component, local))
        components[component], unread = _adapters(groups, device, dtype)
        unmatched += [prefix + key for key in loose + unread]
    unmatched += [key for key in converted if not key.startswith(tuple(c + "." for c in COMPONENTS))]
    paths = _module_paths(sorted(lycoris), unet_config) if lycoris else {}
    for module, keys in lycoris.items():
        if module not in paths:
            unmatched += [f"{module}.{name}" for name in keys]
            continue
        component, module_path = paths[module]
        found, unread = _adapters({module_path: keys}, device, dtype)
        components.setdefault(component, {}).update(found)
        unmatched += [f"{module}.{name}" for name in unread]
    if not any(components.values()):
        raise LoraError(f"{path.name} holds no LoRA weights for an SDXL UNet or text encoder "
                        f"({len(state)} tensors, e.g. {sorted(state)[0]!r})")
    refuse_unread(path.name, unmatched)
    return ParsedLora(sha256=sha256, components=components)
