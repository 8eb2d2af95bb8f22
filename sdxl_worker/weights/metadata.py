"""What a LoRA file says about itself, read from the safetensors header only (never a tensor byte).

A safetensors file starts with an 8-byte little-endian length and a JSON header whose ``__metadata__`` object holds
string fields. Trainers write there:

- kohya sd-scripts: ``ss_base_model_version`` (``sd_v1``, ``sd_v2``, ``sd_v2_v``, ``sdxl_base_v1-0``, ``flux1``,
  ...), ``ss_v2`` (older files), ``ss_sd_model_name``, ``ss_output_name``, ``ss_network_module``/``_dim``/``_alpha``,
  ``ss_tag_frequency`` (a JSON string ``{dataset: {tag: count}}``);
- the SAI model spec (``modelspec.*``, kohya too): ``architecture`` (``stable-diffusion-xl-v1-base/lora``,
  ``stable-diffusion-v1/lora``, ``flux-1-dev/lora``, ...), ``title``, ``trigger_phrase``.

Read here: ``name`` = ``modelspec.title``, else ``ss_output_name``; ``base_model`` = the family found in
``modelspec.architecture``, else ``ss_base_model_version``, else ``ss_v2`` = True (SD 2.x); an unrecognized value
is reported as written; ``trigger_words`` = ``modelspec.trigger_phrase`` split at commas, else the most frequent
tags of ``ss_tag_frequency`` (summed over its datasets; those with the highest count, at most
``MAX_TAG_TRIGGER_WORDS``, in the file's order). PEFT folders: the adapter file's header, and the
``base_model_name_or_path`` of ``adapter_config.json`` as the base model when the header names none. ``.pt`` files
carry no metadata. Trigger words that the source published (Civitai's trained words for the version, kept in the
cache manifest) come first, then the file's, each once (``with_published_words``).

``base_model_problem`` refuses a LoRA whose metadata names a family other than SDXL; missing or unrecognized
metadata is allowed (``fusion``'s shape check still guards).

Parsing is bounded (``bounded_json``), so a hostile header costs little and raises nothing: a header over
``MAX_METADATA_HEADER_BYTES``, nested deeper than a safetensors header is (``HEADER_DEPTH``) or with more than
``MAX_HEADER_KEYS`` keys is not read (no metadata; text encoders assumed patched); an ``ss_tag_frequency`` over
``MAX_TAG_FREQUENCY_BYTES``, deeper than ``{dataset: {tag: count}}`` or with more than ``MAX_HEADER_KEYS`` keys gives
no tag trigger words; at most ``MAX_METADATA_FIELDS`` ``__metadata__`` fields are read.

``may_patch_text_encoders`` tells from the header's tensor names whether a LoRA may change a text encoder, so a job
can choose its order (``weights.session``) before any tensor is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxl_worker.store.file_checks import MAX_HEADER_BYTES, PEFT_CONFIG, find_peft_weights

if TYPE_CHECKING:
    from sdxl_worker.store.cache import ResolvedLora

LOG = logging.getLogger(__name__)
SDXL = "SDXL"
MAX_TAG_TRIGGER_WORDS = 3
MAX_PHRASE_TRIGGER_WORDS = 10
MAX_TEXT_CHARS = 200
# A LoRA's header: ~500 kB for an SDXL LoRA with both text encoders, more with a long ss_tag_frequency or thumbnail.
MAX_METADATA_HEADER_BYTES = 16 * 1024 * 1024
HEADER_DEPTH = 3                # {name: {"shape": [...]}}
TAG_FREQUENCY_DEPTH = 2         # {dataset: {tag: count}}
MAX_HEADER_KEYS = 200_000       # ~3 keys a tensor: ~65000 tensors
MAX_METADATA_FIELDS = 1_000     # kohya writes ~60
MAX_TAG_FREQUENCY_BYTES = 4 * 1024 * 1024
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")
# Tensor names that parsing (``weights.load``) can route to a text encoder: kohya ``lora_te_``/``lora_te1_``/
# ``lora_te2_`` and diffusers ``text_encoder.``/``text_encoder_2.`` in a file; ``text_model.`` in a PEFT folder.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")
PEFT_TEXT_MODEL = "text_model."
# (prefix of the lower-cased value, family); the first match wins, so specific prefixes come first.
ARCHITECTURES = (("stable-diffusion-xl-v1-refiner", "SDXL refiner"), ("stable-diffusion-xl", SDXL),
                 ("stable-diffusion-v1", "SD 1.x"), ("stable-diffusion-v2", "SD 2.x"),
                 ("stable-diffusion-3", "SD 3"), ("stable-diffusion-v3", "SD 3"), ("stable-cascade", "Stable Cascade"),
                 ("flux", "Flux"), ("chroma", "Flux"), ("lumina", "Lumina"))
VERSIONS = (("sdxl", SDXL), ("sd_v1", "SD 1.x"), ("sd_1", "SD 1.x"), ("sd1", "SD 1.x"), ("sd_v2", "SD 2.x"),
            ("sd_2", "SD 2.x"), ("sd2", "SD 2.x"), ("sd3", "SD 3"), ("sd_3", "SD 3"), ("flux", "Flux"),
            ("chroma", "Flux"), ("lumina", "Lumina"))


@dataclass(frozen=True)
class LoraMetadata:
    """Name, base model and trigger words of a LoRA; ``family``/``evidence`` say what the base model came from."""

    name: str | None = None
    base_model: str | None = None
    trigger_words: tuple[str, ...] = ()
    family: str | None = None      # a recognized family (``SDXL``, ``SD 1.x``, ...), None when unknown
    evidence: str | None = None    # e.g. "ss_base_model_version='sd_v1'"

    def report(self) -> dict[str, Any]:
        """The ``metadata`` object of a LoRA in job outputs and cache listings."""
        return {"name": self.name, "base_model": self.base_model, "trigger_words": list(self.trigger_words)}


def bounded_json(data: bytes, max_depth: int, max_keys: int) -> Any:
    """``data`` parsed as JSON, or ``None`` when it is not JSON, nests deeper than ``max_depth`` or holds more than
    ``max_keys`` object keys. The bounds are checked on the text (strings stripped) before parsing, in linear time."""
    bare = _JSON_STRING.sub(b'""', data)
    if bare.count(b":") > max_keys:
        return None
    brackets = _JSON_BRACKET.findall(bare)
    if len(brackets) > 4 * (max_keys + 1):  # a header or tag table has at most ~2 brackets per key
        return None
    depth = 0
    for bracket in brackets:
        depth += 1 if bracket in (b"{", b"[") else -1
        if depth > max_depth:
            return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _read_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (tensor names and ``__metadata__``), or ``None`` when it cannot be
    read."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 2 <= length <= min(MAX_HEADER_BYTES, MAX_METADATA_HEADER_BYTES):
                return None
            header = bounded_json(handle.read(length), HEADER_DEPTH, MAX_HEADER_KEYS)
    except OSError as error:
        LOG.debug("no header read from %s: %s", path.name, error)
        return None
    return header if isinstance(header, dict) else None


def read_header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file, from its header alone; ``{}`` when there are none."""
    metadata = (_read_header(path) or {}).get("__metadata__")
    if not isinstance(metadata, dict):
        return {}
    fields = (item for item in metadata.items() if isinstance(item[1], str))
    return {str(key): value for _, (key, value) in zip(range(MAX_METADATA_FIELDS), fields)}


