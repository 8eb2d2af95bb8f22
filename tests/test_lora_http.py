"""``download_url`` against a real local HTTP server: streaming, redirects, retries, limits, tokens, timeouts."""

from __future__ import annotations

import hashlib
import logging
import time

import pytest

from sdxl_worker.errors import LoraError
from sdxl_worker.net.download import auth_header, disposition_filename, download_url
from sdxl_worker.settings import CacheSettings
from tests.support.factories import cache_settings
from tests.support.servers.fault_http import FaultServer

BODY = bytes(range(256)) * 4096 * 3  # 3 MiB
TOKEN = "civitai-SECRET-7d1f"


@pytest.fixture
def server():
    with FaultServer() as running:
        yield running


@pytest.fixture
def settings(tmp_path) -> CacheSettings:
    return cache_settings(tmp_path / "cache", connect_timeout_s=2, read_timeout_s=2,
                          civitai_hosts=("civitai.com", "127.0.0.1"))


def test_streams_to_disk_with_hash_size_and_progress(server, settings, tmp_path):
    server.route("/a.safetensors", body=BODY, chunk_size=100_000, headers={"ETag": '"v1"'})
    seen: list[tuple[int, int | None]] = []
    info = download_url(server.url("/a.safetensors"), tmp_path / "out", settings, lambda *pair: seen.append(pair))
    assert (tmp_path / "out").read_bytes() == BODY
    assert info.sha256 == hashlib.sha256(BODY).hexdigest() and info.size == len(BODY) and info.etag == '"v1"'
    assert seen[-1] == (len(BODY), len(BODY)) and len(seen) >= 2
    assert all(done <= len(BODY) for done, _ in seen)


def test_redirects_are_followed_and_content_disposition_kept(server, settings, tmp_path):
    server.route("/api/download/models/42", redirect_to="/hop", redirect_status=307)
    server.route("/hop", redirect_to=server.url("/cdn/blob"), redirect_status=301)
    server.route("/cdn/blob", body=BODY, headers={
        "Content-Disposition": "attachment; filename*=UTF-8''Pixel%20Art%20XL.safetensors"})
    info = download_url(server.url("/api/download/models/42"), tmp_path / "out", settings)
    assert info.filename == "Pixel Art XL.safetensors"
    assert [server.count(path) for path in ("/api/download/models/42", "/hop", "/cdn/blob")] == [1, 1, 1]
    assert info.final_url.endswith("/cdn/blob")


def test_too_many_redirects(server, settings, tmp_path):
    server.route("/loop", redirect_to="/loop")
    with pytest.raises(LoraError, match="more than 10 redirects"):
        download_url(server.url("/loop"), tmp_path / "out", settings)
    assert server.count("/loop") == 11


def test_429_with_retry_after_is_honoured(server, settings, tmp_path):
    server.route("/busy", body=BODY, fail_first=1, fail_status=429, retry_after="1")
    start = time.monotonic()
    download_url(server.url("/busy"), tmp_path / "out", settings)
    assert time.monotonic() - start >= 0.95
    assert server.count("/busy") == 2


def test_retry_after_is_capped(server, settings, tmp_path):
    capped = CacheSettings(**{**settings.__dict__, "retry_wait_max_s": 0.2})
    server.route("/slowdown", body=BODY, fail_first=1, fail_status=503, retry_after="3600")
    start = time.monotonic()
    download_url(server.url("/slowdown"), tmp_path / "out", capped)
    assert time.monotonic() - start < 2


def test_500_then_success_with_backoff(server, settings, tmp_path):
    server.route("/flaky", body=BODY, fail_first=2, fail_status=500)
    download_url(server.url("/flaky"), tmp_path / "out", settings)
    assert (tmp_path / "out").read_bytes() == BODY and server.count("/flaky") == 3


def test_gives_up_after_the_configured_retries(server, settings, tmp_path):
    few = CacheSettings(**{**settings.__dict__, "download_retries": 2})
    server.route("/down", fail_first=100, fail_status=502)
    with pytest.raises(LoraError, match=r"HTTP 502 .*gave up after 3 attempts"):
        download_url(server.url("/down"), tmp_path / "out", few)
    assert server.count("/down") == 3


def test_truncated_body_is_retried_from_scratch(server, settings, tmp_path):
    server.route("/short", body=BODY, truncate_at=300_000, truncate_first=1)
    info = download_url(server.url("/short"), tmp_path / "out", settings)
    assert (tmp_path / "out").read_bytes() == BODY and info.size == len(BODY)
    assert server.count("/short") == 2


def test_always_truncated_body_fails(server, settings, tmp_path):
    few = CacheSettings(**{**settings.__dict__, "download_retries": 1})
    server.route("/short", body=BODY, truncate_at=1000)
    with pytest.raises(LoraError, match="gave up after 2 attempts"):
        download_url(server.url("/short"), tmp_path / "out", few)


@pytest.mark.parametrize("status, fragment", [(404, "not found (HTTP 404)"), (410, "not found (HTTP 410)"),
                                              (400, "HTTP 400")])
