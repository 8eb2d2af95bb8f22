"""Images uploaded with the runpod SDK's rp_upload to a real S3-compatible server (moto, server mode) on 127.0.0.1."""

from __future__ import annotations

import base64
import os

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from sdxl_worker.settings import UploadSettings
from tests.support.factories import cache_settings, make_worker
from tests.support.worker_env import free_port, png_from_data_uri, run_through_sdk, small_job

BUCKET = "sdxl-images"


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test-key", aws_secret_access_key="test-secret",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def bucket_keys(endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test-key",
                          aws_secret_access_key="test-secret", region_name="us-east-1")
    return [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def uploading_worker(tmp_path):
    """A worker whose upload settings come from the environment as the test has set it (``rp_upload`` reads the
    same variables)."""
    return make_worker(cache_settings(tmp_path / "cache"), upload=UploadSettings.from_env(os.environ))


def test_images_are_uploaded_and_urls_returned(worker_handler, s3_endpoint, monkeypatch, tmp_path):
    reference = run_through_sdk(worker_handler, small_job(seed=31, num_images=2))["output"]["images"]
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    output = run_through_sdk(uploading_worker(tmp_path).run, small_job(seed=31, num_images=2),
                             job_id="upload-job")["output"]
    assert output["image_url"] == output["images"][0]
    assert all(url.startswith(s3_endpoint + f"/{BUCKET}/upload-job/") for url in output["images"])
    downloaded = [requests.get(url, timeout=10).content for url in output["images"]]
    assert downloaded == [png_from_data_uri(uri) for uri in reference]
    assert sum(key.startswith("upload-job/") for key in bucket_keys(s3_endpoint)) == 2


def test_uploads_keep_the_image_format_asked(worker_handler, s3_endpoint, monkeypatch, tmp_path):
    reference = run_through_sdk(worker_handler, small_job(seed=32, image_format="webp", image_quality=70))
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    output = run_through_sdk(uploading_worker(tmp_path).run, small_job(seed=32, image_format="webp", image_quality=70),
                             job_id="webp-job")["output"]
    (url,) = output["images"]
    response = requests.get(url, timeout=10)
    assert response.headers["Content-Type"] == "image/webp"
    prefix = "data:image/webp;base64,"
    assert response.content == base64.b64decode(reference["output"]["image_url"][len(prefix):])
    assert any(key.startswith("webp-job/") and key.endswith(".webp") for key in bucket_keys(s3_endpoint))


def test_incomplete_bucket_settings_are_an_error_not_a_silent_local_save(worker_handler, s3_endpoint, monkeypatch,
                                                                          tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "test-key")
    monkeypatch.delenv("BUCKET_SECRET_ACCESS_KEY", raising=False)
    before = bucket_keys(s3_endpoint)
    result = run_through_sdk(uploading_worker(tmp_path).run, small_job(), job_id="no-secret")
    assert "BUCKET_SECRET_ACCESS_KEY" in result["error"]
    assert "generate" not in str(result.get("output", ""))
    assert bucket_keys(s3_endpoint) == before
    assert not (tmp_path / "simulated_uploaded").exists()
