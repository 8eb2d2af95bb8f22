"""What the cache (``store.cache``) asks of a remote source kind, and what a source hands back.

A ``Source`` fetches one ``LoraRequest`` of its kind into a fetch folder the cache owns: scratch files go in
``work``, the entry's files (``weights.<ext>`` or ``adapter/``) in ``staged``. It checks what it fetched against
what its remote publishes (sizes, sha256) and ``file_checks``; the cache checks the requested sha256, writes the
manifest and publishes the folder. ``progress(done, total)`` must see every byte (the free-disk floor raises there).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from sdxl_worker.net.download import ByteProgress
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import CacheSettings
from sdxl_worker.store.file_checks import check_weights_file


@dataclass(frozen=True)
class Fetched:
    """What a source put into ``staged``, with what the manifest records about it."""

    kind: str                      # "file" or "peft"
    path: str                      # what a job loads, relative to the entry folder
    weights: str                   # the weights file, relative to the entry folder (``path`` for a file)
    sha256: str                    # of the weights file
    display_name: str | None       # None: the cache shows the request's label
    source: str                    # the source as the manifest records it (secrets are scrubbed by the cache)
    etag: str | None = None
    commit: str | None = None
    trigger_words: tuple[str, ...] = ()
    base_model: str | None = None


class Source(ABC):
    """One remote source kind (URL, Hugging Face, Civitai), configured by the cache's settings."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings

    @abstractmethod
    def fetch(self, request: LoraRequest, work: Path, staged: Path, progress: ByteProgress) -> Fetched:
        """Fetch ``request`` into ``staged`` (scratch files in ``work``); ``LoraError`` naming the cause."""

    def secrets(self, request: LoraRequest) -> tuple[str, ...]:
        """Secrets the request itself carries (a token in a pasted URL), to keep out of messages; none by default."""
        return ()


def stage_weights(file: Path, staged: Path, extension: str) -> str:
    """Check a fetched weights file, move it into ``staged`` as ``weights<extension>`` and return that name."""
    check_weights_file(file, extension)
    name = f"weights{extension}"
    os.rename(file, staged / name)
    return name


def first_name(names: tuple[str | None, ...]) -> str | None:
    """The first of the file names a download was given, if any."""
    return next((name for name in names if name), None)