def test_client_errors_are_not_retried(server, settings, tmp_path, status, fragment):
    server.route("/x", status=status, body=b"no")
    with pytest.raises(LoraError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        download_url(server.url("/x"), tmp_path / "out", settings)
    assert server.count("/x") == 1


def test_size_limit_from_content_length_before_the_body(server, settings, tmp_path):
    small = CacheSettings(**{**settings.__dict__, "max_bytes": 1000})
    server.route("/big", body=BODY, chunk_delay_s=0.5, chunk_size=1000)
    start = time.monotonic()
    with pytest.raises(LoraError, match="over the limit of 1.0 kB .LORA_MAX_BYTES."):
        download_url(server.url("/big"), tmp_path / "out", small)
    assert time.monotonic() - start < 1.5


def test_size_limit_while_streaming_without_content_length(server, settings, tmp_path):
    small = CacheSettings(**{**settings.__dict__, "max_bytes": 100_000})
    server.route("/nolength", body=BODY, send_length=False)
    with pytest.raises(LoraError, match="passed .* over the limit"):
        download_url(server.url("/nolength"), tmp_path / "out", small)


def test_body_without_content_length_downloads(server, settings, tmp_path):
    server.route("/nolength", body=BODY, send_length=False)
    assert download_url(server.url("/nolength"), tmp_path / "out", settings).size == len(BODY)


def test_read_timeout_is_an_error_after_retries(server, settings, tmp_path):
    quick = CacheSettings(**{**settings.__dict__, "read_timeout_s": 0.3, "download_retries": 1})
    server.route("/stall", body=BODY, delay_s=1.0)
    with pytest.raises(LoraError, match="timed out"):
        download_url(server.url("/stall"), tmp_path / "out", quick)
    assert server.count("/stall") == 2


def test_civitai_token_goes_to_civitai_hosts_only_and_never_across_a_redirect(server, settings, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with_token = CacheSettings(**{**settings.__dict__, "civitai_token": TOKEN})
    server.route("/api/download/models/1", redirect_to=server.url("/cdn/file", host="localhost"),
                 require_auth=f"Bearer {TOKEN}")
    server.route("/cdn/file", body=BODY)
    download_url(server.url("/api/download/models/1"), tmp_path / "out", with_token)
    assert server.headers_for("/api/download/models/1")[0]["Authorization"] == f"Bearer {TOKEN}"
    assert "Authorization" not in server.headers_for("/cdn/file")[0]
    assert TOKEN not in caplog.text


def test_token_host_matching():
    settings = CacheSettings(cache_dir=None, civitai_token="c", hf_token="h")  # type: ignore[arg-type]
    assert auth_header("https://civitai.com/api/download/models/1", settings) == {"Authorization": "Bearer c"}
    assert auth_header("https://www.civitai.com/x", settings) == {"Authorization": "Bearer c"}
    assert auth_header("https://huggingface.co/o/r/resolve/main/x", settings) == {"Authorization": "Bearer h"}
    for url in ("https://evilcivitai.com/x", "https://civitai.com.evil.org/x", "https://example.com/civitai.com"):
        assert auth_header(url, settings) == {}


def test_401_names_the_token_variable_without_its_value(server, settings, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server.route("/api/download/models/9", require_auth="Bearer right-one")
    with pytest.raises(LoraError) as without:
        download_url(server.url("/api/download/models/9"), tmp_path / "out", settings)
    assert "HTTP 401" in str(without.value) and "set CIVITAI_TOKEN" in str(without.value)
    wrong = CacheSettings(**{**settings.__dict__, "civitai_token": TOKEN})
    with pytest.raises(LoraError) as refused:
        download_url(server.url("/api/download/models/9?token=QUERYSECRET"), tmp_path / "out", wrong)
    assert "CIVITAI_TOKEN was sent and refused" in str(refused.value)
    for text in (str(refused.value), caplog.text):
        assert TOKEN not in text and "QUERYSECRET" not in text


def test_messages_never_show_query_strings(server, settings, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server.route("/gone", fail_first=1, fail_status=503)
    server.route("/gone2", status=404)
    download_url(server.url("/gone?sig=QSECRET"), tmp_path / "out", settings)
    with pytest.raises(LoraError) as caught:
        download_url(server.url("/gone2?token=QSECRET"), tmp_path / "out", settings)
    assert "QSECRET" not in str(caught.value) and "QSECRET" not in caplog.text
    assert "/gone2?…" in str(caught.value)


@pytest.mark.parametrize("header, name", [
    ('attachment; filename="lora.safetensors"', "lora.safetensors"),
    ("attachment; filename*=UTF-8''na%C3%AFve%20style.safetensors", "naïve style.safetensors"),
    ('attachment; filename="../../etc/passwd"', "passwd"),
    ('attachment; filename="C:\\evil\\x.pt"', "x.pt"),
    ("attachment", None), (None, None), ('attachment; filename=".."', None),
])
def test_content_disposition_file_name(header, name):
    assert disposition_filename(header) == name


def test_403_from_the_hf_host_names_hf_token(server, settings, tmp_path):
    hf_like = CacheSettings(**{**settings.__dict__, "hf_endpoint": server.url(""), "civitai_hosts": ()})
    server.route("/o/r/resolve/main/x.safetensors", status=403)
    with pytest.raises(LoraError, match=r"access denied \(HTTP 403\) .*set HF_TOKEN"):
        download_url(server.url("/o/r/resolve/main/x.safetensors"), tmp_path / "out", hf_like)
