"""Settings of the LoRA disk cache and of every download (LoRAs and ``image_url``), read from the environment.

Environment variables (default):

- ``LORA_CACHE_DIR``: the cache folder (``/runpod-volume/loras`` when ``/runpod-volume`` exists, else
  ``/models/loras``). Shared safely by processes and machines that mount the same volume.
- ``LORA_MAX_BYTES``: the largest file accepted, in bytes, for one LoRA or one ``image_url`` (2147483648 = 2 GiB).
- ``LORA_MAX_PER_REQUEST``: the most LoRAs one job may list (8).
- ``LORA_CACHE_MAX_GB``: budget for downloaded entries in GiB (1024**3 bytes); least recently used entries are
  evicted above it, never one a running job holds. Files placed in the cache folder by hand are neither counted
  nor evicted. Unset or empty: unbounded.
- ``LORA_ALLOW_PRIVATE_HOSTS``: ``1``/``true``/``yes`` lets URLs reach loopback, private, link-local and other
  non-public addresses (off). The cloud metadata addresses stay refused even then.
- ``LORA_CONNECT_TIMEOUT_S`` (10) and ``LORA_READ_TIMEOUT_S`` (60): per-request connect and read timeouts.
- ``LORA_DOWNLOAD_RETRIES``: retries after the first attempt on connection errors, timeouts, 429 and 5xx (4).
- ``LORA_VERIFY_ON_HIT``: when a cache hit re-hashes the file against its manifest: ``first`` (default: the first
  time this process uses the entry, then again only if its size/mtime/inode change), ``always`` (every hit), or
  ``changed`` (only when size/mtime differ from the manifest's; a bit flip that keeps the mtime goes unnoticed).
- ``LORA_CACHE_MIN_FREE_MB``: free space (MiB, 1024**2 bytes) a download must leave on the cache's file system
  (1024). Below it, least recently used entries are evicted first; if that is not enough the download is refused.
  ``0`` turns the floor off.
- ``PINNED_LORAS``: comma-separated LoRA sources (the forms of a ``loras`` entry) whose entries are never evicted,
  from disk or RAM; they are fetched and parsed at start. Checked when the cache opens (``store.pinning``).
- ``CIVITAI_TOKEN``: sent as ``Authorization: Bearer`` to Civitai hosts and the ``CIVITAI_API_BASE`` host only
  (unset).
- ``CIVITAI_API_BASE``: the Civitai site whose ``/api/v1/model-versions/<id>`` resolves Civitai sources
  (``https://civitai.com``); trusted like ``HF_ENDPOINT`` (not subject to the private-address rule). The download
  URL it returns and every redirect are checked like any URL.
- ``HF_TOKEN``: used for Hugging Face repos, and sent as ``Authorization: Bearer`` to the ``HF_ENDPOINT`` host for
  plain URLs (unset).
- ``HF_ENDPOINT``: the Hugging Face Hub to talk to (``https://huggingface.co``); trusted, not subject to the
  private-address rule.

Fields without a variable (lock, lease, retry timings) keep the defaults below; tests set them directly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sdxl_worker.request.civitai_refs import CIVITAI_DOMAINS

GIB = 1024**3
MIB = 1024**2
DEFAULT_MIN_FREE_MB = 1024
VERIFY_MODES = ("first", "always", "changed")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def default_cache_dir() -> Path:
    """``/runpod-volume/loras`` when a network volume is mounted, else ``/models/loras``."""
    return Path("/runpod-volume/loras") if Path("/runpod-volume").is_dir() else Path("/models/loras")


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
    verify_on_hit: str = "first"
    civitai_hosts: tuple[str, ...] = CIVITAI_DOMAINS
    civitai_api_base: str = "https://civitai.com"
    min_free_bytes: int = DEFAULT_MIN_FREE_MB * MIB
    pinned_sources: tuple[str, ...] = ()
    retry_backoff_s: float = 1.0
    retry_wait_max_s: float = 30.0
    lock_stale_s: float = 180.0
    lock_wait_s: float = 3600.0
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
    def from_env(cls, env: Mapping[str, str] | None = None) -> CacheSettings:
        """Read the variables listed in the module docstring; a malformed value raises ``ValueError`` naming it."""
        env = os.environ if env is None else env
        budget_gb = _number(env, "LORA_CACHE_MAX_GB", None, float)
        return cls(
            cache_dir=Path(env.get("LORA_CACHE_DIR") or default_cache_dir()),
            max_bytes=_number(env, "LORA_MAX_BYTES", 2 * GIB, int),
            max_per_request=_number(env, "LORA_MAX_PER_REQUEST", 8, int),
            cache_max_bytes=None if budget_gb is None else int(budget_gb * GIB),
            allow_private_hosts=_flag(env, "LORA_ALLOW_PRIVATE_HOSTS"),
            civitai_token=env.get("CIVITAI_TOKEN") or None,
            hf_token=env.get("HF_TOKEN") or None,
            hf_endpoint=(env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            connect_timeout_s=_number(env, "LORA_CONNECT_TIMEOUT_S", 10.0, float),
            read_timeout_s=_number(env, "LORA_READ_TIMEOUT_S", 60.0, float),
            download_retries=_number(env, "LORA_DOWNLOAD_RETRIES", 4, int),
            verify_on_hit=(env.get("LORA_VERIFY_ON_HIT") or "first").strip().lower(),
            civitai_api_base=_base_url(env, "CIVITAI_API_BASE", "https://civitai.com"),
            min_free_bytes=int(_number(env, "LORA_CACHE_MIN_FREE_MB", DEFAULT_MIN_FREE_MB, float) * MIB),
            pinned_sources=source_list(env.get("PINNED_LORAS", "")),
        )


def source_list(value: str) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated list of LoRA sources."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _base_url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = (env.get(name) or default).strip().rstrip("/")
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{name} must be an http(s) URL like {default}, got {raw!r}")
    return raw


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value not in _TRUE | _FALSE:
        raise ValueError(f"{name} must be 1 or 0, got {value!r}")
    return value in _TRUE


def _number(env: Mapping[str, str], name: str, default, kind):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {raw!r}")
    return value
