"""Run as a subprocess: resolve one source through ``LoraCache`` and write the result as JSON.

``python -m tests.support.servers.resolve_child SOURCE OUT_JSON [GO_FILE]``: with GO_FILE, it writes ``OUT_JSON.ready``
once imported and waits for GO_FILE to exist, so that many children start at once. The cache comes from the
environment (``LORA_CACHE_DIR``, ``LORA_ALLOW_PRIVATE_HOSTS``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import CacheSettings
from sdxl_worker.store.cache import LoraCache


def main() -> None:
    source, out = sys.argv[1], Path(sys.argv[2])
    go = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cache = LoraCache(CacheSettings.from_env(os.environ))
    if go is not None:
        out.with_name(out.name + ".ready").touch()
        while not go.exists():
            time.sleep(0.005)
    resolved = cache.resolve(LoraRequest(index=0, source=source))
    out.write_text(json.dumps({"path": str(resolved.path), "sha256": resolved.sha256, "hit": resolved.cache_hit}))


if __name__ == "__main__":
    main()
