"""The measurements, each a ratio of two paths timed alternately in one process (medians over rounds).

Where two jobs run back to back, their order rotates from round to round and the ratio is ``order_balanced_ratio``:
on a GPU the position of a job in a run of jobs changes its speed by several percent.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from bench.paths import JobShape, our_job, plain_download, plain_job, reference_job, timed
from sdxl_worker.generation.prompt_encoding import CHUNK_TOKENS, needs_encoding, prompt_embeddings
from sdxl_worker.net.download import download_url
from sdxl_worker.request.entries import parse_lora_requests
from sdxl_worker.settings import WorkerSettings
from sdxl_worker.store.cache import LoraCache
from sdxl_worker.weights.load import load_lora
from sdxl_worker.weights.patcher import ScaledLora
from sdxl_worker.weights.ram_cache import LoraRamCache
from sdxl_worker.worker import Worker

LOG = logging.getLogger(__name__)
RAM_BUDGET = 4 * 1024**3
SCALE = 0.8


@dataclass
class Setup:
    """Everything the measurements share."""

    worker: Worker
    shape: JobShape
    memory_shape: JobShape
    files: dict[str, Path]
    base_url: str
    workdir: Path
    runs: int
    memory_jobs: int

    @property
    def device(self) -> torch.device:
        return self.worker.pipes.device

    def url(self, name: str) -> str:
        return f"{self.base_url}/{self.files[name].name}"

    def fresh_caches(self) -> None:
        """A new, empty disk cache folder and RAM cache for the worker: the next LoRA is cold."""
        folder = Path(tempfile.mkdtemp(prefix="cache-", dir=self.workdir))
        self.worker.lora_cache = LoraCache(worker_settings(folder).cache)
        self.worker.ram_cache = LoraRamCache(RAM_BUDGET)
        self.worker.patcher.forget_fused()


def worker_settings(folder: Path) -> WorkerSettings:
    """The bench worker's settings: its LoRA cache in ``folder``, the local file server allowed, other defaults."""
    return WorkerSettings.from_env({"LORA_CACHE_DIR": str(folder), "LORA_ALLOW_PRIVATE_HOSTS": "1",
                                    "LORA_RAM_CACHE_GB": str(RAM_BUDGET / 1024**3)})


def median(values: list[float]) -> float:
    return statistics.median(values)


Round = tuple[tuple[str, ...], dict[str, float]]  # the order the arms ran in, and each arm's sample
MIN_CYCLES = 3


def rotated(arms: tuple[str, ...], run: int) -> tuple[str, ...]:
    """The order of the arms in round ``run``: rotated by one each round, so that any ``len(arms)`` consecutive
    rounds (a cycle) run every arm once in every position."""
    shift = run % len(arms)
    return arms[shift:] + arms[:shift]


def balanced_rounds(runs: int, arms: int) -> int:
    """Measured rounds of a figure whose ``arms`` rotate: whole cycles, at least ``MIN_CYCLES`` of them, and ``runs``
    or more."""
    return arms * max(MIN_CYCLES, math.ceil(runs / arms))


def order_balanced_ratio(rounds: list[Round], numerator: str, denominator: str, cycle: int) -> float:
    """``numerator / denominator`` without the bias of a job's position in its round (a GPU under sustained load
    heats and clocks down, so the second of two identical jobs runs slower): the measured rounds in consecutive
    cycles of ``cycle`` rounds, the geometric mean of the per-round ratios within each cycle (a slowdown factor per
    position cancels out of it), then the median over the cycles (one disturbed round moves one cycle only)."""
    ratios = [sample[numerator] / sample[denominator] for _, sample in rounds]
    cycles = [ratios[start:start + cycle] for start in range(0, len(ratios) - cycle + 1, cycle)]
    return round(median([math.exp(statistics.fmean(map(math.log, values))) for values in cycles]), 4)


