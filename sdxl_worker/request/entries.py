"""A job's ``loras`` list -> validated ``LoraRequest`` objects, with every problem reported at once.

An entry is a string source or ``{"path": source, "scale": 1.0}`` with optional ``te_scale``, ``weight_name``,
``revision``, ``sha256`` (64 hex digits) and ``name`` (a label for reports). ``scale`` is a finite number (not a
bool) with ``|scale| <= 10``; negative values are allowed. ``scale`` is the UNet's strength and, unless ``te_scale``
is given, the text encoders' too (ComfyUI's ``strength_model`` / ``strength_clip``, A1111's ``unet=`` / ``te=``).
A part at scale 0 is left untouched.

How a source string is read (surrounding whitespace ignored):

- ``civitai:<versionId>``, a Civitai AIR URN, or a Civitai download or model-version page URL -> a Civitai model
  version (``civitai_source``); every form of one version is the same LoRA;
- ``http://`` or ``https://`` -> a URL to download (any other ``scheme://`` is refused);
- ``owner/repo`` (exactly one ``/``, Hugging Face id characters) -> a Hugging Face repo;
- a name without ``/`` -> an entry already in the cache: a file or folder in the cache root, e.g.
  ``my_style.safetensors``, a PEFT folder, or a downloaded entry's folder name.

``weight_name`` and ``revision`` apply to Hugging Face repos only. The same source (same normalized source, weight
name and revision) twice in one job is an error; for cache names, ``x`` and ``x.safetensors`` count as the same
(the cache tries ``x.safetensors`` when ``x`` is absent).

A name listed in ``LORA_ALIASES`` (``request.aliases``), given as a string or as ``path``, stands for the alias's
entry: its source and options, with the job entry's own keys taking precedence (see ``expand_alias``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from sdxl_worker.net.redact import public_url, redact_url
from sdxl_worker.net.url_safety import cache_name_problem, url_problem
from sdxl_worker.request.civitai_refs import civitai_ref

MAX_SCALE = 10.0
MAX_SOURCE_CHARS = 2048
MAX_NAME_CHARS = 200
KNOWN_KEYS = ("path", "scale", "te_scale", "weight_name", "revision", "sha256", "name")
CACHE_DEFAULT_EXTENSION = ".safetensors"
Aliases = Mapping[str, Mapping[str, Any]]
_HF_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HF_REPO = re.compile(rf"^{_HF_PART}/{_HF_PART}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199}$")


class SourceKind(StrEnum):
    """Where a source string leads (see the module docstring); the values are what logs and cache keys hold."""

    CIVITAI = "civitai"
    URL = "url"
    HF = "hf"
    CACHE = "cache"


def source_kind(source: str) -> SourceKind:
    """The ``SourceKind`` of a source string; ``ValueError`` (the reason) if it is none of them."""
    if civitai_ref(source) is not None:
        return SourceKind.CIVITAI
    if "://" in source:
        scheme = source.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme '{scheme}' (only http and https)")
        problem = url_problem(source)
        if problem:
            raise ValueError(f"refused URL: {problem}")
        if not urlsplit(source).hostname:
            raise ValueError("the URL has no host")
        return SourceKind.URL
    if "/" in source:
        if _HF_REPO.match(source) and ".." not in source and "--" not in source:
            return SourceKind.HF
        raise ValueError("must be an http(s) URL, a Hugging Face repo 'owner/repo', a Civitai source or a cache entry "
                         "name")
    problem = cache_name_problem(source)
    if problem:
        raise ValueError(problem)
    return SourceKind.CACHE


@dataclass(frozen=True)
class LoraRequest:
    """One validated LoRA of a job."""

    index: int
    source: str
    scale: float = 1.0
    weight_name: str | None = None
    revision: str | None = None
    sha256: str | None = None
    name: str | None = None
    origin: str | None = None   # where the job named it, when not ``loras[index]`` (e.g. a prompt tag)
    text_encoder_scale: float | None = None  # ``te_scale`` as given; ``None``: the same as ``scale``

    @property
    def te_scale(self) -> float:
        """The text encoders' strength: ``te_scale`` when given, else ``scale``."""
        return self.scale if self.text_encoder_scale is None else self.text_encoder_scale

    @property
    def is_off(self) -> bool:
        """Both strengths are 0: the LoRA changes nothing."""
        return self.scale == 0 and self.te_scale == 0

    @property
    def ref(self) -> str:
        """Where the job named this LoRA, for messages: ``loras[2]`` or ``prompt <lora:pixel:0.8>``."""
        return self.origin or f"loras[{self.index}]"

    @property
    def kind(self) -> SourceKind:
        """Where the source leads (see the module docstring)."""
        return source_kind(self.source)

    @property
    def identity(self) -> tuple[str, str, str, str]:
        """What makes two requests the same LoRA: kind, normalized source (a Civitai version id for every Civitai
        form), weight name, revision."""
        kind = self.kind
        normalizers = {SourceKind.URL: public_url, SourceKind.HF: str.lower, SourceKind.CIVITAI: _civitai_version,
                       SourceKind.CACHE: _cache_stem}
        normalized = normalizers[kind](self.source)
        return kind, normalized, self.weight_name or "", self.revision or ""

    @property
    def cache_key(self) -> str:
        """The folder name of this source's cache entry: 32 hex digits of the sha256 of ``identity``."""
        return hashlib.sha256("\n".join(self.identity).encode()).hexdigest()[:32]

    @property
    def label(self) -> str:
        """``name``, or a short form of the source without query strings or credentials."""
        if self.name:
            return self.name
        if "://" in self.source:
            shown = redact_url(self.source).removesuffix("?…").split("://", 1)[-1]
            return shown if len(shown) <= 60 else f"{shown[:28]}…{shown[-28:]}"
        return self.source if not self.weight_name else f"{self.source}:{self.weight_name}"