def _header_file(path: Path) -> Path | None:
    """The safetensors file whose header describes the LoRA file or PEFT folder at ``path``, or ``None`` (a pickled
    file, or a PEFT folder without safetensors weights)."""
    weights = find_peft_weights(path) if path.is_dir() else path
    return weights if weights is not None and weights.suffix.lower() == ".safetensors" else None


def may_patch_text_encoders(path: Path) -> bool:
    """Whether the LoRA file or PEFT folder at ``path`` may change a text encoder, from its tensor names in the
    safetensors header alone (never a tensor byte).

    ``False`` only when no name can reach a text encoder when parsed (``weights.load``): a file's kohya
    ``lora_te*`` and diffusers ``text_encoder*`` names, a PEFT folder's ``text_model.`` names. ``True`` as well when
    the names cannot be read from a header (``.pt``/``.bin``/``.ckpt`` weights, a broken header).
    """
    header_file = _header_file(path)
    header = _read_header(header_file) if header_file is not None else None
    if header is None:
        return True
    names = [name for name in header if name != "__metadata__"]
    if path.is_dir():
        return any(PEFT_TEXT_MODEL in name for name in names)
    return any(name.startswith(TEXT_ENCODER_PREFIXES) for name in names)


def _short(value: str | None) -> str | None:
    value = (value or "").strip()
    return value[:MAX_TEXT_CHARS] or None


