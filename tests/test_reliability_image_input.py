"""``image_url`` files that break decoders or lose information, and img2img jobs that would run no step, through the
real worker: each gets a clear error naming the field, or the image the pipeline sees is the correct 8-bit RGB one;
the worker keeps serving.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdxl_worker.sources.image_url import load_init_image
from tests.support.factories import cache_settings
from tests.support.worker_env import images_of, run_through_sdk, small_job


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def tiff_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk_after_ihdr(png: bytes, kind: bytes, data: bytes) -> bytes:
    return png[:33] + chunk(kind, data) + png[33:]


BOMB = zlib.compress(b"\0" * (PngImagePlugin.MAX_TEXT_CHUNK + 10))
PLAIN_PNG = png_of(Image.new("RGB", (64, 64), (10, 20, 30)))
BROKEN = {
    "zTXt-bomb": with_chunk_after_ihdr(PLAIN_PNG, b"zTXt", b"k\0\0" + BOMB),
    "iTXt-bomb": with_chunk_after_ihdr(PLAIN_PNG, b"iTXt", b"k\0\1\0\0\0" + BOMB),
    "iCCP-bomb": with_chunk_after_ihdr(PLAIN_PNG, b"iCCP", b"icc\0\0" + BOMB),
    "truncated-IHDR": b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", b"\0\0\0\x40\0") + chunk(b"IEND", b""),
    "cut-short": PLAIN_PNG[:60],
}


@pytest.fixture(scope="module")
def handler(make_handler, tmp_path_factory):
    return make_handler(cache_settings(tmp_path_factory.mktemp("image-cache")))


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return cache_settings(tmp_path_factory.mktemp("image-settings"))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_pngs_are_an_image_url_error_not_an_internal_error(handler, name):
    result = run_through_sdk(handler, small_job(image_url=data_uri(BROKEN[name]), strength=0.5))
    assert result["error"].startswith("image_url: not a readable image ("), result
    assert "Internal error" not in result["error"]
    assert "images" in run_through_sdk(handler, small_job())["output"]


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(settings):
    values = np.array([[0, 257, 32896, 65535] * 16] * 64, dtype=np.uint16)
    image = load_init_image(data_uri(png_of(Image.fromarray(values))), settings)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.asarray(image)[0, :4, 0].tolist() == [0, 1, 128, 255]


def test_float_images_in_0_1_are_scaled_and_others_refused(settings):
    values = np.array([[0.0, 0.5, 1.0, 0.25] * 16] * 64, dtype=np.float32)
    image = load_init_image(data_uri(tiff_of(Image.fromarray(values))), settings)
    assert np.asarray(image)[0, :4, 0].tolist() == [0, 128, 255, 64]
    with pytest.raises(Exception, match=r"image_url: a floating-point image must hold finite values within 0..1, "
                                        r"found 0..3"):
        load_init_image(data_uri(tiff_of(Image.fromarray(values * 3))), settings)


def test_transparency_is_composited_on_white(settings):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255   # right half opaque red-ish, left half fully transparent
    image = np.asarray(load_init_image(data_uri(png_of(Image.fromarray(rgba, "RGBA"))), settings))
    assert image[0, 0].tolist() == [255, 255, 255] and image[0, 40].tolist() == [200, 0, 0]
    half = rgba.copy()
    half[..., 3] = 128
    blended = np.asarray(load_init_image(data_uri(png_of(Image.fromarray(half, "RGBA"))), settings))
    assert blended[0, 0].tolist() == [227, 127, 127]  # 200 * 128/255 + 255 * 127/255


@pytest.mark.parametrize("size", [(2056, 64), (64, 4096), (56, 64), (64, 8)])
def test_image_sizes_follow_the_txt2img_rules(handler, size):
    result = run_through_sdk(handler, small_job(image_url=data_uri(png_of(Image.new("RGB", size))), strength=0.5))
    assert result["error"] == (f"image_url: the image is {size[0]}x{size[1]}; img2img runs at the image's size, so "
                               "each side must be within 64..2048 as for width and height: resize it")


def test_sides_are_rounded_down_to_multiples_of_8(settings):
    assert load_init_image(data_uri(png_of(Image.new("RGB", (2048, 71)))), settings).size == (2048, 64)


def test_img2img_that_would_run_no_step_is_refused_naming_the_fix(handler):
    source = data_uri(PLAIN_PNG)
    result = run_through_sdk(handler, small_job(image_url=source, num_inference_steps=2))
    assert result["error"] == ("Invalid input: strength: img2img of image_url at strength 0.3 with "
                               "num_inference_steps 2 runs no denoising step (int(2 * 0.3) = 0); raise "
                               "num_inference_steps to at least 4 or strength to at least 0.5")
    assert len(images_of(run_through_sdk(handler, small_job(image_url=source, num_inference_steps=4)))) == 1
