"""Benchmark the LoRA worker against the plain diffusers path, side by side in one process.

    python -m bench --quick --json                 # embedded tiny SDXL, under 2 minutes on 2 cores
    python -m bench --device cuda                  # full-size SDXL architecture, 1024x1024, 30 steps, fp16
    python -m bench --device cpu --size 256 --steps 3 --memory-jobs 40   # full size on a CPU, reduced

The last stdout line with ``--json`` is one JSON object (keys in bench/README.md); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.figures import (Setup, cleanup, disk_load, download, memory, overlap, per_job_overhead, prompt_encoding,
                           step_time, worker_settings)
from bench.lora_files import serve_folder, write_bench_loras
from bench.paths import JobShape
from bench.pipelines import build_pipelines
from bench.report import markdown_table, overhead_chart, verdicts
from sdxl_worker.worker import Worker

LOG = logging.getLogger("bench")
FIGURES = {figure.__name__: figure for figure in (per_job_overhead, step_time, disk_load, download, overlap, memory,
                                                  prompt_encoding)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the embedded tiny SDXL instead of the full size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="image side (quick: 64, full: 1024)")
    parser.add_argument("--steps", type=int, help="denoising steps (quick: 4, full: 30)")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per figure, after one warm-up")
    parser.add_argument("--memory-jobs", type=int, default=200)
    parser.add_argument("--memory-size", type=int, help="image side of the memory jobs (quick: 64, full: 256)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    parser.add_argument("--chart", type=Path, help="write the overhead chart (PNG) here (needs per_job_overhead)")
    parser.add_argument("--only", type=lambda names: names.split(","), default=list(FIGURES),
                        help=f"comma-separated figures to measure (default all: {','.join(FIGURES)})")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    unknown = sorted(set(args.only) - set(FIGURES))
    if unknown:
        raise SystemExit(f"--only: unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    full = not args.quick
    size = args.size or (1024 if full else 64)
    shape = JobShape(height=size, width=size, steps=args.steps or (30 if full else 4))
    memory_size = args.memory_size or (256 if full else 64)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="sdxl-lora-bench-"))
    try:
        pipes = build_pipelines(full, device, dtype)
        files = write_bench_loras(pipes.base, workdir / "served", full, cycle_count=20)
        worker = Worker(pipes, worker_settings(workdir / "cache"))
        with serve_folder(workdir / "served") as base_url:
            memory_shape = JobShape(memory_size, memory_size, steps=1 if args.quick else 2)  # flat or not at any count
            setup = Setup(worker, shape, memory_shape, files, base_url, workdir,
                          args.runs, args.memory_jobs)
            results = {
                "mode": "quick" if args.quick else "full", "device": str(device), "dtype": str(dtype),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "height": shape.height, "width": shape.width, "steps": shape.steps, "runs": args.runs,
                "rank32_lora_mb": round(files["rank32_unet"].stat().st_size / 1e6, 1),
                "rank128_lora_mb": round(files["rank128_all"].stat().st_size / 1e6, 1),
            }
            for figure in (FIGURES[name] for name in FIGURES if name in args.only):
                LOG.info("measuring %s", figure.__name__)
                figures = figure(setup)
                LOG.info("%s: %s", figure.__name__, json.dumps(figures))  # kept even if a later figure fails
                results.update(figures)
        results["seconds"] = round(time.time() - started, 1)
        results["verdicts"] = verdicts(results, device.type == "cuda")
    finally:
        cleanup(workdir)
    LOG.info("results:\n%s", markdown_table(results, device.type == "cuda"))
    if args.chart and "overhead_ms_ours_cold" in results:
        overhead_chart(results, args.chart, f"{results['mode']} on {results['gpu'] or results['cpu']}")
    if args.json:
        sys.stdout.write(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
