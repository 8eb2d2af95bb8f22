"""A job's output object: images, seed, timings, the prompt the model saw when it was rewritten, and one report per
LoRA (its source, cache tiers, what applying it did and its header metadata)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdxl_worker.net.redact import public_source, scrub
from sdxl_worker.weights.metadata import metadata_of
from sdxl_worker.weights.patcher import ApplyReport
from sdxl_worker.weights.session import LoadedLora


def lora_report(item: LoadedLora, report: ApplyReport, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The per-LoRA entry of a job's output; URLs lose secret query parameters, token values are masked."""
    request = item.resolved.request
    return {
        "source": scrub(public_source(request.source), secrets),
        "label": scrub(request.label, secrets),
        "scale": request.scale,
        "te_scale": request.te_scale,
        "file": scrub(item.resolved.display_name, secrets),
        "cache_hit": item.resolved.cache_hit,
        "ram_cache_hit": item.ram_hit,
        "sha256": item.resolved.sha256,
        "fetch_ms": round(item.resolved.fetch_ms, 2),
        "load_ms": round(item.load_ms, 2),
        **report.as_dict(),
        "metadata": metadata_of(item.resolved).report(),
    }


def job_output(images: list[str], seed: int, timings: dict[str, float], prompt: str | None = None,
               loras: Sequence[tuple[LoadedLora, ApplyReport]] | None = None,
               secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The output of a job that generated ``images`` (encoded); ``image_url`` is the first.

    ``prompt``: the prompt the model saw, given only when it differs from the input's; ``loras``: each LoRA of a job
    with LoRAs and its apply report (``None`` for a job without), reported with ``secrets`` masked.
    """
    output: dict[str, Any] = {"images": images, "image_url": images[0], "seed": seed, "timings": timings}
    if prompt is not None:
        output["prompt"] = prompt
    if loras is not None:
        output["loras"] = [lora_report(item, report, secrets) for item, report in loras]
    return output
