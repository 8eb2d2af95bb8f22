"""Walk a LoRA cache folder and list what must never be there: fetch leftovers, entries that do not match their
manifest, and (when no job runs) locks and leases still held."""

from __future__ import annotations

from pathlib import Path

from sdxl_worker.store.file_checks import sha256_file
from sdxl_worker.store.housekeeping import KEY_PATTERN
from sdxl_worker.store.manifest import MANIFEST_NAME, read_manifest
from sdxl_worker.store.owners import owner_alive, read_record


def _entry_problems(entry: Path) -> list[str]:
    manifest = read_manifest(entry)
    if manifest is None:
        return [f"{entry.name}: no valid {MANIFEST_NAME} under a final name"]
    weights = entry / manifest.weights
    if not weights.is_file():
        return [f"{entry.name}: {manifest.weights} is missing"]
    problems = []
    if weights.is_symlink() or not weights.resolve().is_relative_to(entry.resolve()):
        problems.append(f"{entry.name}: {manifest.weights} leads outside its entry")
    if weights.stat().st_size != manifest.size:
        problems.append(f"{entry.name}: {weights.stat().st_size} bytes, the manifest says {manifest.size}")
    elif sha256_file(weights) != manifest.sha256:
        problems.append(f"{entry.name}: sha256 differs from the manifest's")
    problems += [f"{entry.name}: stray temporary file {item.name}" for item in entry.rglob(".*")]
    return problems


def _held(folder: Path, pattern: str, tolerate_dead: bool) -> list[str]:
    if not folder.is_dir():
        return []
    return [f"{path.relative_to(folder.parent)} is still held" for path in folder.rglob(pattern)
            if not (tolerate_dead and owner_alive(read_record(path)) is False)]


def cache_problems(root: Path, allow_dead_holders: bool = False) -> list[str]:
    """Everything wrong with the cache folder ``root``; ``[]`` when every entry is complete and verified.

    Checked: no ``.tmp-*`` or ``.trash-*`` folder is left; every folder named by a cache key has a valid manifest
    whose weights file has the recorded size and sha256 and stays inside the entry, with no stray temporary file;
    no lock or lease is held. With ``allow_dead_holders``, locks and leases of processes that died on this host
    (a SIGKILLed worker) are tolerated: the cache takes them over or removes them when it meets them.
    """
    problems = [f"leftover {child.name}" for child in root.iterdir() if child.name.startswith((".tmp-", ".trash-"))]
    for child in sorted(root.iterdir()):
        if KEY_PATTERN.match(child.name):
            problems += _entry_problems(child) if child.is_dir() else [f"{child.name}: not a folder"]
    problems += _held(root / ".locks", "*.lock*", allow_dead_holders)
    problems += _held(root / ".leases", "*.lease", allow_dead_holders)
    return problems


def entry_keys(root: Path) -> list[str]:
    """The downloaded entries (folders named by a cache key) in ``root``."""
    return sorted(child.name for child in root.iterdir() if KEY_PATTERN.match(child.name))
