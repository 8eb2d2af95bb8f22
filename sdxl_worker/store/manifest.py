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
import math
import os
import secrets
import types
import typing
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


_FIELD_TYPES = typing.get_type_hints(Manifest)


def _of_type(value: object, kind: object) -> bool:
    """Whether a JSON ``value`` has the field type ``kind`` (``str``, ``int``, ``float``, ``X | None``,
    ``list[str]``); booleans are not numbers, and floats must be finite."""
    if isinstance(kind, types.UnionType):
        return any(_of_type(value, option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_of_type(element, item) for element in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)  # type: ignore[arg-type]


def _relative_inside(value: str) -> bool:
    """A relative path below the entry folder: no empty, ``.`` or ``..`` part, no backslash."""
    return not value.startswith("/") and "\\" not in value and all(
        part not in ("", ".", "..") for part in value.split("/"))


def read_manifest(entry: Path) -> Manifest | None:
    """The entry's manifest, or ``None`` (the entry is corrupt: re-fetched by a job, left out of listings) when
    missing, unreadable, of another version, with a field of the wrong type, or pointing outside the entry."""
    try:
        data = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    fields = {name: data[name] for name in _FIELD_TYPES if name in data}
    if not all(_of_type(value, _FIELD_TYPES[name]) for name, value in fields.items()):
        return None
    try:
        manifest = Manifest(**fields)
    except TypeError:  # a required field missing
        return None
    if (manifest.version != VERSION or manifest.kind not in ("file", "peft")
            or not (_relative_inside(manifest.path) and _relative_inside(manifest.weights))):
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
