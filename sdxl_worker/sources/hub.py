"""The Hugging Face source: fetch a LoRA from a repo with ``huggingface_hub``, into a work folder the cache owns.

- One listing call, ``HfApi.model_info(files_metadata=True)`` (``/api/models/{repo}[/revision/{rev}]``), gives the
  file names, sizes, LFS sha256 and the commit; the downloads are pinned to that commit.
- Which file: ``weight_name`` when given; else a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``
  or ``.bin`` at the repo root), fetched as a folder; else the repo's single ``*.safetensors`` file, else its single
  ``.bin``/``.pt``/``.ckpt`` file. Several candidates are an error that lists them.
- ``hf_hub_download(local_dir=..., cache_dir=<empty folder>)`` inside the work folder: the default HF cache is
  neither read nor written. ``endpoint`` (``HF_ENDPOINT``) and ``token`` (``HF_TOKEN`` only, never a login token
  found on disk) are passed explicitly.
- Sizes over ``max_bytes`` are refused from the listing, and while streaming. A file's sha256 must match the LFS
  sha256 of the listing.
- Connection errors, timeouts, 429 and 5xx are retried with backoff, ``download_retries`` times
  (``retry.with_retries``).
- ``HubSource`` stores a file as the entry's ``weights.<ext>``, a PEFT folder (checked by ``file_checks``) as its
  ``adapter/``; the entry records the repo id, the commit and the weights file's LFS sha256 or blob id.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import httpx2
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (FileMetadataError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

from sdxl_worker.errors import LoraError
from sdxl_worker.net.download import ByteProgress
from sdxl_worker.net.retry import Failure, with_retries
from sdxl_worker.net.transfer_progress import format_size
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import CacheSettings
from sdxl_worker.sources.base import Fetched, Source, stage_weights
from sdxl_worker.store.file_checks import PEFT_CONFIG, PEFT_WEIGHTS, WEIGHT_EXTENSIONS, peft_weights, sha256_file

T = TypeVar("T")


@dataclass(frozen=True)
class HubFetch:
    """What was fetched: a weights file, or a PEFT folder (``path``) with its weights file (``weights``)."""

    kind: str               # "file" or "peft"
    path: Path
    weights: Path
    sha256: str
    display_name: str
    commit: str | None
    etag: str | None        # LFS sha256 or git blob id of the weights file


class _ProgressBar:
    """The ``tqdm_class`` handed to ``hf_hub_download``: reports bytes and stops a download over the limit."""

    def __init__(self, report: ByteProgress | None, limit: int, total: int | None = None, initial: int = 0,
                 **_: object) -> None:
        self.report, self.limit, self.total, self.n = report, limit, total, initial
        if report is not None and total is not None:
            report(initial, total)  # before the body: lets the free-space floor refuse up front

    def update(self, count: int = 1) -> None:
        self.n += count
        if self.n > self.limit:
            raise LoraError(f"the download passed {format_size(self.n)}, over the limit of {format_size(self.limit)}"
                            " (LORA_MAX_BYTES)")
        if self.report is not None:
            self.report(self.n, self.total)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _token_hint(settings: CacheSettings) -> str:
    return ("HF_TOKEN was sent; check that it has access to this repo" if settings.hf_token
            else "set HF_TOKEN to a token with access")


def _describe(error: BaseException, repo_id: str, settings: CacheSettings) -> Failure:
    """What an error of huggingface_hub or its HTTP client means: its message and whether to retry."""
    if isinstance(error, GatedRepoError):
        return Failure(f"'{repo_id}' is a gated repo: accept its conditions on the Hub and {_token_hint(settings)}",
                       False)
    if isinstance(error, RepositoryNotFoundError):
        return Failure(f"repo '{repo_id}' not found, or private/gated and {_token_hint(settings)}", False)
    if isinstance(error, RevisionNotFoundError):
        return Failure(f"revision not found in '{repo_id}'", False)
    if isinstance(error, RemoteEntryNotFoundError):
        return Failure(f"file not found in '{repo_id}'", False)
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return Failure(f"access denied (HTTP {status}) to '{repo_id}': {_token_hint(settings)}", False)
        return Failure(f"the Hub answered HTTP {status} for '{repo_id}'", status in (408, 429) or status >= 500)
    if isinstance(error, FileMetadataError):
        return Failure(f"{settings.hf_endpoint} did not answer like a Hugging Face Hub (no X-Repo-Commit or ETag)",
                       False)
    if isinstance(error, LocalEntryNotFoundError):
        if error.__cause__ is not None:
            return _describe(error.__cause__, repo_id, settings)
        return Failure(f"cannot reach the Hub at {settings.hf_endpoint}", True)
    if isinstance(error, httpx2.TimeoutException):
        return Failure(f"timed out talking to the Hub at {settings.hf_endpoint}", True)
    if isinstance(error, httpx2.TransportError):
        return Failure(f"cannot connect to the Hub at {settings.hf_endpoint} ({type(error).__name__})", True)
    if isinstance(error, OSError):
        return Failure(f"the download from '{repo_id}' failed ({type(error).__name__})", True)
    return Failure(f"unexpected error fetching '{repo_id}' ({type(error).__name__})", False)


def _call_hub(call: Callable[[], T], repo_id: str, settings: CacheSettings) -> T:
    """``call()`` with retries; any error but a ``LoraError`` becomes one naming the cause (``_describe``)."""

    def classify(error: Exception) -> Failure | None:
        return None if isinstance(error, LoraError) else _describe(error, repo_id, settings)

    return with_retries(call, classify, settings, f"Hub fetch of {repo_id}")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:10])
    return shown + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")


def choose_files(names: list[str], weight_name: str | None, repo_id: str) -> tuple[str, list[str], str]:
    """``(kind, files to download, weights file)`` for a repo's file list, by the rules of the module docstring."""
    weights = sorted(name for name in names if name.lower().endswith(WEIGHT_EXTENSIONS))
    if weight_name:
        if weight_name not in names:
            raise LoraError(f"'{weight_name}' is not in '{repo_id}'; its weight files: {_listing(weights) or 'none'}")
        if not weight_name.lower().endswith(WEIGHT_EXTENSIONS):
            raise LoraError(f"'{weight_name}' is not a weights file ({', '.join(WEIGHT_EXTENSIONS)})")
        return "file", [weight_name], weight_name
    if PEFT_CONFIG in names:
        adapter = next((name for name in PEFT_WEIGHTS if name in names), None)
        if adapter is not None:
            return "peft", [PEFT_CONFIG, adapter], adapter
    for extensions in ((".safetensors",), (".bin", ".pt", ".ckpt")):
        found = [name for name in weights if name.lower().endswith(extensions)]
        if len(found) == 1:
            return "file", found, found[0]
        if found:
            raise LoraError(f"'{repo_id}' has {len(found)} candidate LoRA files; choose one with weight_name: "
                            f"{_listing(found)}")
    raise LoraError(f"'{repo_id}' has no .safetensors, .bin, .pt or .ckpt file")


