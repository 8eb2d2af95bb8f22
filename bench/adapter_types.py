"""Per-job apply cost of each adapter type on the full-size SDXL UNet, beside a plain LoRA of the same size.

    python -m bench.adapter_types --device cpu --runs 3

Every attention projection and resnet conv gets the type's factors (kohya / LyCORIS key names, random values):
``lora`` rank 32, ``loha`` rank 16 (two pairs: the bytes of rank 32), ``lokr`` (w1 whole 8x8-sized, w2 factored
rank 32), ``dora`` (rank 32 plus ``dora_scale``). Two files per type alternate, so every apply computes. Prints
one JSON line: the median apply ms per type, warm-up excluded, the ratio to ``lora`` and each file's MB.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.paths import timed
from bench.pipelines import microbench_setup
from sdxl_worker.weights.load import load_lora
from sdxl_worker.weights.patcher import LoraPatcher, ScaledLora

RANK = 32


def _kron_split(size: int) -> tuple[int, int]:
    """A divisor of ``size`` near 8 and the quotient (LoKr's factor split)."""
    first = next(f for f in (8, 4, 2, 1) if size % f == 0)
    return first, size // first


def type_state(unet: torch.nn.Module, kind: str, seed: int) -> dict[str, torch.Tensor]:
    """The ``kind`` factors for every attention projection and resnet conv of ``unet``."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.01

    state = {}
    for name, module in unet.named_modules():
        is_attn = isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
        is_conv = isinstance(module, torch.nn.Conv2d) and "resnets" in name and name.endswith(("conv1", "conv2"))
        if not (is_attn or is_conv):
            continue
        out_dim, in_dim, *kernel = module.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.alpha"] = torch.tensor(float(RANK))
        if kind in ("lora", "dora"):
            state[f"{key}.lora_down.weight"] = rand(RANK, in_dim, *kernel)
            state[f"{key}.lora_up.weight"] = rand(out_dim, RANK, *[1] * len(kernel))
            if kind == "dora":
                state[f"{key}.dora_scale"] = module.weight.float().flatten(1).norm(dim=1, keepdim=True)
        elif kind == "loha":
            flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
            for half in ("w1", "w2"):
                state[f"{key}.hada_{half}_a"] = rand(out_dim, RANK // 2)
                state[f"{key}.hada_{half}_b"] = rand(RANK // 2, flat_in)
        else:
            (out1, out2), (in1, in2) = _kron_split(out_dim), _kron_split(in_dim)
            state[f"{key}.lokr_w1"] = rand(out1, in1)
            state[f"{key}.lokr_w2_a"] = rand(out2, RANK)
            state[f"{key}.lokr_w2_b"] = rand(RANK, in2, *kernel)
    return state


def main() -> int:
    args, device, dtype, unet = microbench_setup(__doc__, runs=3)
    patcher = LoraPatcher(types.SimpleNamespace(unet=unet))
    result: dict[str, object] = {"device": str(device), "dtype": str(dtype), "runs": args.runs}
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("lora", "loha", "lokr", "dora"):
            loras = []
            for seed in (1, 2):
                path = Path(folder) / f"{kind}{seed}.safetensors"
                save_file(type_state(unet, kind, seed), str(path))
                result[f"{kind}_mb"] = round(path.stat().st_size / 2**20, 1)
                loras.append(load_lora(path, f"{kind}{seed}", unet_config=unet.config, device=device, dtype=dtype))
            times = []
            for run in range(args.runs + 1):
                elapsed = timed(device, lambda: patcher.apply([ScaledLora(loras[run % 2], 0.8, kind)]))[0]
                patcher.restore()
                if run:
                    times.append(elapsed)
            result[f"{kind}_apply_ms"] = round(statistics.median(times), 1)
            result[f"{kind}_vs_lora"] = round(result[f"{kind}_apply_ms"] / result["lora_apply_ms"], 2)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
