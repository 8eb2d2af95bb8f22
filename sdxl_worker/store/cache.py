"""The LoRA disk cache: a ``LoraRequest`` -> a verified local file or PEFT folder, fetched at most once across the
processes and machines that share the cache folder (settings and variables: ``settings``).

Layout of ``LORA_CACHE_DIR``::

    <key>/manifest.json, weights.<ext> or adapter/   a downloaded entry; <key> = LoraRequest.cache_key
    my_style.safetensors, my_peft_folder/           placed by hand: addressable by name, never evicted or counted
    .locks/<key>.lock                               per-entry fetch lock (``locking``)
    .leases/<key>/*.lease                           entries held by running jobs (``leases``)
    .tmp-<key>-<random>/                            fetches in progress, with an ``.owner`` record
    .trash-<random>/                                entries being deleted

URL, Hugging Face or Civitai source (every form of one Civitai version shares one entry, keyed by its version id):

1. Hit, without lock or network: the manifest parses, the file has the recorded size, and its sha256 is checked
   per ``LORA_VERIFY_ON_HIT``. Default ``first``: a full re-hash the first time this process uses the entry (so a
   new process detects flipped bytes), then only when the file's size, mtime or inode change, so later hits cost a
   ``stat``. A failed check, or a requested ``sha256`` that differs from the manifest's, means a re-fetch.
2. Miss: take the entry lock (others wait, logging ``wait``, and then find the entry), look again, fetch into
   ``.tmp-…`` through the source of the request's kind (``sources.base.Source``: ``sources.http``,
   ``sources.hub``, ``sources.civitai``; each checks the file with ``file_checks`` and against what its remote
   publishes), check the requested sha256, write the manifest, fsync, rename the folder to ``<key>``. While
   fetching, the free-disk floor (``disk_space``) evicts least recently used entries or refuses the download. A
   crash at any point leaves nothing under a final name; a later ``LoraCache`` removes the leftovers
   (``housekeeping.clean_leftovers``). Then, above ``LORA_CACHE_MAX_GB``, least recently used entries are evicted
   (``housekeeping.Evictor``), never one leased by ``in_use`` in any process or used within ``evict_grace_s``
   (which covers the moment between ``resolve`` and ``in_use``). Entries pinned by ``PINNED_LORAS`` are never
   evicted (``pinned_keys``).

Cache name (no ``/``): a file or folder in the cache root (symlinks must stay inside it); a name without a weights
extension that is absent is tried with ``.safetensors`` (``<lora:my-style>`` finds ``my-style.safetensors``, as
in A1111). A downloaded entry's folder is verified like a hit; a hand-placed file or PEFT folder is checked
(``file_checks``) and hashed the first time this process sees it, and again when its size, mtime or inode change.

``evict_entry`` deletes one downloaded entry under the eviction rules (never one in use); hand-placed files are the
endpoint owner's and are never deleted here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdxl_worker.errors import LoraError
from sdxl_worker.net.redact import scrub
from sdxl_worker.net.transfer_progress import TransferProgress, format_size
from sdxl_worker.net.url_safety import resolve_in_cache
from sdxl_worker.request.entries import CACHE_DEFAULT_EXTENSION, LoraRequest, SourceKind
from sdxl_worker.settings import CacheSettings
from sdxl_worker.sources.base import Fetched, Source
from sdxl_worker.sources.civitai import CivitaiSource
from sdxl_worker.sources.http import HttpSource
from sdxl_worker.sources.hub import HubSource
from sdxl_worker.store.disk_errors import describe_disk_error
from sdxl_worker.store.disk_space import FreeBytes, SpaceGuard, disk_free_bytes
from sdxl_worker.store.file_checks import (PEFT_CONFIG, PEFT_WEIGHTS, WEIGHT_EXTENSIONS, check_weights_file,
                                           find_peft_weights, peft_weights, sha256_file)
from sdxl_worker.store.housekeeping import KEY_PATTERN, Evictor, Refusal, clean_leftovers, scan_entries, trash
from sdxl_worker.store.leases import Leases
from sdxl_worker.store.locking import EntryLock, describe_owner
from sdxl_worker.store.manifest import Manifest, fsync_path, read_manifest, write_manifest
from sdxl_worker.store.owners import Heartbeat, owner_record
from sdxl_worker.store.pinning import parse_sources, pinned_entry_keys

__all__ = ["CacheSettings", "LoraCache", "ResolvedLora"]

LOG = logging.getLogger(__name__)
TOUCH_INTERVAL_S = 10.0
Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class ResolvedLora:
    """A LoRA ready to load: ``path`` is a weights file or a PEFT folder inside the cache."""

    request: LoraRequest
    path: Path
    sha256: str             # of the weights file (for PEFT folders: of the adapter weights file)
    size_bytes: int
    cache_hit: bool
    display_name: str
    fetch_ms: float = 0.0
    entry_key: str | None = None   # the downloaded entry; None for files placed by hand
    trigger_words: tuple[str, ...] = ()   # Civitai's trained words for the version, when it came from Civitai

    @classmethod
    def found(cls, request: LoraRequest, *, path: Path, sha256: str, size_bytes: int, cache_hit: bool,
              display_name: str, entry_key: str | None, trigger_words: Iterable[str] = ()) -> ResolvedLora:
        """What the cache found or fetched for ``request``; ``fetch_ms`` is filled in by ``resolve``."""
        return cls(request=request, path=path, sha256=sha256, size_bytes=size_bytes, cache_hit=cache_hit,
                   display_name=display_name, entry_key=entry_key, trigger_words=tuple(trigger_words))


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def remote_sources(settings: CacheSettings) -> Mapping[SourceKind, Source]:
    """The source of each kind the cache downloads (a cache name is the store's own)."""
    return {SourceKind.URL: HttpSource(settings), SourceKind.HF: HubSource(settings),
            SourceKind.CIVITAI: CivitaiSource(settings)}


class LoraCache:
    """The shared LoRA disk cache; thread-safe, one per process is enough."""

    def __init__(self, settings: CacheSettings, free_bytes: FreeBytes | None = None) -> None:
        """``free_bytes`` reads the cache file system's free space (default ``shutil.disk_usage``); ``ValueError``
        naming ``PINNED_LORAS`` if a pinned source is malformed."""
        self.settings = settings
        self.root = settings.cache_dir
        self.pinned_keys = pinned_entry_keys(parse_sources("PINNED_LORAS", settings.pinned_sources))
        self._sources = remote_sources(settings)
        self._real_root = self.root.resolve()
        self._heartbeat = Heartbeat(settings.heartbeat_s)
        self._leases = Leases(self.root / ".leases", self._heartbeat, settings.lease_stale_s)
        self._lock = threading.Lock()
        self._verified: dict[Path, tuple[int, int, int]] = {}
        self._local: dict[tuple[Path, int, int, int], tuple[str, int]] = {}
        self._in_use: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._free_bytes = free_bytes or disk_free_bytes(self.root)
        self._evictor = Evictor(self.root, settings, self._heartbeat, self._leases, self._held, self.pinned_keys)
        self._ready = False
        try:
            self._prepare()
        except OSError as error:
            LOG.warning("LoRA cache not ready: %s; jobs that fetch LoRAs fail until it is",
                        describe_disk_error(error, self.root))

    def _prepare(self) -> None:
        """Create the internal folders and remove leftovers; fetching retries this until it succeeds."""
        for folder in (".locks", ".leases"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.root, self.settings)
        self._ready = True

    # -- public API -------------------------------------------------------------------------------------------

    def resolve(self, request: LoraRequest, progress: Progress | None = None) -> ResolvedLora:
        """Find or fetch one LoRA; ``LoraError`` ``"<ref> (label): cause"`` on any failure, nothing cached then."""
        return self._resolve(request, progress, frozenset())

    def resolve_all(self, requests: Iterable[LoraRequest], progress: Progress | None = None) -> list[ResolvedLora]:
        """Resolve in order; the first failure ends the whole call. Earlier entries are kept from eviction."""
        resolved: list[ResolvedLora] = []
        for request in requests:
            protect = frozenset(item.entry_key for item in resolved if item.entry_key)
            resolved.append(self._resolve(request, progress, protect))
        return resolved

    @contextmanager
    def in_use(self, resolved: Iterable[ResolvedLora]) -> Iterator[None]:
        """Protect these entries from eviction, by this and every other process, until the block ends."""
        keys = [item.entry_key for item in resolved if item.entry_key]
        with self._lock:
            self._in_use.update(keys)
        leases: list[Path] = []
        try:
            for key in keys:
                try:
                    leases.append(self._leases.take(key))
                except OSError as error:  # a read-only or full volume: nobody can evict there either
                    LOG.warning("no lease on LoRA cache entry %s: %s", key, describe_disk_error(error, self.root))
            yield
        finally:
            for lease in leases:
                self._leases.drop(lease)
            with self._lock:
                self._in_use.subtract(keys)
                self._in_use = +self._in_use

    def find_by_name(self, name: str) -> Path | None:
        """The cache-root file or folder a cache name stands for (``name``, else ``name.safetensors`` when ``name``
        has no weights extension), symlinks resolved; ``None`` when neither exists. ``LoraError`` for unsafe names."""
        candidates = [name]
        if Path(name).suffix.lower() not in WEIGHT_EXTENSIONS:
            candidates.append(name + CACHE_DEFAULT_EXTENSION)
        for candidate in candidates:
            path = resolve_in_cache(self.root, candidate)
            if path.exists():
                return path
        return None

    def name_exists(self, name: str) -> bool:
        """Whether ``find_by_name`` finds something (an unsafe name counts as present: resolving reports it)."""
        try:
            return self.find_by_name(name) is not None
        except LoraError:
            return True

    def known_sha256(self, path: Path) -> str | None:
        """The sha256 this process computed for a hand-placed file or PEFT folder, if it is still current."""
        weights = find_peft_weights(path) if path.is_dir() else path
        if weights is None:
            return None
        try:
            _, known = self._memo(weights)
        except OSError:
            return None
        return known[0] if known else None

    def is_in_use(self, key: str) -> bool:
        """Whether a job of this process holds downloaded entry ``key``, or any process holds a lease on it."""
        return self._held(key) or self._leases.live(key)

    def evict_entry(self, key: str) -> Refusal | None:
        """Delete downloaded entry ``key`` now; ``None`` when deleted, else why not (in use, recent, not an entry)."""
        refusal = self._evictor.remove(key)
        if refusal is None:
            self._count("evictions")
        return refusal

    def hand_placed(self) -> list[Path]:
        """Everything in the cache root that is neither internal (``.*``) nor named like a downloaded entry."""
        return sorted(child for child in self.root.iterdir()
                      if not child.name.startswith(".") and not KEY_PATTERN.match(child.name))

    def stats(self) -> dict[str, object]:
        """Entries and bytes of downloaded entries, the budget, hand-placed entries, and this process's counters."""
        entries = scan_entries(self.root)
        hand_placed = self.hand_placed()
        with self._lock:
            counts = dict(self._counts)
        return {"root": str(self.root), "entries": len(entries), "size_bytes": sum(entry.size for entry in entries),
                "budget_bytes": self.settings.cache_max_bytes, "user_entries": len(hand_placed),
                **{name: counts.get(name, 0) for name in ("hits", "misses", "waits", "evictions")}}

    # -- resolution -------------------------------------------------------------------------------------------

    def _held(self, key: str) -> bool:
        with self._lock:
            return self._in_use[key] > 0

    def _secrets(self, request: LoraRequest) -> tuple[str, ...]:
        source = self._sources.get(request.kind)
        return self.settings.secrets + (source.secrets(request) if source is not None else ())

    def _shown(self, request: LoraRequest) -> str:
        return scrub(request.label, self._secrets(request))

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _resolve(self, request: LoraRequest, progress: Progress | None, protect: frozenset[str]) -> ResolvedLora:
        start = time.perf_counter()
        prefix = f"{request.ref} ({self._shown(request)})"
        try:
            if request.kind is SourceKind.CACHE:
                resolved = self._resolve_by_name(request)
            else:
                resolved = self._resolve_remote(request, TransferProgress(progress, prefix), protect)
        except LoraError as error:
            raise LoraError(scrub(f"{prefix}: {error}", self._secrets(request))) from None
        except OSError as error:
            message = f"{prefix}: {describe_disk_error(error, self.root)}"
            raise LoraError(scrub(message, self._secrets(request))) from None
        return dataclasses.replace(resolved, fetch_ms=(time.perf_counter() - start) * 1000)

    # -- the download protocol: look, lock, look again, fetch into a temp folder, verify, publish by rename -------

    def _resolve_remote(self, request: LoraRequest, report: TransferProgress,
                        protect: frozenset[str]) -> ResolvedLora:
        key = request.cache_key
        entry = self.root / key
        hit = self._hit(entry, request)
        if hit is not None:
            return hit

        def on_wait(owner: dict | None) -> None:
            self._count("waits")
            LOG.info("lora wait %s [%s]: %s is fetching it", self._shown(request), key, describe_owner(owner))
            report.message("waiting for another worker to finish downloading it")

        if not self._ready:
            self._prepare()
        lock = EntryLock(self.root / ".locks" / f"{key}.lock", self._heartbeat, self.settings.lock_stale_s,
                         self.settings.lock_wait_s, self.settings.lock_idle_s)
        lock.acquire(on_wait, lambda: self._work_bytes(key))
        try:
            hit = self._hit(entry, request)
            if hit is not None:
                return hit
            self._count("misses")
            LOG.info("lora miss %s [%s]: fetching", self._shown(request), key)
            resolved = self._fetch(request, entry, report, protect | {key})
        finally:
            lock.release()
        evicted = self._evictor.evict(protect | {key})
        with self._lock:
            self._counts["evictions"] += evicted
        return resolved

    def _work_bytes(self, key: str) -> int:
        """Bytes in the temp folders of ``key``'s fetches (the lock holder's progress, as its waiters see it)."""
        total = 0
        for path in self.root.glob(f".tmp-{key}-*/**/*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:
                continue
        return total

    def _fetch(self, request: LoraRequest, entry: Path, report: TransferProgress,
               protect: frozenset[str]) -> ResolvedLora:
        """Fetch ``request`` into a new ``.tmp-…`` folder through its kind's source, verify it, write its manifest
        and publish the folder as ``entry``; the temp folder is gone afterwards, whatever happened."""
        guard = SpaceGuard(self.settings.min_free_bytes, self._free_bytes,
                           lambda shortfall, enough: self._evictor.make_room(protect, shortfall, enough),
                           self.settings.free_check_bytes)

        def progress(done: int, total: int | None) -> None:
            guard(done, total)
            report(done, total)

        work = self.root / f".tmp-{entry.name}-{secrets.token_hex(4)}"
        work.mkdir()
        try:
            (work / ".owner").write_text(json.dumps(owner_record()), encoding="utf-8")
            staged = work / "entry"
            staged.mkdir()
            fetched = self._sources[request.kind].fetch(request, work, staged, progress)
            guard.ensure(0)  # the whole file is on disk now: above the floor, or refused
            if request.sha256 and request.sha256 != fetched.sha256:
                raise LoraError(f"sha256 mismatch: expected {request.sha256}, downloaded {fetched.sha256}")
            manifest = self._manifest(request, entry.name, staged, fetched)
            for path in [*staged.rglob("*"), staged]:
                fsync_path(path)
            write_manifest(staged, manifest)
            fsync_path(staged)
            self._publish(staged, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with self._lock:
                self._counts["evictions"] += guard.evicted
        with self._lock:
            self._verified[entry / manifest.weights] = _stamp(entry / manifest.weights)
        LOG.info("lora stored %s [%s]: %s, %s", self._shown(request), entry.name, manifest.display_name,
                 format_size(manifest.size))
        return ResolvedLora.found(request, path=entry / manifest.path, sha256=manifest.sha256,
                                  size_bytes=manifest.size, cache_hit=False, display_name=manifest.display_name,
                                  entry_key=entry.name, trigger_words=manifest.trigger_words)

    def _manifest(self, request: LoraRequest, key: str, staged: Path, fetched: Fetched) -> Manifest:
        """The manifest of a fetched entry (its source without secrets, the weights file's size and mtime)."""
        weights = (staged / fetched.weights).stat()
        now = time.time()
        return Manifest(
            key=key, source=scrub(fetched.source, self.settings.secrets), kind=fetched.kind, path=fetched.path,
            weights=fetched.weights, sha256=fetched.sha256, size=weights.st_size, mtime_ns=weights.st_mtime_ns,
            display_name=fetched.display_name or self._shown(request), downloaded_at=now, last_used_at=now,
            revision=request.revision, weight_name=request.weight_name, etag=fetched.etag, commit=fetched.commit,
            trigger_words=list(fetched.trigger_words), base_model=fetched.base_model)

    def _publish(self, staged: Path, entry: Path) -> None:
        if entry.exists() or entry.is_symlink():
            trash(self.root, entry)
        os.rename(staged, entry)
        fsync_path(self.root)

    # -- hits: a published entry, verified per LORA_VERIFY_ON_HIT --------------------------------------------------

    def _hit(self, entry: Path, request: LoraRequest) -> ResolvedLora | None:
        manifest = read_manifest(entry)
        if manifest is None:
            return None
        if request.sha256 and request.sha256 != manifest.sha256:
            LOG.info("lora entry %s holds sha256 %s…, the request asks for %s…: re-fetching", entry.name,
                     manifest.sha256[:12], request.sha256[:12])
            return None
        if not self._verify(entry / manifest.weights, manifest):
            LOG.warning("lora entry %s failed verification (size or sha256 changed): re-fetching", entry.name)
            return None
        self._touch(entry, manifest)
        self._count("hits")
        LOG.info("lora hit %s [%s]", self._shown(request), entry.name)
        return ResolvedLora.found(request, path=entry / manifest.path, sha256=manifest.sha256,
                                  size_bytes=manifest.size, cache_hit=True, display_name=manifest.display_name,
                                  entry_key=entry.name, trigger_words=manifest.trigger_words)

    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self._real_root)

    def _verify(self, weights: Path, manifest: Manifest) -> bool:
        try:
            stamp = _stamp(weights)
        except FileNotFoundError:
            return False
        if stamp[1] != manifest.size or not self._inside(weights):
            return False
        mode = self.settings.verify_on_hit
        if mode == "changed" and stamp[2] == manifest.mtime_ns:
            return True
        with self._lock:
            if mode == "first" and self._verified.get(weights) == stamp:
                return True
        if sha256_file(weights) != manifest.sha256:
            return False
        with self._lock:
            self._verified[weights] = stamp
        return True

    def _touch(self, entry: Path, manifest: Manifest) -> None:
        now = time.time()
        if now - manifest.last_used_at < TOUCH_INTERVAL_S:
            return
        try:
            write_manifest(entry, dataclasses.replace(manifest, last_used_at=now))
        except OSError:
            LOG.debug("could not update last_used_at of %s", entry.name, exc_info=True)

    # -- cache names: files and folders in the cache root -------------------------------------------------------

    def _resolve_by_name(self, request: LoraRequest) -> ResolvedLora:
        path = self.find_by_name(request.source)
        if path is None:
            raise LoraError(f"no entry named '{request.source}' in the LoRA cache")
        manifest = read_manifest(path) if path.is_dir() else None
        if manifest is not None:
            if not self._verify(path / manifest.weights, manifest):
                raise LoraError("the cache entry failed verification (its file changed or is corrupt)")
            sha256, size, target = manifest.sha256, manifest.size, path / manifest.path
            self._touch(path, manifest)
        else:
            sha256, size = self._hand_placed_digest(path)
            target = path
        if request.sha256 and request.sha256 != sha256:
            raise LoraError(f"sha256 mismatch: expected {request.sha256}, the cached file has {sha256}")
        self._count("hits")
        LOG.info("lora hit %s (cache name)", self._shown(request))
        downloaded = manifest is not None and KEY_PATTERN.match(path.name)
        return ResolvedLora.found(request, path=target, sha256=sha256, size_bytes=size, cache_hit=True,
                                  display_name=path.name, entry_key=path.name if downloaded else None,
                                  trigger_words=manifest.trigger_words if manifest is not None else ())

    def _memo(self, weights: Path) -> tuple[tuple[Path, int, int, int], tuple[str, int] | None]:
        """A hand-placed weights file's memo key (path and stat stamp) and the ``(sha256, size)`` this process
        computed under it, if any."""
        memo_key = (weights, *_stamp(weights))
        with self._lock:
            return memo_key, self._local.get(memo_key)

    def _hand_placed_digest(self, path: Path) -> tuple[str, int]:
        if path.is_dir():
            weights = find_peft_weights(path)
            if weights is None:
                raise LoraError(f"'{path.name}' is neither a downloaded entry nor a PEFT adapter folder "
                                f"({PEFT_CONFIG} with {' or '.join(PEFT_WEIGHTS)})")
            inside = all(self._inside(child) for child in path.iterdir())
        elif path.suffix.lower() in WEIGHT_EXTENSIONS:
            weights, inside = path, True
        else:
            raise LoraError(f"unsupported file type '{path.suffix}' (expected one of {', '.join(WEIGHT_EXTENSIONS)})")
        if not inside:
            raise LoraError(f"'{path.name}' leads outside the LoRA cache")
        memo_key, known = self._memo(weights)
        if known is not None:
            return known
        if path.is_dir():
            peft_weights(path)
        else:
            check_weights_file(path, path.suffix.lower())
        result = (sha256_file(weights), memo_key[2])
        with self._lock:
            self._local[memo_key] = result
        return result
