"""Run one job file through the worker exactly as ``python handler.py --test_input`` does, and save its images.

    python -m tools.run_job test_input_with_lora.json --out output

The job goes through the runpod SDK's own ``run_job`` with ``handler.handler``; data-URI images are decoded to
``<out>/<job id>-<n>.png`` and their paths printed, the rest of the output (seed, timings, LoRA report) logged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import sys
from pathlib import Path

from runpod.serverless.modules.rp_job import run_job

import handler

LOG = logging.getLogger("run_job")
DATA_URI_PREFIX = "data:image/png;base64,"


def save_images(images: list[str], out_dir: Path, stem: str) -> list[Path]:
    """Write data-URI PNGs to ``out_dir``; URLs (uploads) are left as they are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        if image.startswith(DATA_URI_PREFIX):
            path = out_dir / f"{stem}-{index}.png"
            path.write_bytes(base64.b64decode(image[len(DATA_URI_PREFIX):]))
            paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_file", type=Path)
    parser.add_argument("--out", type=Path, default=Path("output"))
    args = parser.parse_args()
    handler.configure_logging()

    job = json.loads(args.job_file.read_text())
    job.setdefault("id", args.job_file.stem)
    result = asyncio.run(run_job(handler.handler, job))
    if "error" in result:
        LOG.error("job failed: %s", result["error"])
        return 1
    output = result["output"]
    paths = save_images(output["images"], args.out, job["id"])
    summary = {key: value for key, value in output.items() if key not in ("images", "image_url")}
    LOG.info("job output (images omitted): %s", json.dumps(summary, indent=2))
    for path in paths:
        LOG.info("image written: %s", path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
