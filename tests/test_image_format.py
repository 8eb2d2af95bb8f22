"""``image_format`` and ``image_quality``: PNG by default (today's bytes), JPEG and WebP data URIs at a quality."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.support.factories import cache_settings, make_worker
from tests.support.worker_env import error_of, output_of, small_job


@pytest.fixture(scope="module")
def worker(pipes, tmp_path_factory):
    return make_worker(cache_settings(tmp_path_factory.mktemp("format-cache")))


def _decoded(uri: str, image_format: str) -> tuple[bytes, Image.Image]:
    prefix = f"data:image/{image_format};base64,"
    assert uri.startswith(prefix), uri[:40]
    data = base64.b64decode(uri[len(prefix):])
    return data, Image.open(io.BytesIO(data))


def test_png_is_the_default_and_gives_todays_bytes(worker):
    default = output_of(worker, small_job(seed=3))["images"]
    assert output_of(worker, small_job(seed=3, image_format="png"))["images"] == default
    assert _decoded(default[0], "png")[1].format == "PNG"


@pytest.mark.parametrize(("image_format", "pil_name"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats_are_encoded_at_the_quality_asked(worker, image_format, pil_name):
    low, high = (output_of(worker, small_job(seed=3, image_format=image_format, image_quality=quality))["images"][0]
                 for quality in (10, 95))
    (low_bytes, low_image), (high_bytes, high_image) = _decoded(low, image_format), _decoded(high, image_format)
    assert low_image.format == high_image.format == pil_name and low_image.size == (64, 64)
    assert len(low_bytes) < len(high_bytes)
    default = output_of(worker, small_job(seed=3, image_format=image_format))["images"][0]
    assert _decoded(default, image_format)[0] != high_bytes  # the default quality is 90, not 95


def test_bad_formats_and_qualities_are_errors_naming_the_field(worker):
    assert "image_format: must be one of png, jpeg, webp, got 'gif'" in error_of(worker, small_job(image_format="gif"))
    assert "image_quality: must be an integer within 1..100" in error_of(
        worker, small_job(image_format="jpeg", image_quality=0))
    assert "image_quality: applies to jpeg and webp only" in error_of(worker, small_job(image_quality=80))
    assert output_of(worker, small_job())["images"]