def _family(value: str, table: tuple[tuple[str, str], ...]) -> str | None:
    lowered = value.strip().lower()
    return next((family for prefix, family in table if lowered.startswith(prefix)), None)


def _base_model(fields: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """``(reported base model, recognized family, evidence)``."""
    shown = None
    for key, table in (("modelspec.architecture", ARCHITECTURES), ("ss_base_model_version", VERSIONS)):
        value = _short(fields.get(key))
        if value is None:
            continue
        family = _family(value, table)
        if family is not None:
            return family, family, f"{key}={value!r}"
        shown = shown or value
    if fields.get("ss_v2", "").strip().lower() == "true":
        return "SD 2.x", "SD 2.x", "ss_v2='True'"
    return shown, None, None


def _tag_words(raw: str | None) -> tuple[str, ...]:
    encoded = (raw or "").encode("utf-8", "replace")
    if len(encoded) > MAX_TAG_FREQUENCY_BYTES:
        return ()
    datasets = bounded_json(encoded, TAG_FREQUENCY_DEPTH, MAX_HEADER_KEYS) if encoded else {}
    counts: Counter[str] = Counter()
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(count, int) and not isinstance(count, bool) and tag.strip():
                counts[tag.strip()[:MAX_TEXT_CHARS]] += count
    if not counts:
        return ()
    top = max(counts.values())
    return tuple(tag for tag, count in counts.items() if count == top)[:MAX_TAG_TRIGGER_WORDS]


def _trigger_words(fields: dict[str, str]) -> tuple[str, ...]:
    phrase = fields.get("modelspec.trigger_phrase", "")
    words = [word.strip()[:MAX_TEXT_CHARS] for word in phrase.split(",") if word.strip()]
    if words:
        return merge_trigger_words(words)[:MAX_PHRASE_TRIGGER_WORDS]
    return _tag_words(fields.get("ss_tag_frequency"))


def metadata_from_fields(fields: dict[str, str], base_model_hint: str | None = None) -> LoraMetadata:
    """``LoraMetadata`` from header fields; ``base_model_hint`` (a PEFT config's base model) when they name none."""
    base_model, family, evidence = _base_model(fields)
    return LoraMetadata(name=_short(fields.get("modelspec.title")) or _short(fields.get("ss_output_name")),
                        base_model=base_model or _short(base_model_hint), trigger_words=_trigger_words(fields),
                        family=family, evidence=evidence)


def _peft_base_model(folder: Path) -> str | None:
    try:
        value = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=1024)
def lora_metadata(path: Path, identity: str) -> LoraMetadata:
    """The metadata of a LoRA file or PEFT folder; ``identity`` (its sha256, or a stat stamp) keys this memo and
    must change when the content does."""
    header_file = _header_file(path)
    fields = read_header_metadata(header_file) if header_file is not None else {}
    return metadata_from_fields(fields, _peft_base_model(path) if path.is_dir() else None)


def base_model_problem(metadata: LoraMetadata) -> str | None:
    """Why the metadata rules the LoRA out for SDXL, or ``None`` (SDXL, unknown or no metadata)."""
    if metadata.family is None or metadata.family == SDXL:
        return None
    return (f"its metadata says it was trained for {metadata.family} ({metadata.evidence}), not SDXL; "
            "use an SDXL LoRA")


def merge_trigger_words(*sources: Iterable[str]) -> tuple[str, ...]:
    """Trigger words from several sources, in order, each once (ignoring case)."""
    merged: dict[str, str] = {}
    for source in sources:
        for word in source:
            merged.setdefault(word.lower(), word)
    return tuple(merged.values())


def with_published_words(metadata: LoraMetadata, published: Iterable[str]) -> LoraMetadata:
    """``metadata`` with the trigger words its source published (Civitai's trained words) before the file's own."""
    merged = merge_trigger_words(published, metadata.trigger_words)
    return metadata if merged == metadata.trigger_words else dataclasses.replace(metadata, trigger_words=merged)


def metadata_of(item: ResolvedLora) -> LoraMetadata:
    """The metadata of a resolved LoRA (the file's, memoized by path and content hash), with the trigger words its
    source published first."""
    return with_published_words(lora_metadata(item.path, item.sha256), item.trigger_words)


def job_trigger_words(resolved: Iterable[ResolvedLora]) -> tuple[str, ...]:
    """The trigger words of a job's LoRAs with a non-zero scale (UNet or text encoders), in job order, each once."""
    return merge_trigger_words(*(metadata_of(item).trigger_words for item in resolved if not item.request.is_off))
