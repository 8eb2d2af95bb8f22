"""``PINNED_LORAS``: pinned entries survive eviction pressure on disk (``LORA_CACHE_MAX_GB``) and in the RAM LRU
while unpinned least recently used ones go; the list is parsed like a job's ``loras`` and a bad item stops the start."""

from __future__ import annotations

import logging
import time

import pytest

from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import CacheSettings
from sdxl_worker.store.cache import LoraCache
from sdxl_worker.weights.load import load_lora
from sdxl_worker.weights.ram_cache import LoraRamCache
from tests.support.factories import cache_settings
from tests.support.servers.fake_civitai import FakeCivitai
from tests.support.servers.fault_http import FaultServer
from tests.support.servers.lora_files import lora_bytes, write_lora


@pytest.fixture
def server():
    with FaultServer() as running:
        for seed, name in enumerate("abcd"):
            running.route(f"/{name}.safetensors", body=lora_bytes(seed=seed))
        yield running


def entries(cache: LoraCache) -> list[str]:
    return sorted(path.parent.name for path in cache.root.glob("*/manifest.json"))


def test_a_pinned_entry_survives_budget_eviction_while_unpinned_lru_entries_go(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger="sdxl_worker")
    url = {name: server.url(f"/{name}.safetensors") for name in "abcd"}
    keys = {name: LoraRequest(0, url[name]).cache_key for name in "abcd"}
    loader = LoraCache(cache_settings(tmp_path / "cache", evict_grace_s=0))
    for name in "ab":
        loader.resolve(LoraRequest(0, url[name]))
        time.sleep(0.01)
    per_entry = loader.stats()["size_bytes"] / 2
    cache = LoraCache(cache_settings(tmp_path / "cache", evict_grace_s=0, cache_max_bytes=int(2.5 * per_entry), pinned_sources=(url["a"],)))
    assert cache.pinned_keys == {keys["a"]}
    cache.resolve(LoraRequest(0, url["c"]))
    assert entries(cache) == sorted([keys["a"], keys["c"]])  # b, not the older pinned a, made room
    cache.resolve(LoraRequest(0, url["d"]))
    assert entries(cache) == sorted([keys["a"], keys["d"]])
    tight = LoraCache(cache_settings(tmp_path / "cache", evict_grace_s=0, cache_max_bytes=1, pinned_sources=(url["a"],)))
    tight.resolve(LoraRequest(0, url["b"]))
    assert entries(tight) == sorted([keys["a"], keys["b"]])  # d went; a stays although over the budget
    assert "over its budget" in caplog.text and "the rest is pinned, in use or recent" in caplog.text
    unpinned = LoraCache(cache_settings(tmp_path / "cache", evict_grace_s=0, cache_max_bytes=1))
    unpinned.resolve(LoraRequest(0, url["c"]))
    assert entries(unpinned) == [keys["c"]]  # the control: without the pin, a goes like any other


def test_every_source_form_pins_its_entry(tmp_path, server):
    civitai = FakeCivitai(server)
    civitai.add_version(4242, lora_bytes(seed=7))
    cache = LoraCache(cache_settings(tmp_path / "cache", evict_grace_s=0, civitai_api_base=civitai.base))
    downloaded = cache.resolve(LoraRequest(0, server.url("/a.safetensors")))
    from_civitai = cache.resolve(LoraRequest(0, "civitai:4242"))
    write_lora(tmp_path / "cache" / "by-hand.safetensors")
    pinned = LoraCache(cache_settings(tmp_path / "cache", evict_grace_s=0, civitai_api_base=civitai.base, pinned_sources=(
        "urn:air:pony:lora:civitai:1@4242", downloaded.entry_key, "by-hand.safetensors", "owner/repo")))
    assert pinned.pinned_keys == {from_civitai.entry_key, downloaded.entry_key, LoraRequest(0, "owner/repo").cache_key}


def test_pinned_loras_are_read_from_the_environment_and_a_bad_item_is_named(tmp_path):
    settings = CacheSettings.from_env({"LORA_CACHE_DIR": str(tmp_path),
                                       "PINNED_LORAS": " civitai:5 , me/style,,my.safetensors "})
    assert settings.pinned_sources == ("civitai:5", "me/style", "my.safetensors")
    assert CacheSettings.from_env({}).pinned_sources == ()
    pinned = "ftp://host/x.safetensors,ok.safetensors,urn:air:sd1:lora:civitai:1@2"
    bad = CacheSettings.from_env({"LORA_CACHE_DIR": str(tmp_path), "PINNED_LORAS": pinned})
    with pytest.raises(ValueError) as caught:
        LoraCache(bad)
    assert str(caught.value).startswith("PINNED_LORAS: PINNED_LORAS[0]: unsupported URL scheme 'ftp'")
    assert "PINNED_LORAS[2]: the AIR is for the 'sd1' ecosystem" in str(caught.value)


# -- RAM -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parsed")
    return {name: load_lora(write_lora(folder / f"{name}.safetensors", seed=seed), name)
            for seed, name in enumerate("pqrst")}


def load(ram: LoraRamCache, parsed, name: str) -> bool:
    return ram.get_or_load(name, lambda: parsed[name])[1]


def test_a_pinned_lora_stays_in_ram_while_unpinned_lru_ones_go(parsed):
    size = parsed["p"].nbytes
    ram = LoraRamCache(int(2.5 * size))
    ram.pin(["p"])
    for name in "pqrs":
        assert load(ram, parsed, name) is False
    assert load(ram, parsed, "p") is True and load(ram, parsed, "s") is True
    assert load(ram, parsed, "q") is False and load(ram, parsed, "r") is False  # evicted, least recently used
    assert ram.nbytes <= ram.budget_bytes


def test_pinned_loras_over_the_budget_are_kept_and_counted(parsed, caplog):
    caplog.set_level(logging.WARNING, logger="sdxl_worker")
    ram = LoraRamCache(int(1.5 * parsed["p"].nbytes))
    ram.pin(["p", "q"])
    for name in "pqr":
        load(ram, parsed, name)
    assert "over its budget" in caplog.text and "pinned LoRAs are never evicted" in caplog.text
    assert ram.nbytes == 3 * parsed["p"].nbytes  # the pinned pair plus the newest unpinned LoRA
    assert load(ram, parsed, "t") is False  # r is dropped for t
    assert [load(ram, parsed, name) for name in "pqtr"] == [True, True, True, False]
    unpinned = LoraRamCache(parsed["p"].nbytes // 2)
    load(unpinned, parsed, "p")
    assert load(unpinned, parsed, "p") is False  # the control: larger than the budget, so never kept unless pinned
