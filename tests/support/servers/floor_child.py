"""Run as a subprocess, inside a private mount namespace whose cache folder is a small tmpfs: resolve URLs in order
through ``LoraCache`` with the free-disk floor, and print one JSON line per URL.

``python -m tests.support.servers.floor_child CACHE_DIR MIN_FREE_BYTES PINNED URL...``: ``PINNED`` is a comma-separated
``PINNED_LORAS`` value. Each line holds ``source``, ``ok``, ``error``, ``entries`` (the cache's downloaded entries
after that URL) and ``free`` (``shutil.disk_usage``, the real free space of the tmpfs).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sdxl_worker.errors import LoraError
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import CacheSettings, source_list
from sdxl_worker.store.cache import LoraCache
from sdxl_worker.store.housekeeping import scan_entries


def main() -> None:
    root, floor, pinned, urls = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    settings = CacheSettings(cache_dir=root, allow_private_hosts=True, min_free_bytes=floor, evict_grace_s=0,
                             free_check_bytes=64 * 1024, pinned_sources=source_list(pinned), download_retries=0)
    cache = LoraCache(settings)
    for url in urls:
        try:
            cache.resolve(LoraRequest(0, url))
            error = None
        except LoraError as failure:
            error = str(failure)
        entries = sorted(entry.manifest.source for entry in scan_entries(root))
        print(json.dumps({"source": url, "ok": error is None, "error": error, "entries": entries,
                          "free": shutil.disk_usage(root).free,
                          "leftovers": [path.name for path in root.iterdir() if path.name.startswith(".tmp")]}),
              flush=True)


if __name__ == "__main__":
    main()
