"""The img2img source of a job (``image_url``): a ``data:image/...;base64,`` URI or an http(s) URL.

URLs are untrusted like LoRA URLs: the same scheme and address rules, size limit, timeouts and streaming as LoRA
downloads (``sdxl_worker.net.download``). Any problem is an ``InputError`` naming ``image_url``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdxl_worker.errors import InputError, LoraError
from sdxl_worker.net.download import download_url
from sdxl_worker.settings import CacheSettings

MAX_IMAGE_PIXELS = 4096 * 4096
_DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(?P<payload>.*)$", re.DOTALL)


def _decode_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise InputError(f"image_url: image of {image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise InputError(f"image_url: not a readable image ({error.__class__.__name__})") from None


def _round_to_multiple_of_8(image: Image.Image) -> Image.Image:
    width, height = max(64, image.width // 8 * 8), max(64, image.height // 8 * 8)
    return image if (width, height) == image.size else image.resize((width, height), Image.LANCZOS)


def load_init_image(image_url: str, settings: CacheSettings) -> Image.Image:
    """Decode or download the image, as RGB with sides rounded down to multiples of 8 (at least 64)."""
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