# What the LoRA work adds to a job's latency (the worker's timings): waiting for downloads and for the loader
# thread, fusing, restoring. Fetch and load themselves may run hidden behind prompt encoding (LORA_OVERLAP).
LORA_PHASES = ("lora_wait", "lora_apply", "lora_restore")


def per_job_overhead(setup: Setup) -> dict[str, float]:
    """Figure 1 (LoRA overhead per cache tier, ours vs reference) and figure 3 (job without LoRAs).

    Overhead is timed directly around the LoRA work on each job's critical path (ours: the worker's wait, apply and
    restore phases, where wait covers downloads and whatever of the load the prompt encoding did not hide;
    reference: download, load_lora_weights, fuse_lora, unfuse_lora, unload_lora_weights), device synchronized.
    Generation itself costs the same on both paths (figure 2), and timing the LoRA work directly keeps the
    run-to-run noise of a whole job (PNG encoding of a noise image varies by hundreds of ms) out of it.
    The whole-job medians are reported too (``job_ms_*``); figure 3 compares the two jobs without LoRAs, run back
    to back in alternating order (``order_balanced_ratio``). Tiers: ``cold`` (empty caches, HTTP), ``disk`` (on
    disk, not in RAM), ``ram`` (parsed in RAM, fused weights computed) and ``repeat`` (the same LoRA set as the
    previous job, whose fused weights the patcher kept).
    """
    pipe, device, shape = setup.worker.pipes.base, setup.device, setup.shape
    lora = [{"path": setup.url("rank32_unet"), "scale": SCALE}]
    jobs: dict[str, list[float]] = {name: [] for name in ("ours_none", "plain_none", "ours_ram")}
    overhead: dict[str, list[float]] = {name: [] for name in ("ours_cold", "ours_disk", "ours_ram", "ours_repeat",
                                                              "reference_cold", "reference_disk")}
    downloaded = setup.workdir / "reference-download.safetensors"

    no_lora_jobs = {"ours_none": lambda: our_job(setup.worker, shape),
                    "plain_none": lambda: plain_job(pipe, shape, device)}

    def ours(tier: str) -> float:
        elapsed, output = timed(device, lambda: our_job(setup.worker, shape, lora))
        if tier == "ram":
            jobs["ours_ram"].append(elapsed)
        return sum(output["timings"].get(phase, 0.0) for phase in LORA_PHASES)

    none_rounds: list[Round] = []
    for run in range(balanced_rounds(setup.runs, 2) + 1):
        order = rotated(("plain_none", "ours_none"), run)
        pair = {name: timed(device, no_lora_jobs[name])[0] for name in order}
        for name, value in pair.items():
            jobs[name].append(value)
        none_rounds.append((order, pair))
        setup.fresh_caches()
        sample = {"ours_cold": ours("cold"),
                  "reference_cold": reference_job(pipe, shape, device, downloaded, SCALE,
                                                  url=setup.url("rank32_unet"))}
        setup.worker.ram_cache = LoraRamCache(RAM_BUDGET)
        setup.worker.patcher.forget_fused()
        sample["ours_disk"] = ours("disk")
        sample["reference_disk"] = reference_job(pipe, shape, device, setup.files["rank32_unet"], SCALE)
        setup.worker.patcher.forget_fused()
        sample["ours_ram"] = ours("ram")
        sample["ours_repeat"] = ours("repeat")
        if run == 0:
            for values in (*jobs.values(), none_rounds):
                values.clear()  # warm-up
            continue
        for name, value in sample.items():
            overhead[name].append(value)
        LOG.info("overhead run %d (ms): %s", run, {k: round(v, 1) for k, v in sample.items()})
    result = {f"overhead_ms_{name}": round(median(values), 2) for name, values in overhead.items()}
    result.update({f"job_ms_{name}": round(median(values), 2) for name, values in jobs.items()})
    for tier, reference in (("cold", "cold"), ("disk", "disk"), ("ram", "disk"), ("repeat", "disk")):
        result[f"overhead_ratio_{tier}_vs_reference"] = ratio(result[f"overhead_ms_ours_{tier}"],
                                                              result[f"overhead_ms_reference_{reference}"])
    result["no_lora_job_ratio"] = order_balanced_ratio(none_rounds, "ours_none", "plain_none", 2)
    return result


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 4) if denominator > 0 else float("nan")