def _civitai_version(source: str) -> str:
    ref = civitai_ref(source)
    return str(ref.version_id) if ref else source


def _cache_stem(name: str) -> str:
    return name.removesuffix(CACHE_DEFAULT_EXTENSION)


def _shown(value: Any) -> str:
    if isinstance(value, str) and "://" in value:
        value = redact_url(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_source(value: Any, where: str, errors: list[str]) -> str | None:
    if not isinstance(value, str) or not value.strip():
        errors.append(f"{where}: must be a non-empty string (URL, 'owner/repo', Civitai source or cache name), "
                      f"got {_shown(value)}")
        return None
    source = value.strip()
    if len(source) > MAX_SOURCE_CHARS:
        errors.append(f"{where}: must have at most {MAX_SOURCE_CHARS} characters, got {len(source)}")
        return None
    try:
        source_kind(source)
    except ValueError as reason:
        errors.append(f"{where}: {reason}, got {_shown(source)}")
        return None
    return source


def _check_scale(value: Any, where: str, errors: list[str]) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(float(value)) and abs(float(value)) <= MAX_SCALE
        except OverflowError:
            ok = False
    if not ok:
        errors.append(f"{where}: must be a number with |scale| <= {MAX_SCALE:g}, got {_shown(value)}")
        return None
    return float(value)


def _check_text(value: Any, where: str, errors: list[str], pattern: re.Pattern | None, rule: str) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS
            or (pattern is not None and not pattern.match(value))):
        errors.append(f"{where}: must be {rule}, got {_shown(value)}")
        return None
    return value


def _check_weight_name(value: Any, where: str, errors: list[str]) -> str | None:
    name = _check_text(value, where, errors, None, "a file path inside the repo")
    if name is not None and (name.startswith("/") or "\\" in name or "\0" in name
                             or any(part in ("", ".", "..") for part in name.split("/"))):
        errors.append(f"{where}: must be a relative file path inside the repo without '..', got {_shown(name)}")
        return None
    return name


