"""Every environment variable the worker reads, parsed once and strictly: ``WorkerSettings.from_env(env)``.

A malformed value raises ``ValueError`` naming the variable, so a misconfigured endpoint stops at start instead of
misbehaving on some job. ``VARIABLES`` lists each variable with its default as the README's tables show it (a test
holds the two together). Groups:

- ``ModelSettings``: which SDXL weights and dtype (``generation.models``).
- ``CacheSettings``: the LoRA disk cache and every download, LoRAs and ``image_url`` (``store``, ``sources``,
  ``net``). Fields without a variable (lock, lease, retry timings) keep the defaults below; tests set them directly.
- ``LoraSettings``: the RAM cache, overlap, fused-weight reuse, preloaded LoRAs and aliases (``weights``, ``worker``).
- ``UploadSettings``: the bucket that images go to through the runpod SDK's ``rp_upload`` (``output``).
- ``RuntimeSettings``: concurrency, logging and progress updates (``handler``, ``generation.progress``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sdxl_worker.request.aliases import load_aliases
from sdxl_worker.request.civitai_refs import CIVITAI_DOMAINS

GIB = 1024**3
MIB = 1024**2
VERIFY_MODES = ("first", "always", "changed")
DTYPES = ("auto", "float16", "bfloat16", "float32")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, the raw value used when it is unset or empty (``""``: none), and how the
    README shows that default when it is not simply that value."""

    name: str
    default: str = ""
    shown: str | None = None

    @property
    def shown_default(self) -> str:
        """The README's "default" cell for this variable."""
        if self.shown is not None:
            return self.shown
        return f"`{self.default}`" if self.default else "unset"


VARIABLES: dict[str, Variable] = {v.name: v for v in (
    Variable("SDXL_MODEL"),
    Variable("REFINER_MODEL", shown="baked refiner, else none"),
    Variable("SDXL_VAE"),
    Variable("SDXL_DTYPE", "auto"),
    Variable("BAKED_MODELS_MANIFEST", "/models/baked-models.json"),
    Variable("MAX_CONCURRENCY", "1"),
    Variable("PRELOAD_LORAS"),
    Variable("PINNED_LORAS"),
    Variable("LORA_RAM_CACHE_GB", "2"),
    Variable("LORA_OVERLAP", "1"),
    Variable("LORA_REUSE_FUSED", "1"),
    Variable("PROGRESS_INTERVAL_S", "1.0"),
    Variable("LOG_LEVEL", "INFO"),
    Variable("RUNPOD_WEBHOOK_POST_OUTPUT", shown="set by RunPod"),
    Variable("LORA_CACHE_DIR", shown="`/runpod-volume/loras` when `/runpod-volume` exists, else `/models/loras`"),
    Variable("LORA_MAX_BYTES", "2147483648"),
    Variable("LORA_MAX_PER_REQUEST", "8"),
    Variable("LORA_CACHE_MAX_GB", shown="unbounded"),
    Variable("LORA_CACHE_MIN_FREE_MB", "1024"),
    Variable("LORA_ALLOW_PRIVATE_HOSTS", "0"),
    Variable("LORA_CONNECT_TIMEOUT_S", "10"),
    Variable("LORA_READ_TIMEOUT_S", "60"),
    Variable("LORA_DOWNLOAD_RETRIES", "4"),
    Variable("LORA_DOWNLOAD_DEADLINE_S", "600"),
    Variable("LORA_MIN_THROUGHPUT_KBPS", "50"),
    Variable("LORA_VERIFY_ON_HIT", "first"),
    Variable("HF_TOKEN"),
    Variable("HF_ENDPOINT", "https://huggingface.co"),
    Variable("CIVITAI_TOKEN"),
    Variable("CIVITAI_API_BASE", "https://civitai.com"),
    Variable("LORA_ALIASES"),
    Variable("BUCKET_ENDPOINT_URL"),
    Variable("BUCKET_ACCESS_KEY_ID"),
    Variable("BUCKET_SECRET_ACCESS_KEY"),
    Variable("BUCKET_NAME", shown="the SDK's (`MM-YY`)"),
)}


def default_cache_dir() -> Path:
    """``/runpod-volume/loras`` when a network volume is mounted, else ``/models/loras``."""
    return Path("/runpod-volume/loras") if Path("/runpod-volume").is_dir() else Path("/models/loras")


def _raw(env: Mapping[str, str], name: str) -> str:
    """The stripped value of ``name``, or its declared default when unset or empty."""
    return (env.get(name) or "").strip() or VARIABLES[name].default


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = _raw(env, name).lower()
    if value not in _TRUE | _FALSE:
        raise ValueError(f"{name} must be 1 or 0, got {value!r}")
    return value in _TRUE


