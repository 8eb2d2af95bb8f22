"""Writes the embedded tiny SDXL: a real diffusers-format folder with random weights from a fixed seed.

The architecture and tokenizers come from ``sdxl_worker/generation/assets/tiny-sdxl`` (copied from the shared configs);
only the weights are generated here. The result loads through ``StableDiffusionXLPipeline.from_pretrained``
exactly like a real SDXL checkpoint, so the tests exercise the production code path.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "tiny-sdxl"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TINY_DIR = PROJECT_ROOT / "models" / "tiny-sdxl"
WEIGHT_SEED = 20261122
STAMP_FILE = ".tiny-sdxl-stamp"


def _assets_fingerprint() -> str:
    """A hash of every config and tokenizer file plus the seed: the folder is rewritten when it changes."""
    digest = hashlib.sha256(str(WEIGHT_SEED).encode())
    for path in sorted(ASSETS_DIR.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(ASSETS_DIR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _build_pipeline(config_dir: Path, seed: int):
    """Instantiate every component from its config with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(config_dir / "scheduler"))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(config_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(config_dir / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
    )


def ensure_tiny_model(target: Path = DEFAULT_TINY_DIR) -> Path:
    """Write the tiny SDXL into ``target`` unless an up-to-date copy is there; return ``target``.

    The folder is built in a temporary sibling and renamed into place, so a crash never leaves a half model.
    """
    fingerprint = _assets_fingerprint()
    stamp = target / STAMP_FILE
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return target
    LOG.info("Writing the embedded tiny SDXL (seed %d) to %s", WEIGHT_SEED, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-sdxl-", dir=target.parent))
    try:
        _build_pipeline(ASSETS_DIR, WEIGHT_SEED).save_pretrained(staging, safe_serialization=True)
        (staging / STAMP_FILE).write_text(fingerprint)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    LOG.info("Tiny SDXL ready at %s", ensure_tiny_model())