def _step_ms(pipe, shape: JobShape, device: torch.device) -> float:
    """Median milliseconds of one denoising step (text encoding and VAE excluded), from step-end timestamps."""
    marks: list[float] = []

    def mark(_pipe, _step, _timestep, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return kwargs

    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    pipe(prompt="a lighthouse", height=shape.height, width=shape.width, num_inference_steps=shape.steps,
         generator=torch.Generator(device=device).manual_seed(shape.seed), output_type="latent",
         callback_on_step_end=mark)
    return median([(later - earlier) * 1000 for earlier, later in zip(marks, marks[1:])])


def step_time(setup: Setup) -> dict[str, float]:
    """Figure 2: denoising step time with LoRAs fused (ours) and unfused (reference) vs the base model.

    Base and ours run back to back in alternating order (``order_balanced_ratio``); the unfused reference last.
    """
    pipe, device, shape = setup.worker.pipes.base, setup.device, setup.shape
    requests, _ = parse_lora_requests([setup.url("rank32_unet"), setup.url("rank128_all")], 8)
    loaded = setup.worker.load_all(setup.worker.lora_cache.resolve_all(requests))
    loras = [ScaledLora(item.parsed, 1.0, item.resolved.display_name) for item in loaded]

    def ours() -> float:
        with setup.worker.patcher.applied(loras):
            return _step_ms(pipe, shape, device)

    def unfused() -> float:
        pipe.load_lora_weights(str(setup.files["rank32_unet"]), adapter_name="step")
        pipe.set_adapters(["step"], adapter_weights=[1.0])
        try:
            return _step_ms(pipe, shape, device)
        finally:
            pipe.unload_lora_weights()

    arms = {"base": lambda: _step_ms(pipe, shape, device), "ours": ours, "unfused": unfused}
    rounds: list[Round] = []
    for run in range(balanced_rounds(setup.runs, 2) + 1):
        order = (*rotated(("base", "ours"), run), "unfused")
        sample = {name: arms[name]() for name in order}
        LOG.info("step run %d (ms, in this order): %s", run, {k: round(v, 2) for k, v in sample.items()})
        if run:
            rounds.append((order, sample))
    steps = {name: median([sample[name] for _, sample in rounds]) for name in arms}
    return {"step_ms_base": round(steps["base"], 3), "step_ms_ours_lora": round(steps["ours"], 3),
            "step_ms_reference_unfused_lora": round(steps["unfused"], 3),
            "step_time_ratio": order_balanced_ratio(rounds, "ours", "base", 2),
            "step_time_ratio_reference_unfused": ratio(steps["unfused"], steps["base"])}


def disk_load(setup: Setup) -> dict[str, float]:
    """Figure 4: a disk-cached LoRA (cache hit + parse onto the device) vs a raw safetensors read of the same file."""
    worker, device = setup.worker, setup.device
    requests, _ = parse_lora_requests([setup.url("rank32_unet")], 8)
    worker.lora_cache.resolve(requests[0])
    ours, resolve, raw = [], [], []
    for run in range(setup.runs + 1):
        sample_resolve, resolved = timed(device, lambda: worker.lora_cache.resolve(requests[0]))
        sample_parse = timed(device, lambda: load_lora(resolved.path, resolved.sha256,
                                                       unet_config=worker.pipes.base.unet.config,
                                                       device=device, dtype=worker.pipes.dtype))[0]
        sample_raw = timed(device, lambda: load_file(str(setup.files["rank32_unet"]), device=str(device)))[0]
        if run:
            ours.append(sample_resolve + sample_parse)
            resolve.append(sample_resolve)
            raw.append(sample_raw)
    return {"disk_load_ms_ours": round(median(ours), 2), "disk_load_ms_cache_hit": round(median(resolve), 2),
            "raw_read_ms": round(median(raw), 2), "disk_load_vs_raw_read_ratio": ratio(median(ours), median(raw))}


def download(setup: Setup) -> dict[str, float]:
    """Figure 5: our streaming download (checks, hashing, fsync) vs a plain requests copy from the same server.

    Also against the plain copy followed by an fsync (the durability our cache needs before its atomic rename), and
    against the plain copy that also hashes every chunk with sha256 and fsyncs (all the work a verified cache entry
    needs, done inline): on a machine whose cores the local server shares, hashing competes with the transfer.
    """
    settings = worker_settings(setup.workdir).cache
    url, size = setup.url("download_payload"), setup.files["download_payload"].stat().st_size
    copies = {"ours": lambda target: download_url(url, target, settings),
              "plain": lambda target: plain_download(url, target),
              "plain_fsync": lambda target: plain_download(url, target, fsync=True),
              "plain_verified": lambda target: plain_download(url, target, fsync=True, sha256=True)}
    samples: dict[str, list[float]] = {name: [] for name in copies}
    for run in range(setup.runs + 1):
        target = setup.workdir / "download.bin"
        for name, copy in copies.items():
            elapsed = timed(setup.device, lambda: copy(target))[0]
            if run:
                samples[name].append(elapsed)
        target.unlink()
    mb = size / 1e6
    result: dict[str, float] = {"download_mb": round(mb, 1)}
    result.update({f"download_mb_s_{name}": round(mb / median(values) * 1000, 1) for name, values in samples.items()})
    result.update(download_vs_plain_copy_ratio=ratio(median(samples["plain"]), median(samples["ours"])),
                  download_vs_plain_copy_fsync_ratio=ratio(median(samples["plain_fsync"]), median(samples["ours"])),
                  download_vs_plain_verified_copy_ratio=ratio(median(samples["plain_verified"]),
                                                              median(samples["ours"])))
    return result


def memory(setup: Setup) -> dict[str, float]:
    """Figure 6: RSS (and GPU memory) over many jobs cycling through the cycle LoRAs; growth after warm-up."""
    process = psutil.Process(os.getpid())
    cycle = sorted(name for name in setup.files if name.startswith("cycle_"))
    warm_up = max(1, setup.memory_jobs // 5)
    rss, gpu = [], []
    for job in range(setup.memory_jobs):
        name = cycle[job % len(cycle)]
        loras = [{"path": setup.url(name), "scale": 0.5 + (job % 3) * 0.25}] if job % 4 else None
        our_job(setup.worker, setup.memory_shape, loras)
        rss.append(process.memory_info().rss)
        if setup.device.type == "cuda":
            gpu.append(torch.cuda.memory_allocated(setup.device))
    result = {"memory_jobs": setup.memory_jobs, "memory_loras": len(cycle), "memory_warm_up_jobs": warm_up,
              "rss_mb_after_warmup": round(rss[warm_up - 1] / 1e6, 1), "rss_mb_peak": round(max(rss) / 1e6, 1),
              "rss_growth_after_warmup": ratio(max(rss[warm_up:]) - rss[warm_up - 1], rss[warm_up - 1])}
    if gpu:
        result.update(gpu_mb_after_warmup=round(gpu[warm_up - 1] / 1e6, 1), gpu_mb_peak=round(max(gpu) / 1e6, 1),
                      gpu_growth_after_warmup=ratio(max(gpu[warm_up:]) - gpu[warm_up - 1], gpu[warm_up - 1]))
    return result


def overlap(setup: Setup) -> dict[str, float]:
    """Figure 7: job latency with a disk-cached LoRA over job latency without, with and without overlap.

    Latency is the job's wall time minus its PNG encoding (which varies with the image, not with the LoRA). Each
    round runs a job without LoRAs and the LoRA job overlapped and sequential, in an order rotated each round
    (``order_balanced_ratio``), each LoRA job with the LoRA on disk but not in RAM and no kept fused weights. The
    images of both paths must be the same bytes, else the benchmark fails.
    """
    worker, device, shape = setup.worker, setup.device, setup.shape
    lora = [{"path": setup.url("rank32_unet"), "scale": SCALE}]
    our_job(worker, shape, lora)  # on disk from now on
    rounds: list[Round] = []
    identical = True

    def job(loras: list | None, overlapped: bool = True) -> tuple[float, list[str]]:
        worker.ram_cache = LoraRamCache(RAM_BUDGET)
        worker.patcher.forget_fused()
        worker.overlap_loras = overlapped
        elapsed, output = timed(device, lambda: our_job(worker, shape, loras))
        return elapsed - output["timings"]["encode"], output["images"]

    arms = {"none": lambda: job(None), "overlapped": lambda: job(lora), "sequential": lambda: job(lora, False)}
    try:
        for run in range(balanced_rounds(setup.runs, len(arms)) + 1):
            order = rotated(tuple(arms), run)
            sample, images = {}, {}
            for name in order:
                sample[name], images[name] = arms[name]()
            identical = identical and images["overlapped"] == images["sequential"]
            LOG.info("overlap run %d (ms, in this order): %s", run, {k: round(v, 1) for k, v in sample.items()})
            if run:
                rounds.append((order, sample))
    finally:
        worker.overlap_loras = True
    if not identical:
        raise RuntimeError("overlapped and sequential LoRA jobs gave different images")
    result = {f"overlap_job_ms_{name}": round(median([sample[name] for _, sample in rounds]), 2) for name in arms}
    result.update(overlap_job_ratio_disk=order_balanced_ratio(rounds, "overlapped", "none", len(arms)),
                  sequential_job_ratio_disk=order_balanced_ratio(rounds, "sequential", "none", len(arms)),
                  overlap_bit_identical=identical)
    return result


def _timed_ms(device: torch.device, action, runs: int) -> float:
    """Median milliseconds of ``action`` over ``runs`` calls after one warm-up call."""
    return median([timed(device, action)[0] for _ in range(runs + 1)][1:])


def prompt_encoding(setup: Setup) -> dict[str, float]:
    """Figure 8: prompt encoding, today's path (diffusers' ``encode_prompt`` on a plain prompt, and the check that
    picks it) vs the A1111 path (a weighted prompt in one chunk, a plain prompt of 3 chunks)."""
    pipe, runs = setup.worker.pipes.base, max(setup.runs, 5)
    plain, weighted = "a cozy cabin in a snowy forest", "a (cozy:1.3) cabin in a [snowy] ((forest))"
    long = ", ".join(["a cozy cabin in a snowy forest"] * 60)
    long = pipe.tokenizer.decode(pipe.tokenizer(long, add_special_tokens=False).input_ids[:3 * CHUNK_TOKENS])
    with torch.inference_mode():
        today = _timed_ms(setup.device, lambda: pipe.encode_prompt(plain, device=setup.device,
                                                                  do_classifier_free_guidance=True), runs)
        check = _timed_ms(setup.device, lambda: needs_encoding(pipe, plain, None, None), runs)
        weighted_ms = _timed_ms(setup.device, lambda: prompt_embeddings(pipe, weighted, None, None), runs)
        chunks_ms = _timed_ms(setup.device, lambda: prompt_embeddings(pipe, long, None, None), runs)
    return {"prompt_ms_plain_today": round(today, 3), "prompt_ms_plain_path_check": round(check, 3),
            "prompt_ms_weighted": round(weighted_ms, 3), "prompt_ms_3_chunks": round(chunks_ms, 3),
            "prompt_3_chunks_vs_plain_ratio": ratio(chunks_ms, today)}


def cleanup(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
