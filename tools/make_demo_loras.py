"""Place the demo's two LoRAs for the embedded tiny SDXL into the LoRA cache (``LORA_CACHE_DIR``) by name.

    LORA_CACHE_DIR=models/loras python -m tools.make_demo_loras

``demo-style.safetensors`` patches the UNet attention; ``demo-detail.safetensors`` the UNet and both text encoders.
Both are kohya-format files, as downloaded from Civitai, generated from fixed seeds.
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_worker.generation.tiny_model import ensure_tiny_model
from sdxl_worker.settings import CacheSettings
from tools.synthetic_lora import write_kohya_lora

LOG = logging.getLogger("make_demo_loras")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache_dir = CacheSettings.from_env(os.environ).cache_dir
    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model(), torch_dtype=torch.float32)
    everything = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    written = [
        write_kohya_lora(cache_dir / "demo-style.safetensors", {"unet": pipe.unet}, rank=8, seed=1, up_std=0.5),
        write_kohya_lora(cache_dir / "demo-detail.safetensors", everything, rank=4, seed=2, up_std=0.5),
    ]
    for path in written:
        LOG.info("demo LoRA: %s (%d bytes)", path, path.stat().st_size)


if __name__ == "__main__":
    main()
