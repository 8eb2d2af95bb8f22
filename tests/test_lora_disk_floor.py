"""The free-disk floor (``LORA_CACHE_MIN_FREE_MB``): downloads evict least recently used entries to stay above it, or
are refused with a clear error and leave nothing behind; pinned and leased entries stay; hits never look.

Two kinds of disk: a real small tmpfs mounted in a private mount namespace (``unshare``) where the kernel allows
it, and everywhere a simulated small disk: ``LoraCache(free_bytes=...)`` reads the free space as a fixed capacity
minus the bytes really under the cache folder (partial downloads included), since a real disk cannot be filled here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_worker.errors import LoraError
from sdxl_worker.net.transfer_progress import format_size
from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.settings import CacheSettings
from sdxl_worker.store.cache import LoraCache
from tests.support.factories import cache_settings
from tests.support.servers.fake_civitai import FakeCivitai
from tests.support.servers.fake_hub import FakeHub
from tests.support.servers.fault_http import FaultServer
from tests.support.servers.lora_files import lora_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FILES = {name: lora_bytes(seed=seed, rank=8, dim=4096) for seed, name in enumerate("abcdef")}  # 256 kB each
SIZE = len(FILES["a"])
FLOOR = 300_000


class SmallDisk:
    """Free bytes of a disk of ``capacity`` bytes that holds exactly the files under ``root``; counts its reads."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root, self.capacity, self.reads = root, capacity, 0

    def __call__(self) -> int:
        self.reads += 1
        used = sum(path.stat().st_size for path in self.root.rglob("*") if path.is_file())
        return self.capacity - used


@pytest.fixture
def server():
    with FaultServer() as running:
        for name, body in FILES.items():
            running.route(f"/{name}.safetensors", body=body)
            running.route(f"/unsized/{name}.safetensors", body=body, send_length=False, chunk_size=16_384)
        yield running


# A small disk: no retries, no grace period, the floor re-read every 32 KiB written.
FLOOR_OPTIONS = {"download_retries": 0, "evict_grace_s": 0, "min_free_bytes": FLOOR, "free_check_bytes": 32_768}


def filled(tmp_path: Path, server: FaultServer, names: str, **overrides) -> tuple[LoraCache, SmallDisk]:
    """A cache holding ``names`` (oldest first) on a disk with room for them plus half an entry above the floor."""
    disk = SmallDisk(tmp_path / "cache", capacity=10**9)
    cache = LoraCache(cache_settings(tmp_path / "cache", **(FLOOR_OPTIONS | overrides)), free_bytes=disk)
    for name in names:
        cache.resolve(LoraRequest(0, server.url(f"/{name}.safetensors")))
    disk.capacity = FLOOR + disk.capacity - disk() + SIZE // 2
    return cache, disk


def entries(tmp_path: Path) -> list[str]:
    return sorted(json.loads(path.read_text())["source"].rsplit("/", 1)[-1]
                  for path in (tmp_path / "cache").glob("*/manifest.json"))


def leftovers(tmp_path: Path) -> list[str]:
    return [path.name for path in (tmp_path / "cache").iterdir() if path.name.startswith((".tmp", ".trash"))]


@pytest.mark.parametrize("path", ["/{}.safetensors", "/unsized/{}.safetensors"])
def test_a_download_evicts_the_least_recently_used_unpinned_entry_to_stay_above_the_floor(tmp_path, server, path):
    cache, disk = filled(tmp_path, server, "abc", pinned_sources=(server.url("/a.safetensors"),))
    resolved = cache.resolve(LoraRequest(0, server.url(path.format("d"))))
    assert resolved.path.read_bytes() == FILES["d"]
    assert entries(tmp_path) == ["a.safetensors", "c.safetensors", "d.safetensors"]  # b went; a is pinned
    assert disk() >= FLOOR and cache.stats()["evictions"] == 1 and leftovers(tmp_path) == []


def test_when_eviction_is_not_enough_the_download_is_refused_and_nothing_stays(tmp_path, server):
    cache, disk = filled(tmp_path, server, "ab", pinned_sources=(server.url("/a.safetensors"),))
    held = cache.resolve(LoraRequest(0, server.url("/b.safetensors")))
    sized = f"the download needs {format_size(SIZE)} more and "
    for path, needs in (("/c.safetensors", sized), ("/unsized/c.safetensors", "")):
        with cache.in_use([held]), pytest.raises(LoraError) as caught:
            cache.resolve(LoraRequest(3, server.url(path), name="c"))
        message = str(caught.value)
        assert message.startswith("loras[3] (c): not enough free disk space in the LoRA cache: ")
        assert f" free, {needs}LORA_CACHE_MIN_FREE_MB keeps 300.0 kB free, even after evicting what may go (0 least "\
               "recently used entries; pinned, in-use and recently used entries stay)" in message
        assert entries(tmp_path) == ["a.safetensors", "b.safetensors"] and leftovers(tmp_path) == []


