"""Step 7 of a job (encode): images (PNG, or JPEG/WebP at ``image_quality``) as data URIs, or uploaded with the
runpod SDK when a bucket is set.

Upload is on when ``BUCKET_ENDPOINT_URL`` is set; ``BUCKET_ACCESS_KEY_ID`` and ``BUCKET_SECRET_ACCESS_KEY`` must
then be set too (the SDK would otherwise save to a local folder and return a local path, silently).
``BUCKET_NAME`` picks the bucket (the SDK's default is the month, ``MM-YY``). The variables are read once by
``sdxl_worker.settings`` (``UploadSettings``); ``rp_upload`` reads the credentials from the environment itself.
"""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

from PIL import Image
from runpod.serverless.utils import rp_upload

from sdxl_worker.errors import JobError
from sdxl_worker.settings import UploadSettings

DEFAULT_QUALITY = 90


def upload_enabled(settings: UploadSettings) -> bool:
    """True when images go to a bucket; raises ``JobError`` when the bucket settings are incomplete."""
    if not settings.endpoint_url:
        return False
    missing = settings.missing
    if missing:
        raise JobError(f"BUCKET_ENDPOINT_URL is set but {', '.join(missing)} is not: images cannot be uploaded")
    return True


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (deterministic for identical pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_bytes(image: Image.Image, image_format: str = "png", quality: int | None = None) -> bytes:
    """The image as ``png`` (lossless, ``png_bytes``), ``jpeg`` or ``webp`` bytes at ``quality`` (1..100)."""
    if image_format == "png":
        return png_bytes(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format.upper(), quality=quality or DEFAULT_QUALITY)
    return buffer.getvalue()


def encode_images(images: list[Image.Image], job_id: str, settings: UploadSettings, image_format: str = "png",
                  quality: int | None = None) -> list[str]:
    """Data URIs, or presigned URLs of the uploaded files when ``upload_enabled(settings)``, in ``image_format``."""
    if not upload_enabled(settings):
        return [f"data:image/{image_format};base64," + base64.b64encode(image_bytes(image, image_format, quality))
                .decode("ascii") for image in images]
    urls = []
    with tempfile.TemporaryDirectory(prefix="sdxl-upload-") as folder:
        for index, image in enumerate(images):
            path = Path(folder) / f"{index}.{image_format}"
            path.write_bytes(image_bytes(image, image_format, quality))
            urls.append(rp_upload.upload_image(job_id, str(path), bucket_name=settings.bucket_name))
    return urls