def fetch_from_hub(repo_id: str, revision: str | None, weight_name: str | None, workdir: Path,
                   settings: CacheSettings, progress: ByteProgress | None = None) -> HubFetch:
    """Download the LoRA of ``repo_id`` into ``workdir`` (which must be empty) and return what was fetched."""
    token: str | bool = settings.hf_token or False
    api = HfApi(endpoint=settings.hf_endpoint, token=token, library_name="sdxl-worker")
    info = _call_hub(lambda: api.model_info(repo_id, revision=revision, files_metadata=True,
                                            timeout=settings.read_timeout_s), repo_id, settings)
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    kind, files, weights_name = choose_files(sorted(siblings), weight_name, repo_id)
    total = sum((siblings[name].lfs.size if siblings[name].lfs else siblings[name].size) or 0 for name in files)
    if total > settings.max_bytes:
        raise LoraError(f"'{repo_id}' needs {format_size(total)}, over the limit of {format_size(settings.max_bytes)}"
                        " (LORA_MAX_BYTES)")
    pinned = info.sha or revision
    local_dir = workdir / "files"
    for name in files:
        bar = functools.partial(_ProgressBar, progress if name == weights_name else None, settings.max_bytes)
        _call_hub(lambda name=name, bar=bar: hf_hub_download(
            repo_id, name, revision=pinned, local_dir=local_dir, cache_dir=workdir / "hf-cache",
            endpoint=settings.hf_endpoint, token=token, etag_timeout=settings.connect_timeout_s,
            library_name="sdxl-worker", tqdm_class=bar), repo_id, settings)
    weights = local_dir / weights_name
    sibling = siblings[weights_name]
    digest = sha256_file(weights)
    if sibling.lfs is not None and sibling.lfs.sha256 and sibling.lfs.sha256.lower() != digest:
        raise LoraError(f"'{weights_name}' from '{repo_id}' does not match the Hub's sha256 (corrupted download)")
    etag = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
    if kind == "file":
        return HubFetch("file", weights, weights, digest, Path(weights_name).name, pinned, etag)
    folder = workdir / "peft"
    folder.mkdir()
    for name in files:
        shutil.move(local_dir / name, folder / name)
    return HubFetch("peft", folder, folder / weights_name, digest, repo_id, pinned, etag)


class HubSource(Source):
    """``Source`` for Hugging Face repos (``owner/repo`` with optional ``weight_name`` and ``revision``)."""

    def fetch(self, request: LoraRequest, work: Path, staged: Path, progress: ByteProgress) -> Fetched:
        """Fetch the repo's LoRA (``fetch_from_hub``) into ``staged`` as ``weights.<ext>`` or ``adapter/``."""
        fetched = fetch_from_hub(request.source, request.revision, request.weight_name, work, self.settings, progress)
        if fetched.kind == "peft":
            peft_weights(fetched.path)
            os.rename(fetched.path, staged / "adapter")
            path, weights = "adapter", f"adapter/{fetched.weights.name}"
        else:
            path = weights = stage_weights(fetched.weights, staged, fetched.weights.suffix.lower())
        return Fetched(kind=fetched.kind, path=path, weights=weights, sha256=fetched.sha256,
                       display_name=fetched.display_name, source=request.source, etag=fetched.etag,
                       commit=fetched.commit)
