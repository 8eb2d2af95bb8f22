"""The pipelines benchmarked: the embedded tiny SDXL (quick) or the full-size SDXL architecture with random weights."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_worker.generation.models import ModelChoice, Pipelines
from sdxl_worker.generation.tiny_model import ASSETS_DIR, ensure_tiny_model

LOG = logging.getLogger(__name__)
FULL_ARCH_DIR = Path(__file__).resolve().parent / "sdxl-arch"


def _unet(device: torch.device) -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(FULL_ARCH_DIR / "unet"))


def full_size_unet(device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """The full-size SDXL UNet alone, random weights (seed 0), for microbenchmarks."""
    torch.manual_seed(0)
    return _unet(device).to(dtype=dtype).eval()


def microbench_setup(description: str, runs: int) -> tuple[argparse.Namespace, torch.device, torch.dtype,
                                                            UNet2DConditionModel]:
    """A UNet microbenchmark's start: ``--device``/``--runs`` parsed, warnings-only logging, the full-size UNet in
    the device's dtype (float16 on CUDA, float32 on CPU)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=runs)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return args, device, dtype, full_size_unet(device, dtype)


def _full_size(device: torch.device, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """Every full-size SDXL module built from its config on ``device`` with random weights (seed 0)."""
    torch.manual_seed(0)
    unet = _unet(device)
    with torch.device(device):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(FULL_ARCH_DIR / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(FULL_ARCH_DIR / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(FULL_ARCH_DIR / "text_encoder_2"))
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(FULL_ARCH_DIR / "scheduler"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet, scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(ASSETS_DIR / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(ASSETS_DIR / "tokenizer_2"),
    )
    return pipe.to(device=device, dtype=dtype)


def build_pipelines(full: bool, device: torch.device, dtype: torch.dtype) -> Pipelines:
    """The worker's ``Pipelines`` around the benchmarked base pipeline (no refiner)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    if full:
        base = _full_size(device, dtype)
        origin = "full-size SDXL architecture, random weights"
    else:
        base = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model(), torch_dtype=dtype).to(device)
        origin = "embedded tiny SDXL"
    base.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in base.unet.parameters())
    LOG.info("benchmark model: %s, UNet %.3fB parameters, %s/%s", origin, params / 1e9, device, dtype)
    return Pipelines(base=base, img2img=StableDiffusionXLImg2ImgPipeline(**base.components), refiner=None,
                     device=device, dtype=dtype, scheduler_config=dict(base.scheduler.config),
                     refiner_scheduler_config=None,
                     choice=ModelChoice(base=origin, refiner=None, vae=None, origin="bench", offline=True))