def test_the_size_civitai_lists_is_checked_before_connecting_to_the_file(tmp_path, server):
    civitai = FakeCivitai(server)
    civitai.add_version(77, FILES["e"])
    cache, disk = filled(tmp_path, server, "a", pinned_sources=(server.url("/a.safetensors"),),
                         civitai_api_base=civitai.base)
    with pytest.raises(LoraError, match=rf"^loras\[0\] \(civitai:77\): not enough free disk space .* the download "
                                        rf"needs {format_size(SIZE)} more"):
        cache.resolve(LoraRequest(0, "civitai:77"))
    assert server.count(civitai.api_path(77)) == 1 and server.count(civitai.download_path(77)) == 0


def test_hugging_face_downloads_keep_the_floor_too(tmp_path, server):
    with FakeHub() as hub:
        hub.add_repo("me/style", {"style.safetensors": FILES["f"]}, revisions=("main", "other"))
        cache, disk = filled(tmp_path, server, "ab", hf_endpoint=hub.endpoint)
        resolved = cache.resolve(LoraRequest(0, "me/style"))
        assert resolved.path.read_bytes() == FILES["f"] and entries(tmp_path) == ["b.safetensors", "style"]
        disk.capacity = 0
        with pytest.raises(LoraError, match="not enough free disk space"):
            cache.resolve(LoraRequest(0, "me/style", revision="other"))
        assert leftovers(tmp_path) == []


def test_hits_and_a_floor_of_zero_never_read_the_free_space(tmp_path, server):
    cache, disk = filled(tmp_path, server, "a")
    reads = disk.reads
    assert cache.resolve(LoraRequest(0, server.url("/a.safetensors"))).cache_hit
    assert disk.reads == reads
    off = SmallDisk(tmp_path / "cache", capacity=0)
    LoraCache(cache_settings(tmp_path / "cache", **(FLOOR_OPTIONS | {"min_free_bytes": 0})), free_bytes=off).resolve(
        LoraRequest(0, server.url("/b.safetensors")))
    assert off.reads == 0 and "b.safetensors" in entries(tmp_path)


def test_settings_read_the_floor_from_the_environment():
    assert CacheSettings.from_env({}).min_free_bytes == 1024 * 1024**2
    assert CacheSettings.from_env({"LORA_CACHE_MIN_FREE_MB": "0"}).min_free_bytes == 0
    assert CacheSettings.from_env({"LORA_CACHE_MIN_FREE_MB": "2.5"}).min_free_bytes == int(2.5 * 1024**2)
    for value in ("-1", "lots", "inf"):
        with pytest.raises(ValueError, match="LORA_CACHE_MIN_FREE_MB"):
            CacheSettings.from_env({"LORA_CACHE_MIN_FREE_MB": value})


# -- a real small file system ----------------------------------------------------------------------------------------


def _can_mount_a_private_tmpfs(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    folder.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                           capture_output=True)
    return probe.returncode == 0


def test_on_a_real_4_mib_tmpfs_eviction_keeps_the_floor_and_refusal_leaves_it_clean(tmp_path):
    mount_point = tmp_path / "tmpfs"
    if not _can_mount_a_private_tmpfs(mount_point):
        pytest.skip("this kernel refuses a private tmpfs (unprivileged user namespaces are off); the simulated-disk "
                    "tests above cover the same paths")
    mib = 1024**2
    big = {name: lora_bytes(seed=seed, rank=16, dim=8192) for seed, name in enumerate("abcd")}  # 1 MiB each
    huge = lora_bytes(seed=9, rank=40, dim=8192)  # 2.5 MiB: never fits above the floor next to the pinned entry
    with FaultServer() as server:
        for name, body in {**big, "huge": huge}.items():
            server.route(f"/{name}.safetensors", body=body)
        urls = [server.url(f"/{name}.safetensors") for name in ("a", "b", "c", "d", "huge")]
        script = (f"mount -t tmpfs -o size=4m tmpfs {mount_point} && "
                  f"exec {sys.executable} -m tests.support.servers.floor_child {mount_point} {3 * mib // 2} {urls[0]} "
                  f"{' '.join(urls)}")
        child = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    steps = [json.loads(line) for line in child.stdout.splitlines()]
    assert [step["ok"] for step in steps] == [True, True, True, True, False]
    names = [[source.rsplit("/", 1)[-1] for source in step["entries"]] for step in steps]
    assert names[2] == ["a.safetensors", "c.safetensors"]       # b (least recently used, unpinned) made room
    assert names[3] == ["a.safetensors", "d.safetensors"]       # then c; a is pinned
    assert names[4] == ["a.safetensors", "d.safetensors"]       # evicting d could not make room: d stays
    assert all(step["free"] >= 3 * mib // 2 for step in steps)
    assert "not enough free disk space" in steps[4]["error"] and steps[4]["leftovers"] == []