def _number(env: Mapping[str, str], name: str, kind: Callable[[str], N], minimum: float = 0) -> N | None:
    """The variable as a finite number >= ``minimum``; ``None`` when unset without a default."""
    raw = _raw(env, name)
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], fold: Callable[[str], str]) -> str:
    value = fold(_raw(env, name))
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _base_url(env: Mapping[str, str], name: str) -> str:
    raw = _raw(env, name).rstrip("/")
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{name} must be an http(s) URL like {VARIABLES[name].default}, got {raw!r}")
    return raw


def _text(env: Mapping[str, str], name: str) -> str | None:
    return _raw(env, name) or None


def source_list(value: str) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated list of LoRA sources."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class ModelSettings:
    """Which weights to serve (``generation.models.choose_models``) and in which dtype."""

    sdxl_model: str | None = None
    refiner_model: str | None = None  # None: unset (the baked refiner, if any); "": no refiner
    vae: str | None = None
    dtype: str = "auto"
    baked_manifest: Path = Path(VARIABLES["BAKED_MODELS_MANIFEST"].default)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ModelSettings:
        """``SDXL_MODEL``, ``REFINER_MODEL``, ``SDXL_VAE``, ``SDXL_DTYPE``, ``BAKED_MODELS_MANIFEST``."""
        refiner = env.get("REFINER_MODEL")
        return cls(sdxl_model=_text(env, "SDXL_MODEL"),
                   refiner_model=None if refiner is None else refiner.strip(),
                   vae=_text(env, "SDXL_VAE"),
                   dtype=_choice(env, "SDXL_DTYPE", DTYPES, str.lower),
                   baked_manifest=Path(_raw(env, "BAKED_MODELS_MANIFEST")))


@dataclass(frozen=True)
class CacheSettings:
    """Everything the cache and the downloaders need; tokens are kept out of ``repr``."""

    cache_dir: Path
    max_bytes: int = 2 * GIB
    max_per_request: int = 8
    cache_max_bytes: int | None = None
    allow_private_hosts: bool = False
    civitai_token: str | None = field(default=None, repr=False)
    hf_token: str | None = field(default=None, repr=False)
    hf_endpoint: str = "https://huggingface.co"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    download_retries: int = 4
    download_deadline_s: float = 600.0     # one download, all attempts together (net.pace)
    min_throughput_kbps: float = 50.0      # 0: no throughput check
    throughput_window_s: float = 30.0
    verify_on_hit: str = "first"
    civitai_hosts: tuple[str, ...] = CIVITAI_DOMAINS
    civitai_api_base: str = "https://civitai.com"
    min_free_bytes: int = 1024 * MIB
    pinned_sources: tuple[str, ...] = ()
    retry_backoff_s: float = 1.0
    retry_wait_max_s: float = 30.0
    lock_stale_s: float = 180.0
    lock_wait_s: float = 3600.0
    lock_idle_s: float = 300.0             # a waiter gives up when the holder's download has not grown this long
    heartbeat_s: float = 10.0
    lease_stale_s: float = 900.0
    evict_grace_s: float = 120.0
    tmp_stale_s: float = 3600.0
    free_check_bytes: int = 8 * MIB        # how often (bytes written) a download re-reads the free space

    def __post_init__(self) -> None:
        if self.verify_on_hit not in VERIFY_MODES:
            raise ValueError(f"LORA_VERIFY_ON_HIT must be one of {', '.join(VERIFY_MODES)}, got {self.verify_on_hit!r}")

    @property
    def secrets(self) -> tuple[str, ...]:
        """Token values that must never appear in logs, errors or manifests."""
        return tuple(token for token in (self.civitai_token, self.hf_token) if token)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CacheSettings:
        """The ``LORA_*`` download and cache variables, ``HF_*``, ``CIVITAI_*`` and ``PINNED_LORAS``."""
        budget_gb = _number(env, "LORA_CACHE_MAX_GB", float)
        return cls(
            cache_dir=Path(_raw(env, "LORA_CACHE_DIR") or default_cache_dir()),
            max_bytes=_number(env, "LORA_MAX_BYTES", int),
            max_per_request=_number(env, "LORA_MAX_PER_REQUEST", int),
            cache_max_bytes=None if budget_gb is None else int(budget_gb * GIB),
            allow_private_hosts=_flag(env, "LORA_ALLOW_PRIVATE_HOSTS"),
            civitai_token=_text(env, "CIVITAI_TOKEN"),
            hf_token=_text(env, "HF_TOKEN"),
            hf_endpoint=_base_url(env, "HF_ENDPOINT"),
            connect_timeout_s=_number(env, "LORA_CONNECT_TIMEOUT_S", float),
            read_timeout_s=_number(env, "LORA_READ_TIMEOUT_S", float),
            download_retries=_number(env, "LORA_DOWNLOAD_RETRIES", int),
            download_deadline_s=_number(env, "LORA_DOWNLOAD_DEADLINE_S", float, minimum=1),
            min_throughput_kbps=_number(env, "LORA_MIN_THROUGHPUT_KBPS", float),
            verify_on_hit=_raw(env, "LORA_VERIFY_ON_HIT").lower(),
            civitai_api_base=_base_url(env, "CIVITAI_API_BASE"),
            min_free_bytes=int(_number(env, "LORA_CACHE_MIN_FREE_MB", float) * MIB),
            pinned_sources=source_list(_raw(env, "PINNED_LORAS")),
        )


