"""LoRA source lists given by the environment (``PINNED_LORAS``, ``PRELOAD_LORAS``) and what pinning keeps.

A list is parsed like a job's ``loras`` entries; a bad item is a ``ValueError`` naming the variable and the item, so
the worker stops at start. Pinned entries are never evicted: on disk, the entry of each URL, Hugging Face or Civitai
source (and a downloaded entry named by its key); files placed by hand are never evicted anyway. In RAM, the worker
pins the parsed LoRAs' content keys once it has fetched them at start (pinned implies preloaded).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sdxl_worker.request.entries import Aliases, LoraRequest, SourceKind, parse_lora_requests
from sdxl_worker.store.housekeeping import KEY_PATTERN


def parse_sources(variable: str, sources: Sequence[str], aliases: Aliases | None = None) -> list[LoraRequest]:
    """The requests of a list of sources (names in ``aliases`` expanded); ``ValueError`` listing every bad item as
    ``VARIABLE[i]: reason``."""
    requests, errors = parse_lora_requests(list(sources), max_per_request=max(len(sources), 1), aliases=aliases)
    if errors:
        raise ValueError(f"{variable}: " + "; ".join(error.replace("loras[", f"{variable}[") for error in errors))
    return requests


def pinned_entry_keys(requests: Iterable[LoraRequest]) -> frozenset[str]:
    """The cache entry keys that pinning these requests keeps from eviction."""
    keys = set()
    for request in requests:
        if request.kind is not SourceKind.CACHE:
            keys.add(request.cache_key)
        elif KEY_PATTERN.match(request.source):
            keys.add(request.source)
    return frozenset(keys)
