"""What a job may make the worker fetch: schemes, addresses in every spelling, redirects, the real connected peer,
and names inside the cache folder."""

from __future__ import annotations

import ipaddress
import os

import pytest
import requests

from sdxl_worker.errors import LoraError
from sdxl_worker.net.download import download_url
from sdxl_worker.net.url_safety import (RefusedAddress, check_url, guarded_session, literal_ip, refusal_reason,
                                        resolve_in_cache)
from sdxl_worker.settings import CacheSettings
from tests.support.servers.fault_http import FaultServer


@pytest.fixture
def server():
    with FaultServer() as running:
        yield running


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.safetensors", "gopher://x/",
                                 "data:text/plain,hi", "javascript:alert(1)", "http:///nohost"])
def test_only_http_and_https_with_a_host(url):
    with pytest.raises(LoraError, match="refused URL"):
        check_url(url, allow_private=True)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
    "http://127.1/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://10.0.0.5/", "http://192.168.1.1/",
    "http://172.16.0.1/", "http://169.254.1.1/", "http://0.0.0.0/", "http://224.0.0.1/", "http://100.64.0.1/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://240.0.0.1/", "http://[2002:7f00:1::]/",
])
def test_non_public_addresses_are_refused_in_every_spelling(url):
    with pytest.raises(LoraError, match="LORA_ALLOW_PRIVATE_HOSTS"):
        check_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                                 "http://2852039166/"])
def test_cloud_metadata_is_refused_even_when_private_hosts_are_allowed(url):
    with pytest.raises(LoraError, match="metadata"):
        check_url(url, allow_private=True)


def test_public_literal_addresses_and_allowed_private_ones_pass():
    check_url("https://8.8.8.8/x.safetensors", allow_private=False)
    check_url("http://127.0.0.1:8080/x", allow_private=True)
    check_url("http://localhost/x", allow_private=True)


@pytest.mark.parametrize("host, address", [("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
                                           ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("[::1]", "::1"),
                                           ("example.com", None)])
def test_literal_ip_forms(host, address):
    parsed = literal_ip(host)
    assert (str(parsed) if parsed else None) == address


def test_refusal_reasons_name_the_kind_of_address():
    assert refusal_reason(ipaddress.ip_address("127.0.0.1"), False) == "a loopback address"
    assert refusal_reason(ipaddress.ip_address("93.184.216.34"), False) is None


def test_unresolvable_host_is_an_error():
    with pytest.raises(LoraError, match="cannot resolve"):
        check_url("http://no-such-host.invalid/x", allow_private=False)


def test_guarded_session_refuses_the_connected_peer_itself(server):
    """The rebinding defence: whatever DNS said before, the address actually reached is checked."""
    server.route("/x", body=b"secret")
    with guarded_session(allow_private=False) as session, pytest.raises(RefusedAddress, match="loopback"):
        session.get(server.url("/x"), timeout=5)
    assert server.count("/x") == 0
    with guarded_session(allow_private=True) as session:
        assert session.get(server.url("/x"), timeout=5).content == b"secret"


def test_guarded_session_ignores_proxy_environment(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    server.route("/x", body=b"direct")
    with guarded_session(allow_private=True) as session:
        assert session.get(server.url("/x"), timeout=5).content == b"direct"


def test_each_redirect_hop_is_checked(server, tmp_path):
    settings = CacheSettings(cache_dir=tmp_path, allow_private_hosts=True, retry_backoff_s=0.01)
    server.route("/to-metadata", redirect_to="http://169.254.169.254/latest/meta-data/")
    server.route("/to-file", redirect_to="file:///etc/passwd")
    for path in ("/to-metadata", "/to-file"):
        with pytest.raises(LoraError, match="refused URL"):
            download_url(server.url(path), tmp_path / "out", settings)
        assert server.count(path) == 1


def test_a_private_first_hop_is_refused_before_any_request(server, tmp_path):
    settings = CacheSettings(cache_dir=tmp_path, allow_private_hosts=False)
    with pytest.raises(LoraError, match="loopback"):
        download_url(server.url("/anything"), tmp_path / "out", settings)
    assert server.count("/anything") == 0


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/b.safetensors", "a\\b", "x\0y",
                                  "..", ".", ".locks", "", "n" * 300])
def test_unsafe_cache_names_are_refused(tmp_path, name):
    with pytest.raises(LoraError):
        resolve_in_cache(tmp_path, name)


def test_symlinks_leading_out_of_the_cache_are_refused(tmp_path):
    root, outside = tmp_path / "cache", tmp_path / "outside.safetensors"
    root.mkdir()
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.safetensors")
    os.symlink(tmp_path, root / "folder")
    (root / "inner.safetensors").write_bytes(b"x")
    os.symlink(root / "inner.safetensors", root / "alias.safetensors")
    for name in ("link.safetensors", "folder"):
        with pytest.raises(LoraError, match="outside"):
            resolve_in_cache(root, name)
    assert resolve_in_cache(root, "alias.safetensors") == (root / "inner.safetensors").resolve()
    assert resolve_in_cache(root, "missing.safetensors") == root.resolve() / "missing.safetensors"


def test_requests_exceptions_do_not_hide_the_refusal(server):
    """A refused peer is not turned into a retriable ConnectionError by urllib3 or requests."""
    with guarded_session(allow_private=False) as session, pytest.raises(RefusedAddress) as caught:
        session.get(server.url("/y"), timeout=5)
    assert not isinstance(caught.value, requests.RequestException)