def expand_alias(raw: Any, aliases: Aliases) -> Any:
    """A job entry naming an alias, as the alias's entry overlaid with the job entry's own keys.

    ``"pixel"`` becomes ``{**alias, "name": "pixel"}`` (the alias's ``name`` wins if it has one);
    ``{"path": "pixel", "scale": 0.5}`` becomes the same with ``scale`` 0.5. Anything else is returned unchanged.
    """
    path = raw if isinstance(raw, str) else raw.get("path") if isinstance(raw, dict) else None
    if not isinstance(path, str) or path.strip() not in aliases:
        return raw
    name = path.strip()
    expanded = {"name": name, **aliases[name]}
    if isinstance(raw, dict):
        expanded.update((key, value) for key, value in raw.items() if key != "path")
    return expanded


def parse_entry(index: int, raw: Any, errors: list[str], where: str | None = None,
                aliases: Aliases | None = None) -> LoraRequest | None:
    """One entry of a ``loras`` list (or an entry built for it); problems go to ``errors`` prefixed by ``where``."""
    origin = where
    where = where or f"loras[{index}]"
    raw = expand_alias(raw, aliases or {})
    if isinstance(raw, str):
        source = _check_source(raw, where, errors)
        return None if source is None else LoraRequest(index=index, source=source, origin=origin)
    if not isinstance(raw, dict):
        errors.append(f"{where}: must be a source string or an object with path and scale, got {type(raw).__name__}")
        return None
    count = len(errors)
    unknown = sorted(str(key) for key in raw if key not in KNOWN_KEYS)
    if unknown:
        errors.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(KNOWN_KEYS)})")
    if "path" not in raw:
        errors.append(f"{where}.path: required")
    source = _check_source(raw["path"], f"{where}.path", errors) if "path" in raw else None
    scale = _check_scale(raw.get("scale", 1.0), f"{where}.scale", errors)
    te_scale = None if raw.get("te_scale") is None else _check_scale(raw["te_scale"], f"{where}.te_scale", errors)
    weight_name = _check_weight_name(raw.get("weight_name"), f"{where}.weight_name", errors)
    revision = _check_text(raw.get("revision"), f"{where}.revision", errors, _REVISION,
                           "a branch, tag or commit name")
    sha256 = _check_text(raw.get("sha256"), f"{where}.sha256", errors, _SHA256, "64 hexadecimal digits")
    name = _check_text(raw.get("name"), f"{where}.name", errors, None,
                       f"a non-empty string of at most {MAX_NAME_CHARS} characters")
    if source is not None and source_kind(source) is not SourceKind.HF:
        for key in ("weight_name", "revision"):
            if raw.get(key) is not None:
                errors.append(f"{where}.{key}: only applies to Hugging Face repos ('owner/repo')")
    if len(errors) > count or source is None or scale is None:
        return None
    return LoraRequest(index=index, source=source, scale=scale, weight_name=weight_name, revision=revision,
                       sha256=sha256.lower() if sha256 else None, name=name, origin=origin,
                       text_encoder_scale=te_scale)


def parse_lora_requests(raw: object, max_per_request: int,
                        aliases: Aliases | None = None) -> tuple[list[LoraRequest], list[str]]:
    """Validate a job's ``loras`` value; returns ``(requests, errors)``, ``requests`` empty when there are errors.

    Never raises: any JSON value is accepted and described. A list longer than ``max_per_request`` gives one error
    about the count, without looking at its entries. Names in ``aliases`` stand for their entries.
    """
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [f"loras: must be a list of LoRA sources or objects with path and scale, got {type(raw).__name__}"]
    if len(raw) > max_per_request:
        return [], [f"loras: at most {max_per_request} LoRAs per request (LORA_MAX_PER_REQUEST), got {len(raw)}"]
    errors: list[str] = []
    requests: list[LoraRequest] = []
    first_by_identity: dict[tuple[str, str, str, str], int] = {}
    for index, entry in enumerate(raw):
        request = parse_entry(index, entry, errors, aliases=aliases)
        if request is None:
            continue
        first = first_by_identity.setdefault(request.identity, index)
        if first != index:
            errors.append(f"loras[{index}]: the same LoRA as loras[{first}] (same source, weight_name and revision)")
        requests.append(request)
    return ([], errors) if errors else (requests, [])
