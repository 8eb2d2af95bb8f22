"""Is this file a LoRA weights file that can be read safely? Checks run before anything enters the cache.

- ``.safetensors``: the header must parse (``safetensors.safe_open``) and list at least one tensor.
- ``.pt``/``.bin``/``.ckpt``: must load with ``torch.load(weights_only=True, map_location="cpu")`` and hold at least
  one tensor; a pickle that would run code is refused by that loader and its code never runs.
- Any other extension is refused. HTML and JSON pages served under a LoRA's name are recognized and named as such.
- PEFT folders: ``adapter_config.json`` (a JSON object) plus ``adapter_model.safetensors`` (or ``.bin``).

Tensor names are not checked: telling LoRA formats apart is ``weights.load``'s job (and its adapters').
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

from sdxl_worker.errors import LoraError

WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".bin", ".ckpt")
PICKLE_EXTENSIONS = (".pt", ".bin", ".ckpt")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024
HTML_MESSAGE = ("the server sent an HTML page, not a LoRA file (a login or web page instead of a direct download "
                "link?)")


def sha256_file(path: Path) -> str:
    """Lower-case hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _head(path: Path, size: int = 512) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def _page_problem(head: bytes) -> str | None:
    if b"\0" in head[:16]:
        return None  # binary: a safetensors length prefix or a pickle, never a text page
    text = head.lstrip()[:64].lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")):
        return HTML_MESSAGE
    if text.startswith((b"{", b"[")):
        return "the server sent a JSON document, not a LoRA file"
    return None


def sniff_extension(path: Path) -> str | None:
    """``.safetensors`` or ``.pt`` judged from the content, or ``None`` when it looks like neither."""
    head = _head(path, 16)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= MAX_HEADER_BYTES and head[8:9] == b"{" and path.stat().st_size >= 8 + header_len:
            return ".safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return ".pt"
    return None


def choose_extension(path: Path, *names: str | None) -> str:
    """The weights type of ``path``: the first allowed extension among ``names`` (e.g. the served file name, then
    the URL's last segment), else the content's; ``LoraError`` for another extension on the first name or none."""
    for position, name in enumerate(names):
        suffix = Path(name).suffix.lower() if name else ""
        if suffix in WEIGHT_EXTENSIONS:
            return suffix
        if position == 0 and suffix and name:
            raise LoraError(f"unsupported file type '{suffix}' of '{name}' (expected one of "
                            f"{', '.join(WEIGHT_EXTENSIONS)})")
    sniffed = sniff_extension(path)
    if sniffed is None:
        problem = _page_problem(_head(path))
        raise LoraError(problem or "not a LoRA weights file (neither safetensors nor a PyTorch file)")
    return sniffed


def check_weights_file(path: Path, extension: str) -> int:
    """Number of tensors in the file; ``LoraError`` naming the problem if it is not a safe, non-empty weights file."""
    if path.stat().st_size == 0:
        raise LoraError("the file is empty")
    problem = _page_problem(_head(path))
    if problem:
        raise LoraError(problem)
    if extension == ".safetensors":
        return _count_safetensors(path)
    if extension in PICKLE_EXTENSIONS:
        return _count_torch(path, extension)
    raise LoraError(f"unsupported file type '{extension}' (expected one of {', '.join(WEIGHT_EXTENSIONS)})")


def _count_safetensors(path: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            count = len(list(handle.keys()))
    except (SafetensorError, OSError) as error:
        raise LoraError(f"not a valid safetensors file ({str(error)[:120]})") from None
    if count == 0:
        raise LoraError("the safetensors file holds no tensors")
    return count


def _count_torch(path: Path, extension: str) -> int:
    import torch

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - any failure means the file is refused
        raise LoraError(f"refused {extension} file: it does not load with torch.load(weights_only=True); only plain "
                        f"tensors are accepted and pickled code is never run ({type(error).__name__})") from None
    stack, count = [loaded], 0
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            count += 1
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    if count == 0:
        raise LoraError(f"the {extension} file holds no tensors")
    return count


def find_peft_weights(folder: Path) -> Path | None:
    """The first of ``PEFT_WEIGHTS`` that is a file in ``folder``, else ``None`` (nothing is checked)."""
    return next((folder / name for name in PEFT_WEIGHTS if (folder / name).is_file()), None)


def peft_weights(folder: Path) -> Path:
    """The adapter weights file of a valid PEFT folder; ``LoraError`` if the folder is not one."""
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise LoraError(f"not a PEFT adapter folder: {PEFT_CONFIG} is missing or not a JSON object")
    weights = find_peft_weights(folder)
    if weights is None:
        raise LoraError(f"not a PEFT adapter folder: none of {', '.join(PEFT_WEIGHTS)} found")
    check_weights_file(weights, weights.suffix)
    return weights
