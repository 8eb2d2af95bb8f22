"""Civitai sources through the cache against a local Civitai-compatible server (``tests.support.servers.fake_civitai``):
every form, one entry per version, published hashes and sizes, base models, tokens, trained words, offline hits."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from sdxl_worker.errors import LoraError
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.store.cache import LoraCache
from tests.support.factories import cache_settings
from tests.support.servers.fake_civitai import FakeCivitai
from tests.support.servers.fault_http import FaultServer
from tests.support.servers.lora_files import lora_bytes, torch_lora_bytes

LORA = lora_bytes(seed=11)
SHA = hashlib.sha256(LORA).hexdigest()
VERSION = 368189
TOKEN = "civitai-KEY-SECRET-81"
FORMS = [f"civitai:{VERSION}", f"urn:air:sdxl:lora:civitai:328553@{VERSION}",
         f"urn:air:illustrious:lora:civitai:328553@{VERSION}.safetensor",
         f"https://civitai.com/api/download/models/{VERSION}?type=Model&format=SafeTensor",
         f"https://civitai.com/models/328553/pixel-style?modelVersionId={VERSION}"]


@pytest.fixture
def server():
    with FaultServer() as running:
        yield running


@pytest.fixture
def civitai(server) -> FakeCivitai:
    return FakeCivitai(server)


def assert_nothing_cached(root: Path) -> None:
    assert [path.name for path in root.iterdir() if not path.name.startswith(".")] == []
    assert [path.name for path in root.iterdir() if path.name.startswith((".tmp", ".trash"))] == []


@pytest.mark.parametrize("first", FORMS)
def test_every_form_fetches_the_version_once_and_all_forms_share_the_entry(tmp_path, civitai, first):
    civitai.add_version(VERSION, LORA, trained_words=["pixel art", " 8-bit ", "pixel art", ""])
    cache = LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base))
    resolved = cache.resolve(LoraRequest(0, first))
    assert not resolved.cache_hit and resolved.path.read_bytes() == LORA and resolved.sha256 == SHA
    assert resolved.display_name == "pixel-style.safetensors" and resolved.trigger_words == ("pixel art", "8-bit")
    manifest = json.loads((resolved.path.parent / "manifest.json").read_text())
    assert manifest["source"] == f"civitai:{VERSION}" and manifest["sha256"] == SHA
    assert manifest["trigger_words"] == ["pixel art", "8-bit"] and manifest["base_model"] == "SDXL 1.0"
    for other in FORMS:
        again = cache.resolve(LoraRequest(1, other))
        assert again.cache_hit and again.path == resolved.path and again.trigger_words == ("pixel art", "8-bit")
    server = civitai.server
    assert server.count(civitai.api_path(VERSION)) == 1 and server.count(civitai.download_path(VERSION)) == 1
    assert server.count(civitai.storage_path(VERSION, "pixel-style.safetensors")) == 1


def test_trained_words_come_back_from_a_new_process_with_the_api_gone(tmp_path):
    with FaultServer() as server:
        civitai = FakeCivitai(server)
        civitai.add_version(VERSION, LORA, trained_words=["zzz style"])
        settings = cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)
        LoraCache(settings).resolve(LoraRequest(0, f"civitai:{VERSION}"))
    fresh = LoraCache(settings)  # the server is shut down: any request would fail
    for source in (f"urn:air:sdxl:lora:civitai:328553@{VERSION}", f"civitai:{VERSION}"):
        hit = fresh.resolve(LoraRequest(0, source))
        assert hit.cache_hit and hit.path.read_bytes() == LORA and hit.trigger_words == ("zzz style",)
    with pytest.raises(LoraError, match=r"^loras\[0\] \(civitai:5\): cannot connect to http://127\.0\.0\.1:\d+"):
        fresh.resolve(LoraRequest(0, "civitai:5"))


def test_a_download_that_does_not_match_the_published_sha256_caches_nothing(tmp_path, civitai):
    civitai.add_version(VERSION, LORA, hashes={"SHA256": "AB" * 32})
    with pytest.raises(LoraError) as caught:
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(2, f"civitai:{VERSION}"))
    message = str(caught.value)
    assert message.startswith(f"loras[2] (civitai:{VERSION}): the download does not match the sha256 Civitai "
                              f"publishes for model version {VERSION} (expected {'ab' * 32}, got {SHA})")
    assert_nothing_cached(tmp_path / "cache")


def test_a_requested_sha256_that_differs_from_the_published_one_is_refused_before_downloading(tmp_path, civitai):
    civitai.add_version(VERSION, LORA)
    with pytest.raises(LoraError, match=f"sha256 mismatch: expected {'1' * 64}, Civitai publishes {SHA}"):
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}", sha256="1" * 64))
    assert civitai.server.count(civitai.download_path(VERSION)) == 0
    ok = LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}", sha256=SHA))
    assert ok.sha256 == SHA


def test_the_size_civitai_lists_is_checked_against_the_limit_before_downloading(tmp_path, civitai):
    civitai.add_version(VERSION, LORA, sizeKB=300.5)
    with pytest.raises(LoraError, match=r"the file is 307\.7 kB by Civitai's listing, over the limit of 100\.0 kB "
                                        r"\(LORA_MAX_BYTES\)"):
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base, max_bytes=100_000)).resolve(LoraRequest(0, f"civitai:{VERSION}"))
    assert civitai.server.count(civitai.download_path(VERSION)) == 0
    assert_nothing_cached(tmp_path / "cache")


@pytest.mark.parametrize("base_model", ["SD 1.5", "Flux.1 D", "Pony V7", "SD 3.5"])
def test_base_models_outside_sdxl_are_refused_before_downloading(tmp_path, civitai, base_model):
    civitai.add_version(VERSION, LORA, base_model=base_model)
    with pytest.raises(LoraError) as caught:
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}"))
    assert f"is for the base model {base_model!r}, not SDXL" in str(caught.value)
    assert "SDXL 1.0, " in str(caught.value) and "Pony, Illustrious" in str(caught.value)
    assert civitai.server.count(civitai.download_path(VERSION)) == 0
    assert_nothing_cached(tmp_path / "cache")


@pytest.mark.parametrize("base_model", ["SDXL 1.0", "Pony", "Illustrious", "NoobAI", "SDXL Lightning"])
def test_sdxl_family_base_models_are_accepted(tmp_path, civitai, base_model):
    civitai.add_version(VERSION, LORA, base_model=base_model)
    assert LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}")).sha256 == SHA


@pytest.mark.parametrize("model_type", ["Checkpoint", "TextualInversion", "Hypernetwork"])
def test_model_types_other_than_lora_are_refused(tmp_path, civitai, model_type):
    civitai.add_version(VERSION, LORA, model_type=model_type)
    with pytest.raises(LoraError, match=f"model version {VERSION} is a {model_type}, not a LoRA"):
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}"))
    assert civitai.server.count(civitai.download_path(VERSION)) == 0


@pytest.mark.parametrize("model_type", ["LoCon", "LyCORIS", "DoRA"])
def test_locon_lycoris_and_dora_versions_are_accepted(tmp_path, civitai, model_type):
    civitai.add_version(VERSION, LORA, model_type=model_type)
    assert LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}")).sha256 == SHA


def test_the_token_goes_to_the_api_and_download_host_but_not_across_the_redirect(tmp_path, civitai, caplog):
    caplog.set_level(logging.DEBUG)
    civitai.add_version(VERSION, LORA)
    server = civitai.server
    server.routes[civitai.api_path(VERSION)].require_auth = f"Bearer {TOKEN}"
    server.routes[civitai.download_path(VERSION)].require_auth = f"Bearer {TOKEN}"
    resolved = LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base, civitai_token=TOKEN)).resolve(
        LoraRequest(0, f"urn:air:sdxl:lora:civitai:328553@{VERSION}"))
    storage = civitai.storage_path(VERSION, "pixel-style.safetensors")
    assert server.headers_for(civitai.api_path(VERSION))[0]["Authorization"] == f"Bearer {TOKEN}"
    assert server.headers_for(civitai.download_path(VERSION))[0]["Authorization"] == f"Bearer {TOKEN}"
    assert server.headers_for(storage)[0]["Host"].startswith("localhost:")
    assert "Authorization" not in server.headers_for(storage)[0]
    assert TOKEN not in caplog.text and TOKEN not in (resolved.path.parent / "manifest.json").read_text()


def test_without_a_token_a_login_only_version_names_civitai_token(tmp_path, civitai):
    civitai.add_version(VERSION, LORA)
    civitai.server.routes[civitai.api_path(VERSION)].require_auth = f"Bearer {TOKEN}"
    with pytest.raises(LoraError, match=r"access denied \(HTTP 401\) .*set CIVITAI_TOKEN to a Civitai API key"):
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}"))
    wrong = cache_settings(tmp_path / "cache", civitai_api_base=civitai.base, civitai_token="not-the-key")
    with pytest.raises(LoraError, match="CIVITAI_TOKEN was sent and refused"):
        LoraCache(wrong).resolve(LoraRequest(0, f"civitai:{VERSION}"))


def test_the_token_of_a_pasted_url_is_used_for_that_job_and_never_shown(tmp_path, civitai, caplog):
    caplog.set_level(logging.DEBUG)
    job_token = "JOB-TOKEN-SECRET-3"
    civitai.add_version(VERSION, LORA)
    civitai.server.routes[civitai.download_path(VERSION)].require_auth = f"Bearer {job_token}"
    cache = LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base))
    source = f"https://civitai.com/api/download/models/{VERSION}?type=Model&token={job_token}"
    resolved = cache.resolve(LoraRequest(0, source))
    storage = civitai.storage_path(VERSION, "pixel-style.safetensors")
    assert civitai.server.headers_for(civitai.api_path(VERSION))[0]["Authorization"] == f"Bearer {job_token}"
    assert "Authorization" not in civitai.server.headers_for(storage)[0]
    assert job_token not in caplog.text and job_token not in (resolved.path.parent / "manifest.json").read_text()
    civitai.server.route(civitai.api_path(VERSION + 1), status=403)
    with pytest.raises(LoraError) as caught:
        cache.resolve(LoraRequest(1, f"https://civitai.com/api/download/models/{VERSION + 1}?token={job_token}"))
    assert "HTTP 403" in str(caught.value) and job_token not in str(caught.value)


def test_an_unknown_version_and_a_flaky_api(tmp_path, civitai):
    cache = LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base))
    with pytest.raises(LoraError, match=r"^loras\[0\] \(civitai:999\): Civitai has no model version 999 \(HTTP 404"):
        cache.resolve(LoraRequest(0, "civitai:999"))
    civitai.add_version(VERSION, LORA)
    civitai.server.routes[civitai.api_path(VERSION)].fail_first = 2
    assert cache.resolve(LoraRequest(0, f"civitai:{VERSION}")).sha256 == SHA
    assert civitai.server.count(civitai.api_path(VERSION)) == 3


def test_an_api_base_that_is_not_civitai_is_named(tmp_path, civitai):
    civitai.server.route(civitai.api_path(VERSION), body=b"<!doctype html><html>hello</html>")
    with pytest.raises(LoraError, match="did not answer with JSON .is CIVITAI_API_BASE a Civitai site"):
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}"))


def test_the_safetensors_model_file_is_chosen_over_a_primary_pickle(tmp_path, civitai):
    pickle_file = civitai.file_entry(VERSION, torch_lora_bytes(seed=4), name="old.pt", fmt="PickleTensor")
    safe_file = civitai.file_entry(VERSION, LORA, name="new.safetensors", primary=False)
    safe_file["downloadUrl"] = civitai.server.url(civitai.storage_path(VERSION, "new.safetensors"))
    archive = {**safe_file, "type": "Training Data", "name": "data.zip", "downloadUrl": civitai.server.url("/zip")}
    civitai.add_version(VERSION, b"", files=[archive, pickle_file, safe_file])
    resolved = LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}"))
    assert resolved.path.read_bytes() == LORA and resolved.display_name == "new.safetensors"
    assert civitai.server.count("/zip") == 0


def test_a_version_without_model_files_is_refused(tmp_path, civitai):
    civitai.add_version(VERSION, b"", files=[])
    with pytest.raises(LoraError, match=f"model version {VERSION} has no model file to download"):
        LoraCache(cache_settings(tmp_path / "cache", civitai_api_base=civitai.base)).resolve(LoraRequest(0, f"civitai:{VERSION}"))


def test_the_download_url_is_checked_like_any_url(tmp_path, civitai):
    civitai.add_version(VERSION, LORA)
    strict = cache_settings(tmp_path / "cache", civitai_api_base=civitai.base, allow_private_hosts=False)
    with pytest.raises(LoraError, match=r"refused URL http://127\.0\.0\.1:\d+/api/download/models/368189: 127\.0\.0\.1 "
                                        r"is a loopback address"):
        LoraCache(strict).resolve(LoraRequest(0, f"civitai:{VERSION}"))
    assert civitai.server.count(civitai.api_path(VERSION)) == 1  # the configured API base itself is trusted
    assert civitai.server.count(civitai.download_path(VERSION)) == 0
