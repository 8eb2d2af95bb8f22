"""Leases: marks that a running job uses a cache entry, so that no process or machine evicts it.

A lease is ``<leases>/<key>/<random>.lease`` holding an owner record (``owners``), its mtime refreshed by the
heartbeat. It is live while its holder is alive on this host, or, seen from another host, while its mtime is
younger than ``stale_s`` (wall clocks are compared here: keep ``stale_s`` far above any clock skew). Dead leases
are deleted when seen.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

from sdxl_worker.store.owners import Heartbeat, owner_alive, owner_record, read_record

LOG = logging.getLogger(__name__)


class Leases:
    """The lease files under one folder."""

    def __init__(self, folder: Path, heartbeat: Heartbeat, stale_s: float) -> None:
        self._folder = folder
        self._heartbeat = heartbeat
        self._stale_s = stale_s

    def take(self, key: str) -> Path:
        """Create and start refreshing a lease on entry ``key``."""
        folder = self._folder / key
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{secrets.token_hex(8)}.lease"
        path.write_text(json.dumps(owner_record()), encoding="utf-8")
        self._heartbeat.add(path)
        return path

    def drop(self, path: Path) -> None:
        """End a lease taken by ``take``."""
        self._heartbeat.discard(path)
        path.unlink(missing_ok=True)

    def live(self, key: str) -> bool:
        """Whether any live lease holds entry ``key``; dead ones are removed on the way."""
        folder = self._folder / key
        if not folder.is_dir():
            return False
        found = False
        for path in folder.glob("*.lease"):
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            alive = owner_alive(read_record(path))
            if alive or (alive is None and age < self._stale_s):
                found = True
            else:
                LOG.info("removing the dead lease %s on %s", path.name, key)
                path.unlink(missing_ok=True)
        return found
