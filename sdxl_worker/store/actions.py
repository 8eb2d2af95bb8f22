"""Cache management through the job endpoint: ``{"input": {"action": "list_loras" | "prefetch" | "evict" |
"cache_stats", ...}}``, each checked against its own schema (``request.schema.ACTION_SCHEMAS``) like a job.

- ``list_loras``: downloaded entries (key, source without secrets, name, size, sha256, times, whether in use,
  metadata), LoRA files and PEFT folders placed by hand (name, size, metadata; sha256 only when this process already
  hashed the file, else ``null``: hashing gigabytes to list them would be slow), and the aliases.
- ``prefetch``: ``loras`` (the entry forms of a job, aliases included) are fetched and verified like a job's, and
  their metadata read; nothing is parsed or applied. One result per entry (``downloaded``, ``cached`` or ``error``):
  a bad entry does not stop the others. Entries already done stay leased until the call ends, so a later entry
  cannot evict them. A LoRA whose metadata names another base model is reported as an ``error`` (it stays cached).
- ``evict``: ``loras`` entries name downloaded entries by key (the 32-hex folder name), by source (URL or
  ``owner/repo`` with the job's ``weight_name``/``revision``: the same entry a job would use) or by alias. One result
  per entry: ``evicted``, ``not_cached`` or ``refused`` with the reason: in use by a running job (any worker),
  used within the eviction grace period, being fetched, or placed by hand (the endpoint owner's files are never
  deleted by a job). The deletion is atomic (``housekeeping.trash``); the RAM cache is left alone (it is keyed by
  content: a later job fetches the file again and finds the same parsed LoRA, or a new one if the content changed).
- ``cache_stats``: the disk cache's ``stats()`` and the RAM cache's; counters count since this process started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sdxl_worker.errors import InputError, LoraError
from sdxl_worker.net.redact import scrub
from sdxl_worker.net.url_safety import resolve_in_cache
from sdxl_worker.request.aliases import shown_aliases
from sdxl_worker.request.entries import Aliases, LoraRequest, SourceKind, parse_lora_requests
from sdxl_worker.request.schema import ACTION_SCHEMAS, ACTIONS, MAX_ACTION_LORAS
from sdxl_worker.request.validation import check_fields, raise_if_any
from sdxl_worker.store.cache import LoraCache
from sdxl_worker.store.file_checks import PEFT_CONFIG, PEFT_WEIGHTS, WEIGHT_EXTENSIONS
from sdxl_worker.store.housekeeping import KEY_PATTERN, EvictStatus, Refusal, RefusalReason, scan_entries
from sdxl_worker.store.manifest import read_manifest
from sdxl_worker.weights.metadata import base_model_problem, lora_metadata, metadata_of, with_published_words
from sdxl_worker.weights.ram_cache import LoraRamCache

LOG = logging.getLogger(__name__)
Progress = Callable[[str], None]


def is_action(raw: Any) -> bool:
    """Whether a job's input asks for a cache action rather than images."""
    return isinstance(raw, dict) and "action" in raw


