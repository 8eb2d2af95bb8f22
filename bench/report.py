"""Targets, the results table, the JSON line and the overhead chart."""

from __future__ import annotations

import math
from pathlib import Path

# key -> (comparison, limit on CPU, limit on a GPU, what it means)
TARGETS = {
    "overhead_ratio_ram_vs_reference": ("<=", 1 / 5, 1 / 20, "per-job overhead, RAM-cached rank-32 LoRA vs reference"),
    "step_time_ratio": ("<=", 1.02, 1.02, "denoising step with LoRAs applied vs base model"),
    "no_lora_job_ratio": ("<=", 1.01, 1.01, "job without LoRAs vs a worker without LoRA support"),
    "disk_load_vs_raw_read_ratio": ("<=", 1.5, 1.5, "disk-cached LoRA load vs raw safetensors read"),
    "download_vs_plain_copy_ratio": (">=", 0.8, 0.8, "download throughput vs plain streaming copy"),
    "overlap_job_ratio_disk": ("<=", 1.05, 1.05, "job latency with a disk-cached LoRA vs without (overlapped)"),
    "rss_growth_after_warmup": ("<=", 0.05, 0.05, "RSS growth after warm-up over the cycling jobs"),
    "gpu_growth_after_warmup": ("<=", 0.05, 0.05, "GPU memory growth after warm-up over the cycling jobs"),
}


def verdicts(results: dict, on_gpu: bool) -> dict[str, str]:
    """PASS or MISS per target present in ``results``."""
    out = {}
    for key, (op, cpu_limit, gpu_limit, _) in TARGETS.items():
        if key not in results:
            continue
        value, limit = results[key], gpu_limit if on_gpu else cpu_limit
        ok = not math.isnan(value) and (value <= limit if op == "<=" else value >= limit)
        out[key] = "PASS" if ok else "MISS"
    return out


def markdown_table(results: dict, on_gpu: bool) -> str:
    """The targets as a Markdown table."""
    rows = ["| figure | measured | target | verdict |", "|---|---|---|---|"]
    marks = verdicts(results, on_gpu)
    for key, (op, cpu_limit, gpu_limit, meaning) in TARGETS.items():
        if key in results:
            limit = gpu_limit if on_gpu else cpu_limit
            rows.append(f"| {meaning} (`{key}`) | {results[key]} | {op} {limit:.3g} | {marks[key]} |")
    return "\n".join(rows)


def overhead_chart(results: dict, path: Path, title: str) -> None:
    """Bars of per-job LoRA overhead (ms) by cache tier, ours vs the reference path, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = ["cold", "disk", "ram", "repeat"]
    ours = [max(results[f"overhead_ms_ours_{t}"], 0.1) for t in tiers]
    reference = [max(results.get(f"overhead_ms_reference_{t}", results["overhead_ms_reference_disk"]), 0.1)
                 for t in tiers]
    figure, axis = plt.subplots(figsize=(8, 4))
    positions = range(len(tiers))
    axis.bar([p - 0.2 for p in positions], reference, width=0.4, label="plain diffusers path (per job)")
    axis.bar([p + 0.2 for p in positions], ours, width=0.4, label="this worker")
    axis.set_xticks(list(positions), ["cold (HTTP)", "disk-cached", "RAM-cached\n(ref: disk)",
                                      "same set as\nlast job (ref: disk)"])
    axis.set_yscale("log")
    axis.set_ylabel("per-job LoRA overhead, ms (log)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
