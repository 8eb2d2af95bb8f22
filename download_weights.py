"""Build-time download of the base model, refiner and fp16-fix VAE into the image's Hugging Face cache.

Run by the Dockerfile. Writes ``/models/baked-models.json`` (``--manifest``), which the worker reads at start to load
exactly these models offline (``sdxl_worker.generation.models``). Honours ``HF_TOKEN`` and ``HF_ENDPOINT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from huggingface_hub import snapshot_download

LOG = logging.getLogger("download_weights")

FP16_VARIANT_PATTERNS = ["*.json", "*.txt", "*.fp16.safetensors", "tokenizer*/*"]
RETRIES = 3


def fetch(repo_id: str, allow_patterns: list[str] | None) -> str:
    """Download one repository snapshot (with retries) and return its local folder."""
    for attempt in range(1, RETRIES):
        try:
            return snapshot_download(repo_id, allow_patterns=allow_patterns)
        except OSError as error:
            LOG.warning("download of %s failed (%s), retry %d/%d", repo_id, error, attempt, RETRIES - 1)
            time.sleep(5 * attempt)
    return snapshot_download(repo_id, allow_patterns=allow_patterns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="stabilityai/stable-diffusion-xl-base-1.0")
    parser.add_argument("--refiner", default="stabilityai/stable-diffusion-xl-refiner-1.0",
                        help="empty to bake no refiner")
    parser.add_argument("--vae", default="madebyollin/sdxl-vae-fp16-fix", help="empty to keep the base VAE")
    parser.add_argument("--manifest", type=Path, default=Path("/models/baked-models.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    for repo_id in filter(None, (args.base, args.refiner)):
        LOG.info("baked %s at %s", repo_id, fetch(repo_id, FP16_VARIANT_PATTERNS))
    if args.vae:
        LOG.info("baked %s at %s", args.vae, fetch(args.vae, ["*.json", "*.safetensors"]))
    args.manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"base": args.base, "refiner": args.refiner or None, "vae": args.vae or None, "variant": "fp16"}
    args.manifest.write_text(json.dumps(manifest, indent=2))
    LOG.info("wrote %s", args.manifest)


if __name__ == "__main__":
    main()
