"""The Civitai source: a model version -> its file through Civitai's REST API, then the download of that file.

``GET {CIVITAI_API_BASE}/api/v1/model-versions/{versionId}`` answers with ``baseModel``, ``trainedWords``,
``model`` (``name``, ``type``) and ``files`` (``name``, ``type``, ``primary``, ``sizeKB``, ``hashes.SHA256``,
``metadata.format``, ``downloadUrl``). Refused before any download: a model type other than ``LORA``, ``LoCon``,
``LyCORIS`` or ``DoRA`` (``LORA_MODEL_TYPES``: LoCon files are kohya LoRAs with conv layers; what a LyCORIS or DoRA
file holds is checked when it is parsed, and a kind without an adapter is refused there by name), a base model outside
``SDXL_BASE_MODELS``, a version without a model file, a file over ``LORA_MAX_BYTES`` by ``sizeKB``.

The chosen file is the version's ``Model`` file, a SafeTensor one first, the primary one first among equals. Its
published SHA256 (lower-cased) is what the download must hash to (and a requested ``sha256`` must equal it, checked
before downloading). The API base is trusted like ``HF_ENDPOINT`` (private addresses allowed, cloud metadata
addresses never); retries, timeouts and tokens follow ``net.download``. A token in the job's source (a pasted
download URL's ``?token=``) replaces ``CIVITAI_TOKEN`` for that download and is kept out of every message. The entry
records ``civitai:<versionId>`` as its source, with the version's trained words and base model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from sdxl_worker.errors import LoraError
from sdxl_worker.net.download import (ByteProgress, Retryable, check_status, download_url, open_url, retry_http,
                                      url_filename)
from sdxl_worker.net.redact import redact_url
from sdxl_worker.net.transfer_progress import format_size
from sdxl_worker.net.url_safety import guarded_session
from sdxl_worker.request.civitai_refs import civitai_ref
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import CacheSettings
from sdxl_worker.sources.base import Fetched, Source, first_name, stage_weights
from sdxl_worker.store.file_checks import choose_extension

SDXL_BASE_MODELS = ("SDXL 0.9", "SDXL 1.0", "SDXL 1.0 LCM", "SDXL Distilled", "SDXL Turbo", "SDXL Lightning",
                    "SDXL Hyper", "Pony", "Illustrious", "NoobAI")
LORA_MODEL_TYPES = ("LORA", "LoCon", "LyCORIS", "DoRA")
MAX_JSON_BYTES = 4 * 1024 * 1024
MAX_TRIGGER_WORDS = 64
MAX_TRIGGER_WORD_CHARS = 300
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class CivitaiFile:
    """The file of a model version to download, with what Civitai publishes about it."""

    version_id: int
    name: str | None
    download_url: str
    sha256: str | None            # lower-case hex, None when Civitai publishes none
    size_bytes: int | None        # from sizeKB, None when absent
    trigger_words: tuple[str, ...]
    base_model: str | None


def version_url(settings: CacheSettings, version_id: int) -> str:
    """The API URL of one model version under ``CIVITAI_API_BASE``."""
    return f"{settings.civitai_api_base}/api/v1/model-versions/{version_id}"


def _get_json(session: requests.Session, url: str, settings: CacheSettings, version_id: int) -> Any:
    response, final_url = open_url(session, url, settings)
    with response:
        if response.status_code == 404:
            raise LoraError(f"Civitai has no model version {version_id} (HTTP 404 from {redact_url(final_url)})")
        check_status(response, final_url, settings)
        body = bytearray()
        try:
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    raise LoraError(f"the answer of {redact_url(final_url)} is over {format_size(MAX_JSON_BYTES)}")
        except requests.RequestException as error:
            raise Retryable(f"the connection to {redact_url(final_url)} broke ({type(error).__name__})") from None
    try:
        return json.loads(body)
    except ValueError:
        problem = f"{redact_url(final_url)} did not answer with JSON (is CIVITAI_API_BASE a Civitai site?)"
        raise LoraError(problem) from None


def _file_name(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    name = value.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:200] if name not in ("", ".", "..") else None


def _size_bytes(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return int(round(value * 1024))


def _trigger_words(raw: Any) -> tuple[str, ...]:
    words: list[str] = []
    for item in raw if isinstance(raw, list) else []:
        word = item.strip() if isinstance(item, str) else ""
        if word and len(word) <= MAX_TRIGGER_WORD_CHARS and word not in words:
            words.append(word)
    return tuple(words[:MAX_TRIGGER_WORDS])


def _is_safetensors(entry: dict[str, Any]) -> bool:
    metadata = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
    return metadata.get("format") == "SafeTensor" or str(entry.get("name", "")).lower().endswith(".safetensors")


def choose_file(version_id: int, data: Any, max_bytes: int) -> CivitaiFile:
    """The file to download from a model-version answer, after the checks of the module docstring."""
    if not isinstance(data, dict):
        raise LoraError(f"the Civitai API answered model version {version_id} with something other than an object")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    model_type = model.get("type")
    if isinstance(model_type, str) and model_type not in LORA_MODEL_TYPES:
        raise LoraError(f"Civitai model version {version_id} is a {model_type}, not a LoRA "
                        f"(accepted: {', '.join(LORA_MODEL_TYPES)})")
    base_model = data.get("baseModel") if isinstance(data.get("baseModel"), str) else None
    if base_model is not None and base_model.casefold() not in {name.casefold() for name in SDXL_BASE_MODELS}:
        raise LoraError(f"Civitai model version {version_id} is for the base model {base_model!r}, not SDXL; this "
                        f"worker applies LoRAs for {', '.join(SDXL_BASE_MODELS)}")
    files = [entry for entry in data.get("files") or [] if isinstance(entry, dict)
             and entry.get("type", "Model") == "Model" and isinstance(entry.get("downloadUrl"), str)]
    if not files:
        raise LoraError(f"Civitai model version {version_id} has no model file to download (archived or removed?)")
    chosen = min(files, key=lambda entry: (not _is_safetensors(entry), not entry.get("primary")))
    hashes = chosen.get("hashes") if isinstance(chosen.get("hashes"), dict) else {}
    sha256 = hashes.get("SHA256")
    size = _size_bytes(chosen.get("sizeKB"))
    if size is not None and size > max_bytes:
        raise LoraError(f"the file is {format_size(size)} by Civitai's listing, over the limit of "
                        f"{format_size(max_bytes)} (LORA_MAX_BYTES)")
    return CivitaiFile(
        version_id=version_id, name=_file_name(chosen.get("name")), download_url=chosen["downloadUrl"],
        sha256=sha256.lower() if isinstance(sha256, str) and _SHA256.match(sha256) else None, size_bytes=size,
        trigger_words=_trigger_words(data.get("trainedWords")), base_model=base_model)


def fetch_version_file(version_id: int, settings: CacheSettings) -> CivitaiFile:
    """Ask the Civitai API about ``version_id`` and choose its file; ``LoraError`` naming the cause."""
    url = version_url(settings, version_id)
    trusted = dataclasses.replace(settings, allow_private_hosts=True)
    with guarded_session(True) as session:
        data = retry_http(lambda: _get_json(session, url, trusted, version_id), url, settings)
    return choose_file(version_id, data, settings.max_bytes)


class CivitaiSource(Source):
    """``Source`` for Civitai model versions (every form ``civitai_refs`` reads)."""

    def fetch(self, request: LoraRequest, work: Path, staged: Path, progress: ByteProgress) -> Fetched:
        """Look the version up, download its file into ``staged`` and check it against the published sha256."""
        ref = civitai_ref(request.source)
        settings = dataclasses.replace(self.settings, civitai_token=ref.token) if ref.token else self.settings
        file = fetch_version_file(ref.version_id, settings)
        if request.sha256 and file.sha256 and request.sha256 != file.sha256:
            raise LoraError(f"sha256 mismatch: expected {request.sha256}, Civitai publishes {file.sha256} for model "
                            f"version {ref.version_id}")
        if file.size_bytes is not None:
            progress(0, file.size_bytes)  # the free-disk floor, before connecting to the file's host
        part = work / "download.part"
        info = download_url(file.download_url, part, settings, progress)
        if file.sha256 and info.sha256 != file.sha256:
            raise LoraError(f"the download does not match the sha256 Civitai publishes for model version "
                            f"{ref.version_id} (expected {file.sha256}, got {info.sha256}); nothing was cached")
        names = (file.name, info.filename, url_filename(info.final_url))
        name = stage_weights(part, staged, choose_extension(part, *names))
        return Fetched(kind="file", path=name, weights=name, sha256=info.sha256, display_name=first_name(names),
                       source=f"civitai:{ref.version_id}", etag=info.etag, trigger_words=file.trigger_words,
                       base_model=file.base_model)

    def secrets(self, request: LoraRequest) -> tuple[str, ...]:
        """The token of a pasted Civitai URL, if the source has one."""
        ref = civitai_ref(request.source)
        return (ref.token,) if ref and ref.token else ()
