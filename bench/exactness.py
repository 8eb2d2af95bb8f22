"""Restoration exactness on the target device: our apply/restore vs diffusers' fuse_lora/unfuse_lora, many cycles.

    python -m bench.exactness --device cuda --cycles 10      # full-size SDXL architecture in float16

Prints one JSON line: the largest absolute difference of any UNet weight from the loaded model after the cycles,
for each path (ours must be exactly 0.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from bench.pipelines import build_pipelines
from sdxl_worker.weights.load import load_lora
from sdxl_worker.weights.patcher import LoraPatcher, ScaledLora
from tools.synthetic_lora import write_kohya_lora


def max_drift(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between ``module``'s weights and ``reference``."""
    return max((value.float() - reference[key].float()).abs().max().item()
               for key, value in module.state_dict().items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the embedded tiny SDXL instead of the full size")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_pipelines(not args.quick, device, dtype).base
    reference = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        path = write_kohya_lora(Path(folder) / "rank32.safetensors", {"unet": pipe.unet}, rank=32, seed=1,
                                up_std=1e-2)
        parsed = load_lora(path, "rank32", unet_config=pipe.unet.config, device=device, dtype=dtype)
        patcher = LoraPatcher(pipe)
        for _ in range(args.cycles):
            with patcher.applied([ScaledLora(parsed, 0.8, "rank32")]):
                pass
        ours = max_drift(pipe.unet, reference)
        for _ in range(args.cycles):
            pipe.load_lora_weights(str(path), adapter_name="cycle")
            pipe.fuse_lora(lora_scale=0.8, adapter_names=["cycle"])
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        theirs = max_drift(pipe.unet, reference)
    sys.stdout.write(json.dumps({"device": str(device), "dtype": str(dtype), "cycles": args.cycles,
                                 "max_abs_drift_ours": ours, "max_abs_drift_fuse_unfuse": theirs}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