@dataclass(frozen=True)
class LoraSettings:
    """How the worker keeps and applies parsed LoRAs."""

    ram_cache_bytes: int = 2 * GIB
    overlap: bool = True
    reuse_fused: bool = True
    preload_sources: tuple[str, ...] = ()
    aliases: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LoraSettings:
        """``LORA_RAM_CACHE_GB``, ``LORA_OVERLAP``, ``LORA_REUSE_FUSED``, ``PRELOAD_LORAS``, ``LORA_ALIASES``."""
        return cls(ram_cache_bytes=int(_number(env, "LORA_RAM_CACHE_GB", float) * GIB),
                   overlap=_flag(env, "LORA_OVERLAP"),
                   reuse_fused=_flag(env, "LORA_REUSE_FUSED"),
                   preload_sources=source_list(_raw(env, "PRELOAD_LORAS")),
                   aliases=load_aliases(_raw(env, "LORA_ALIASES")))


@dataclass(frozen=True)
class UploadSettings:
    """The bucket of ``rp_upload`` (which reads the same variables itself when it uploads)."""

    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    bucket_name: str | None = None

    @property
    def missing(self) -> list[str]:
        """The credential variables that ``BUCKET_ENDPOINT_URL`` needs but are not set."""
        names = {"BUCKET_ACCESS_KEY_ID": self.access_key_id, "BUCKET_SECRET_ACCESS_KEY": self.secret_access_key}
        return [name for name, value in names.items() if not value]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> UploadSettings:
        """``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``, ``BUCKET_NAME``."""
        return cls(endpoint_url=_text(env, "BUCKET_ENDPOINT_URL"), access_key_id=_text(env, "BUCKET_ACCESS_KEY_ID"),
                   secret_access_key=_text(env, "BUCKET_SECRET_ACCESS_KEY"), bucket_name=_text(env, "BUCKET_NAME"))


@dataclass(frozen=True)
class RuntimeSettings:
    """Concurrency, logging and progress updates."""

    max_concurrency: int = 1
    log_level: str = "INFO"
    progress_interval_s: float = 1.0
    progress_remote: bool = False  # RunPod's cloud sets RUNPOD_WEBHOOK_POST_OUTPUT; updates are then posted

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RuntimeSettings:
        """``MAX_CONCURRENCY``, ``LOG_LEVEL``, ``PROGRESS_INTERVAL_S``, ``RUNPOD_WEBHOOK_POST_OUTPUT``."""
        return cls(max_concurrency=_number(env, "MAX_CONCURRENCY", int, minimum=1),
                   log_level=_choice(env, "LOG_LEVEL", LOG_LEVELS, str.upper),
                   progress_interval_s=_number(env, "PROGRESS_INTERVAL_S", float),
                   progress_remote=bool(_raw(env, "RUNPOD_WEBHOOK_POST_OUTPUT")))

    @property
    def log_level_number(self) -> int:
        """``log_level`` as a ``logging`` level."""
        return logging.getLevelName(self.log_level)


@dataclass(frozen=True)
class WorkerSettings:
    """All of the worker's settings."""

    models: ModelSettings
    cache: CacheSettings
    loras: LoraSettings
    upload: UploadSettings
    runtime: RuntimeSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """Read every variable of ``VARIABLES`` from ``env``; ``ValueError`` naming the first malformed one."""
        return cls(models=ModelSettings.from_env(env), cache=CacheSettings.from_env(env),
                   loras=LoraSettings.from_env(env), upload=UploadSettings.from_env(env),
                   runtime=RuntimeSettings.from_env(env))
