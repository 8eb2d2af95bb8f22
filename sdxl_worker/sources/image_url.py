"""The img2img source of a job (``image_url``): a ``data:image/...;base64,`` URI or an http(s) URL.

URLs are untrusted like LoRA URLs: the same scheme and address rules, size limit, timeouts and streaming as LoRA
downloads (``sdxl_worker.net.download``). Any problem is an ``InputError`` naming ``image_url``.

The image becomes 8-bit RGB the way the pipeline needs it:

- transparency (RGBA, LA, a palette or RGB with a transparent colour) is composited on white, as A1111's img2img
  does (``img2img_background_color``, white by default): img2img has no mask, so alpha cannot be kept;
- 16-bit images are scaled to 8 bits (``value / 257``, so 65535 is 255), not clipped; float images must hold values
  within 0..1 and are scaled by 255; anything else is refused, never clipped silently;
- the size follows txt2img's rules for ``width`` and ``height``: each side within 64..2048 (checked from the header,
  before decoding), rounded down to a multiple of 8 (resampled, at most 7 pixels per side).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdxl_worker.errors import InputError, LoraError
from sdxl_worker.net.download import download_url
from sdxl_worker.request.schema import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from sdxl_worker.settings import CacheSettings

BACKGROUND = (255, 255, 255)
_DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(?P<payload>.*)$", re.DOTALL)
# What Pillow raises on a broken file: truncated data or chunks (OSError, ValueError, SyntaxError, struct.error,
# EOFError), text or ICC chunks that inflate past its limits (ValueError), decompression bombs.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _check_size(image: Image.Image) -> None:
    width, height = image.size
    if not (MIN_IMAGE_SIDE <= width <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= height <= MAX_IMAGE_SIDE):
        raise InputError(f"image_url: the image is {width}x{height}; img2img runs at the image's size, so each side "
                         f"must be within {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} as for width and height: resize it")


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or float grey image as mode ``L``, scaled (never clipped); other modes unchanged."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"image_url: a {image.mode} image must hold values within 0..65535, found "
                             f"{values.min()}..{values.max()}")
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise InputError("image_url: a floating-point image must hold finite values within 0..1, found "
                             f"{np.nanmin(values):g}..{np.nanmax(values):g}")
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), "L")
    return image


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on ``BACKGROUND``."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _decode_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        _check_size(image)
        image.load()
        return _flatten(_eight_bit(image))
    except _DECODE_ERRORS as error:
        raise InputError(f"image_url: not a readable image ({error.__class__.__name__}: {error})") from None


def _round_to_multiple_of_8(image: Image.Image) -> Image.Image:
    width, height = image.width // 8 * 8, image.height // 8 * 8
    return image if (width, height) == image.size else image.resize((width, height), Image.LANCZOS)


def load_init_image(image_url: str, settings: CacheSettings) -> Image.Image:
    """Decode or download the image: 8-bit RGB, transparency on white, sides within 64..2048 rounded down to
    multiples of 8 (``InputError`` naming ``image_url`` otherwise)."""
    match = _DATA_URI.match(image_url)
    if match:
        try:
            data = base64.b64decode(match.group("payload"), validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image_url: the data URI is not valid base64") from None
        return _round_to_multiple_of_8(_decode_image(data))
    with tempfile.TemporaryDirectory(prefix="sdxl-init-image-") as folder:
        target = Path(folder) / "image"
        try:
            download_url(image_url, target, settings)
        except LoraError as error:
            raise InputError(f"image_url: {error}") from None
        return _round_to_multiple_of_8(_decode_image(target.read_bytes()))