class CacheActions:
    """The four actions on one worker's caches; ``run`` validates the input and dispatches."""

    def __init__(self, cache: LoraCache, ram_cache: LoraRamCache, aliases: Aliases) -> None:
        self.cache = cache
        self.ram_cache = ram_cache
        self.aliases = aliases

    def run(self, raw: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Validate ``raw`` against its action's schema (all problems at once) and perform it."""
        action = raw.get("action")
        if not isinstance(action, str) or action not in ACTION_SCHEMAS:
            raise InputError(f"Invalid input: action: must be one of {', '.join(ACTIONS)}, got {action!r:.60}")
        values, errors = check_fields(raw, ACTION_SCHEMAS[action])
        requests: list[LoraRequest] = []
        loras_rule = ACTION_SCHEMAS[action].get("loras")
        if loras_rule is not None and loras_rule["constraints"](values.get("loras")):
            requests, lora_errors = parse_lora_requests(values["loras"], MAX_ACTION_LORAS, self.aliases)
            errors += lora_errors
        raise_if_any(errors)
        LOG.info("cache action %s (%d LoRA entries)", action, len(requests))
        return {"action": action, **getattr(self, f"_{action}")(requests, progress)}

    def _shown(self, text: str) -> str:
        return scrub(text, self.cache.settings.secrets)

    # -- list_loras -----------------------------------------------------------------------------------------------

    def _list_loras(self, _requests: list[LoraRequest], _progress: Progress) -> dict[str, Any]:
        entries = []
        for entry in sorted(scan_entries(self.cache.root), key=lambda item: -item.manifest.last_used_at):
            manifest = entry.manifest
            metadata = with_published_words(lora_metadata(self.cache.root / entry.key / manifest.path,
                                                          manifest.sha256), manifest.trigger_words)
            entries.append({
                "key": entry.key, "source": self._shown(manifest.source), "name": self._shown(manifest.display_name),
                "kind": manifest.kind, "weight_name": manifest.weight_name, "revision": manifest.revision,
                "size_bytes": entry.size, "sha256": manifest.sha256, "downloaded_at": manifest.downloaded_at,
                "last_used_at": manifest.last_used_at, "in_use": self.cache.is_in_use(entry.key),
                "metadata": metadata.report()})
        hand_placed = [item for item in map(self._hand_placed_item, self.cache.hand_placed()) if item is not None]
        aliases = {name: {key: self._shown(value) if isinstance(value, str) else value for key, value in entry.items()}
                   for name, entry in shown_aliases(self.aliases).items()}
        return {"cache_dir": str(self.cache.root), "entries": entries, "hand_placed": hand_placed, "aliases": aliases}

    def _hand_placed_item(self, child: Path) -> dict[str, Any] | None:
        try:
            path = resolve_in_cache(self.cache.root, child.name)
        except LoraError:
            return None  # a link leading out of the cache: not listed, never followed
        if path.is_dir():
            if not (path / PEFT_CONFIG).is_file():
                return None
            files = [path / name for name in (PEFT_CONFIG, *PEFT_WEIGHTS) if (path / name).is_file()]
        elif path.suffix.lower() in WEIGHT_EXTENSIONS:
            files = [path]
        else:
            return None
        stats = [file.stat() for file in files]
        sha256 = self.cache.known_sha256(path)
        identity = sha256 or ":".join(f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}" for stat in stats)
        return {"name": child.name, "size_bytes": sum(stat.st_size for stat in stats), "sha256": sha256,
                "metadata": lora_metadata(path, identity).report()}

    # -- prefetch ---------------------------------------------------------------------------------------------------

    def _prefetch(self, requests: list[LoraRequest], progress: Progress) -> dict[str, Any]:
        results = []
        with ExitStack() as held:
            for number, request in enumerate(requests, 1):
                label = self._shown(request.label)
                progress(f"prefetch {number}/{len(requests)}: {label}")
                result: dict[str, Any] = {"entry": request.ref, "label": label}
                try:
                    item = self.cache.resolve(request, progress)
                except LoraError as error:
                    results.append({**result, "status": "error", "error": str(error)})
                    continue
                held.enter_context(self.cache.in_use([item]))
                metadata = metadata_of(item)
                result.update(status="cached" if item.cache_hit else "downloaded", key=item.entry_key,
                              file=self._shown(item.display_name), sha256=item.sha256, size_bytes=item.size_bytes,
                              metadata=metadata.report())
                problem = base_model_problem(metadata)
                if problem:
                    result.update(status="error", error=f"{request.ref} ({label}): {problem}")
                results.append(result)
        counts = {status: sum(item["status"] == status for item in results) for status in ("downloaded", "cached")}
        return {"loras": results, **counts, "failed": sum(item["status"] == "error" for item in results)}

    # -- evict ------------------------------------------------------------------------------------------------------

    def _entry_key(self, request: LoraRequest) -> tuple[str | None, Refusal | None]:
        """``(key, None)`` for a downloaded entry, ``(None, why not)`` otherwise."""
        if request.kind is not SourceKind.CACHE:
            return request.cache_key, None
        if KEY_PATTERN.match(request.source):
            return request.source, None
        try:
            path = self.cache.find_by_name(request.source)
        except LoraError as error:
            return None, Refusal(RefusalReason.UNSAFE_NAME, str(error))
        if path is None:
            return None, Refusal(RefusalReason.NOT_AN_ENTRY)
        if KEY_PATTERN.match(path.name) and read_manifest(path) is not None:
            return path.name, None
        return None, Refusal(RefusalReason.HAND_PLACED)

    def _evict(self, requests: list[LoraRequest], _progress: Progress) -> dict[str, Any]:
        results = []
        for request in requests:
            key, refusal = self._entry_key(request)
            if key is not None:
                refusal = self.cache.evict_entry(key)
            result = {"entry": request.ref, "label": self._shown(request.label), "key": key}
            if refusal is None:
                results.append({**result, "status": EvictStatus.EVICTED})
            elif refusal.status is EvictStatus.NOT_CACHED:
                results.append({**result, "status": EvictStatus.NOT_CACHED})
            else:
                results.append({**result, "status": EvictStatus.REFUSED, "reason": refusal.message})
        return {"loras": results, "evicted": sum(item["status"] is EvictStatus.EVICTED for item in results)}

    # -- cache_stats ------------------------------------------------------------------------------------------------

    def _cache_stats(self, _requests: list[LoraRequest], _progress: Progress) -> dict[str, Any]:
        return {"disk": self.cache.stats(), "ram": self.ram_cache.stats()}
