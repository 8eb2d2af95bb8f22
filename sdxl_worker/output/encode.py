"""Last step of a job: encode images as PNG data URIs, or upload them with the runpod SDK when a bucket is set.

Upload is on when ``BUCKET_ENDPOINT_URL`` is set; ``BUCKET_ACCESS_KEY_ID`` and ``BUCKET_SECRET_ACCESS_KEY`` must
then be set too (the SDK would otherwise save to a local folder and return a local path, silently).
``BUCKET_NAME`` picks the bucket (the SDK's default is the month, ``MM-YY``).
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path

from PIL import Image
from runpod.serverless.utils import rp_upload

from sdxl_worker.errors import JobError

_BUCKET_VARS = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")


def upload_enabled() -> bool:
    """True when images go to a bucket; raises ``JobError`` when the bucket settings are incomplete."""
    if not os.environ.get("BUCKET_ENDPOINT_URL"):
        return False
    missing = [name for name in _BUCKET_VARS if not os.environ.get(name)]
    if missing:
        raise JobError(f"BUCKET_ENDPOINT_URL is set but {', '.join(missing)} is not: images cannot be uploaded")
    return True


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes (deterministic for identical pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_images(images: list[Image.Image], job_id: str) -> list[str]:
    """Data URIs, or presigned URLs of the uploaded PNGs when ``upload_enabled()``."""
    if not upload_enabled():
        return ["data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii") for image in images]
    urls = []
    with tempfile.TemporaryDirectory(prefix="sdxl-upload-") as folder:
        for index, image in enumerate(images):
            path = Path(folder) / f"{index}.png"
            path.write_bytes(png_bytes(image))
            urls.append(rp_upload.upload_image(job_id, str(path), bucket_name=os.environ.get("BUCKET_NAME") or None))
    return urls
