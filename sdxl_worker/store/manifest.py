"""``manifest.json`` of a downloaded cache entry: where it came from and what it holds.

Fields: ``key``, ``source`` (a URL without credentials or secret query parameters, or a Hugging Face repo id),
``revision``, ``weight_name``, ``kind`` (``file`` | ``peft``), ``path`` (relative: the weights file or the PEFT
folder), ``weights`` (relative path of the hashed file), ``sha256``, ``size`` and ``mtime_ns`` of that file,
``etag``, ``commit``, ``display_name``, ``downloaded_at`` and ``last_used_at`` (unix seconds), ``version``;
for Civitai sources also ``trigger_words`` (the version's trained words) and ``base_model``. Fields added later have
defaults, so older manifests still load; fields this version does not know (written by a newer worker sharing the
volume, same ``version``) are ignored, so such an entry is still used instead of fetched again.
Written to a temp name in the entry folder, fsynced, then renamed over ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``."""

    key: str
    source: str
    kind: str
    path: str
    weights: str
    sha256: str
    size: int
    mtime_ns: int
    display_name: str
    downloaded_at: float
    last_used_at: float
    revision: str | None = None
    weight_name: str | None = None
    etag: str | None = None
    commit: str | None = None
    version: int = VERSION
    trigger_words: list[str] = field(default_factory=list)
    base_model: str | None = None


_FIELDS = tuple(item.name for item in dataclasses.fields(Manifest))


def _relative_inside(value: object) -> bool:
    return (isinstance(value, str) and bool(value) and not value.startswith("/")
            and ".." not in value.split("/") and "\\" not in value)


def read_manifest(entry: Path) -> Manifest | None:
    """The entry's manifest, or ``None`` when missing, unreadable, of another version or pointing outside."""
    try:
        data = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
        manifest = Manifest(**{name: data[name] for name in _FIELDS if name in data})
    except (OSError, ValueError, TypeError):
        return None
    if (manifest.version != VERSION or manifest.kind not in ("file", "peft")
            or not (_relative_inside(manifest.path) and _relative_inside(manifest.weights))
            or not (isinstance(manifest.trigger_words, list)
                    and all(isinstance(word, str) for word in manifest.trigger_words))):
        return None
    return manifest


def fsync_path(path: Path) -> None:
    """fsync a file or a folder; folders on file systems that refuse it are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(entry: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (temp file, fsync, rename)."""
    temp = entry / f".{MANIFEST_NAME}.{secrets.token_hex(4)}.tmp"
    try:
        with temp.open("w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(manifest), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, entry / MANIFEST_NAME)
    finally:
        temp.unlink(missing_ok=True)
