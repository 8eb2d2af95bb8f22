"""Hugging Face sources: the real ``huggingface_hub`` client against a local Hub-compatible server (``endpoint=``)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from sdxl_worker.errors import LoraError
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.sources.hub import choose_files
from sdxl_worker.store.cache import LoraCache
from tests.support.factories import cache_settings
from tests.support.servers.fake_hub import FakeHub
from tests.support.servers.lora_files import lora_bytes, torch_lora_bytes

HF_SECRET = "hf_SECRETtoken123"
LORA = lora_bytes(seed=1)
OTHER = lora_bytes(seed=2)


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as running:
        running.add_repo("me/single", {"pixel.safetensors": LORA, "README.md": b"# card", "preview.png": b"png"})
        running.add_repo("me/many", {"a.safetensors": LORA, "sub/b.safetensors": OTHER, "c.safetensors": OTHER})
        running.add_repo("me/peft", {"adapter_config.json": json.dumps({"r": 4, "lora_alpha": 4}).encode(),
                                     "adapter_model.safetensors": LORA, "README.md": b"x"})
        running.add_repo("me/legacy", {"lora.bin": torch_lora_bytes(seed=3)})
        running.add_repo("me/private", {"p.safetensors": LORA}, token=HF_SECRET)
        running.add_repo("me/tagged", {"t.safetensors": OTHER}, revisions=("main", "v1"))
        running.add_repo("me/empty", {"README.md": b"nothing"})
        running.add_repo("me/page", {"x.safetensors": b"<!DOCTYPE html><html>login</html>"})
        yield running


def make_cache(tmp_path: Path, hub: FakeHub, **overrides) -> LoraCache:
    options = {"hf_endpoint": hub.endpoint, "allow_private_hosts": False, **overrides}
    return LoraCache(cache_settings(tmp_path / "cache", **options))


def test_single_lora_repo_is_fetched_into_the_cache_and_reused_without_the_network(tmp_path, hub):
    cache = make_cache(tmp_path, hub)
    before = hub.count()
    resolved = cache.resolve(LoraRequest(0, "me/single"))
    assert not resolved.cache_hit and resolved.display_name == "pixel.safetensors"
    assert resolved.path.read_bytes() == LORA and resolved.sha256 == hashlib.sha256(LORA).hexdigest()
    assert resolved.path.is_relative_to(tmp_path / "cache")
    assert hub.count("/api/models/me/single") == 1 and hub.count("/me/single/resolve/") >= 1
    assert not any(path.endswith(("README.md", "preview.png")) for _, path in hub.requests[before:])
    manifest = json.loads((resolved.path.parent / "manifest.json").read_text())
    assert manifest["source"] == "me/single" and manifest["commit"] == hub.repos["me/single"].commit
    assert manifest["etag"] == resolved.sha256
    fetched = hub.count()
    again = make_cache(tmp_path, hub).resolve(LoraRequest(0, "me/single"))
    assert again.cache_hit and again.path == resolved.path and hub.count() == fetched


def test_nothing_lands_in_the_default_hf_cache(tmp_path, hub):
    make_cache(tmp_path, hub).resolve(LoraRequest(0, "me/tagged"))
    default_cache = Path(hf_constants.HF_HUB_CACHE)
    assert not (default_cache / "models--me--tagged").exists()
    leftovers = [path.name for path in (tmp_path / "cache").iterdir() if path.name.startswith(".tmp")]
    assert leftovers == []


def test_several_candidates_are_listed_and_weight_name_picks_one(tmp_path, hub):
    cache = make_cache(tmp_path, hub)
    with pytest.raises(LoraError) as caught:
        cache.resolve(LoraRequest(3, "me/many"))
    message = str(caught.value)
    assert message.startswith("loras[3] (me/many): 'me/many' has 3 candidate LoRA files; choose one with weight_name")
    assert all(name in message for name in ("a.safetensors", "sub/b.safetensors", "c.safetensors"))
    resolved = cache.resolve(LoraRequest(0, "me/many", weight_name="sub/b.safetensors"))
    assert resolved.path.read_bytes() == OTHER and resolved.display_name == "b.safetensors"
    with pytest.raises(LoraError, match="'nope.safetensors' is not in 'me/many'; its weight files: a.safetensors"):
        cache.resolve(LoraRequest(0, "me/many", weight_name="nope.safetensors"))


def test_peft_adapter_repo_becomes_a_folder_entry(tmp_path, hub):
    resolved = make_cache(tmp_path, hub).resolve(LoraRequest(0, "me/peft"))
    assert resolved.path.is_dir() and resolved.path.name == "adapter"
    assert sorted(path.name for path in resolved.path.iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    assert json.loads((resolved.path / "adapter_config.json").read_text())["lora_alpha"] == 4
    assert resolved.sha256 == hashlib.sha256(LORA).hexdigest()
    manifest = json.loads((resolved.path.parent / "manifest.json").read_text())
    assert manifest["kind"] == "peft" and manifest["weights"] == "adapter/adapter_model.safetensors"
    assert make_cache(tmp_path, hub).resolve(LoraRequest(0, "me/peft")).cache_hit


def test_bin_file_is_taken_when_there_is_no_safetensors(tmp_path, hub):
    resolved = make_cache(tmp_path, hub).resolve(LoraRequest(0, "me/legacy"))
    assert resolved.path.name == "weights.bin" and resolved.display_name == "lora.bin"


def test_revisions_are_honoured_and_cached_separately(tmp_path, hub):
    cache = make_cache(tmp_path, hub)
    pinned = cache.resolve(LoraRequest(0, "me/tagged", revision="v1"))
    main = cache.resolve(LoraRequest(0, "me/tagged"))
    assert pinned.path != main.path and pinned.sha256 == main.sha256
    assert hub.count("/api/models/me/tagged/revision/v1") == 1
    with pytest.raises(LoraError, match="revision not found in 'me/tagged'"):
        cache.resolve(LoraRequest(0, "me/tagged", revision="v9"))


def test_private_repo_needs_hf_token_which_never_shows(tmp_path, hub, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LoraError) as caught:
        make_cache(tmp_path, hub).resolve(LoraRequest(0, "me/private"))
    assert "HF_TOKEN" in str(caught.value) and "me/private" in str(caught.value)
    with pytest.raises(LoraError) as wrong:
        make_cache(tmp_path, hub, hf_token="hf_wrong").resolve(LoraRequest(0, "me/private"))
    assert "HF_TOKEN was sent" in str(wrong.value)
    resolved = make_cache(tmp_path, hub, hf_token=HF_SECRET).resolve(LoraRequest(0, "me/private"))
    assert resolved.path.read_bytes() == LORA
    assert HF_SECRET not in caplog.text and "hf_wrong" not in caplog.text


def test_missing_repo_empty_repo_and_html_file_are_clear_errors_and_nothing_is_cached(tmp_path, hub):
    cache = make_cache(tmp_path, hub)
    cases = {"me/nothing-here": "repo 'me/nothing-here' not found", "me/empty": "has no .safetensors",
             "me/page": "HTML page"}
    for source, fragment in cases.items():
        with pytest.raises(LoraError, match=fragment):
            cache.resolve(LoraRequest(0, source))
    assert [path.name for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")] == []
    assert not any(path.name.startswith(".tmp") for path in (tmp_path / "cache").iterdir())


def test_size_limit_is_checked_from_the_listing(tmp_path, hub):
    before = hub.count("/me/single/resolve/")
    with pytest.raises(LoraError, match="over the limit of 100 bytes"):
        make_cache(tmp_path, hub, max_bytes=100).resolve(LoraRequest(0, "me/single"))
    assert hub.count("/me/single/resolve/") == before


def test_transient_hub_errors_are_retried(tmp_path, hub):
    hub.fail_resolve_gets = 2
    resolved = make_cache(tmp_path, hub).resolve(LoraRequest(0, "me/many", weight_name="c.safetensors"))
    assert resolved.path.read_bytes() == OTHER and hub.fail_resolve_gets == 0


def test_expected_sha256_is_enforced(tmp_path, hub):
    cache = make_cache(tmp_path, hub)
    with pytest.raises(LoraError, match="sha256 mismatch"):
        cache.resolve(LoraRequest(0, "me/many", weight_name="a.safetensors", sha256="0" * 64))
    good = hashlib.sha256(LORA).hexdigest()
    assert cache.resolve(LoraRequest(0, "me/many", weight_name="a.safetensors", sha256=good)).sha256 == good


def test_progress_reports_percent_and_mb(tmp_path, hub):
    messages: list[str] = []
    make_cache(tmp_path, hub).resolve(LoraRequest(2, "me/single"), messages.append)
    assert messages and messages[-1].startswith("loras[2] (me/single): downloading 100% (")
    assert messages[-1].endswith(" MB)")


@pytest.mark.parametrize("names, weight_name, expected", [
    (["a.safetensors", "README.md"], None, ("file", ["a.safetensors"], "a.safetensors")),
    (["x.bin", "y.txt"], None, ("file", ["x.bin"], "x.bin")),
    (["adapter_config.json", "adapter_model.safetensors", "other.safetensors"], None,
     ("peft", ["adapter_config.json", "adapter_model.safetensors"], "adapter_model.safetensors")),
    (["adapter_config.json", "adapter_model.safetensors"], "adapter_model.safetensors",
     ("file", ["adapter_model.safetensors"], "adapter_model.safetensors")),
    (["a.safetensors", "b.pt"], None, ("file", ["a.safetensors"], "a.safetensors")),
])
def test_choose_files(names, weight_name, expected):
    assert choose_files(names, weight_name, "o/r") == expected


def test_choose_files_refuses_non_weight_files():
    with pytest.raises(LoraError, match="not a weights file"):
        choose_files(["README.md"], "README.md", "o/r")
