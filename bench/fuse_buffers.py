"""Fusing a rank-32 LoRA into the full-size SDXL UNet: into the kept fused tensors vs into freshly allocated ones.

    python -m bench.fuse_buffers --device cpu --runs 7

Two LoRAs alternate, so every apply computes (nothing is reused as is). ``kept`` writes into the tensors the last
job left (``LoraPatcher.forget_fused``), ``fresh`` allocates new ones (``release_fused``). Prints one JSON line:
the median ms of each, warm-up excluded, and the first fuse (``first``, into memory the process never touched).
Once the allocator holds memory freed by an earlier release, ``fresh`` recycles it and costs what ``kept`` costs; the
kept tensors spare the first-touch page faults whenever no such memory is free (the first job, or after other work).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import types
from pathlib import Path

from bench.paths import timed
from bench.pipelines import microbench_setup
from sdxl_worker.weights.load import load_lora
from sdxl_worker.weights.patcher import LoraPatcher, ScaledLora
from tools.synthetic_lora import write_kohya_lora


def main() -> int:
    args, device, dtype, unet = microbench_setup(__doc__, runs=7)
    patcher = LoraPatcher(types.SimpleNamespace(unet=unet))
    times: dict[str, list[float]] = {"kept": [], "fresh": []}
    with tempfile.TemporaryDirectory() as folder:
        loras = [load_lora(write_kohya_lora(Path(folder) / f"lora{seed}.safetensors", {"unet": unet}, rank=32,
                                            seed=seed), f"lora{seed}", unet_config=unet.config, device=device,
                           dtype=dtype) for seed in (1, 2)]
    for run in range(args.runs + 1):
        for mode in times:
            if mode == "fresh":
                patcher.release_fused()
            else:
                patcher.forget_fused()
            elapsed = timed(device, lambda: patcher.apply([ScaledLora(loras[run % 2], 0.8, "bench")]))[0]
            patcher.restore()
            if run:
                times[mode].append(elapsed)
            elif mode == "kept":
                first = elapsed
    sys.stdout.write(json.dumps({"device": str(device), "dtype": str(dtype), "runs": args.runs,
                                 "modules": sum(len(m) for m in loras[0].components.values()),
                                 "fuse_ms_first": round(first, 1),
                                 **{f"fuse_ms_{mode}": round(statistics.median(v), 1) for mode, v in times.items()}})
                     + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
