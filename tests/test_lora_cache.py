"""The shared LoRA disk cache with real servers, files, threads and processes: hits without network, verification,
refusals that cache nothing, one download across processes, crash recovery, eviction and leases."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sdxl_worker.errors import LoraError
from sdxl_worker.request.entries import LoraRequest, parse_lora_requests
from sdxl_worker.settings import GIB, CacheSettings
from sdxl_worker.store.cache import LoraCache, ResolvedLora
from sdxl_worker.store.file_checks import check_weights_file
from sdxl_worker.store.locking import EntryLock, LockTimeout
from sdxl_worker.store.owners import Heartbeat
from tests.support.factories import cache_settings
from tests.support.servers.fault_http import FaultServer
from tests.support.servers.lora_files import lora_bytes, malicious_pickle_bytes, torch_lora_bytes, write_lora

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LORA = lora_bytes(seed=1)
OTHER = lora_bytes(seed=2)
BIG = lora_bytes(seed=3, rank=16, dim=8192)  # about 1 MB
TOKEN = "civitai-TOKEN-SECRET-55"
DISPOSITION = {"Content-Disposition": 'attachment; filename="Pixel Style.safetensors"'}


@pytest.fixture
def server():
    with FaultServer() as running:
        yield running


def visible(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if not path.name.startswith("."))


def temp_leftovers(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.startswith((".tmp", ".trash")))


def child_env(root: Path) -> dict[str, str]:
    return {**os.environ, "LORA_CACHE_DIR": str(root), "LORA_ALLOW_PRIVATE_HOSTS": "1",
            "PYTHONPATH": str(PROJECT_ROOT)}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_owner(path: Path, host: str, pid: int) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "start": None, "token": "t", "created": 0}))


# -- hits, misses and what is stored -------------------------------------------------------------------------------


def test_miss_then_hit_and_a_new_process_finds_the_entry_without_any_request(tmp_path, server):
    server.route("/api/download/models/7", body=LORA, headers={**DISPOSITION, "ETag": '"abc"'})
    url = server.url("/api/download/models/7?type=Model&token=QUERYSECRET")
    first = LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, url))
    assert not first.cache_hit and first.display_name == "Pixel Style.safetensors"
    assert first.path.read_bytes() == LORA and first.sha256 == hashlib.sha256(LORA).hexdigest()
    assert first.size_bytes == len(LORA) and first.path.name == "weights.safetensors"
    assert first.path.parent.name == LoraRequest(0, url).cache_key and first.fetch_ms > 0
    manifest = json.loads((first.path.parent / "manifest.json").read_text())
    assert manifest["sha256"] == first.sha256 and manifest["size"] == len(LORA) and manifest["etag"] == '"abc"'
    assert manifest["kind"] == "file" and manifest["display_name"] == "Pixel Style.safetensors"
    assert "type=Model" in manifest["source"] and "QUERYSECRET" not in json.dumps(manifest)
    assert manifest["downloaded_at"] <= manifest["last_used_at"] <= time.time()

    fresh = LoraCache(cache_settings(tmp_path / "cache"))
    again = fresh.resolve(LoraRequest(0, url))
    assert again.cache_hit and again.path == first.path and again.sha256 == first.sha256
    assert server.count("/api/download/models/7") == 1
    assert fresh.stats()["hits"] == 1 and fresh.stats()["misses"] == 0


def test_an_entry_whose_manifest_has_fields_from_a_newer_worker_is_still_a_hit(tmp_path, server):
    server.route("/a.safetensors", body=LORA)
    url = server.url("/a.safetensors")
    first = LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, url))
    manifest_path = first.path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "added_by_a_newer_worker": {"x": 1}}))
    again = LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, url))
    assert again.cache_hit and again.path == first.path and again.sha256 == first.sha256
    assert server.count("/a.safetensors") == 1


def test_a_flipped_byte_is_detected_by_a_new_process_and_refetched(tmp_path, server):
    server.route("/a.safetensors", body=LORA)
    url = server.url("/a.safetensors")
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    path = cache.resolve(LoraRequest(0, url)).path
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    # The documented trade-off of LORA_VERIFY_ON_HIT=first: this process verified the file already and its
    # size, mtime and inode did not change, so it trusts it; a new process re-hashes and notices.
    assert cache.resolve(LoraRequest(0, url)).cache_hit
    refetched = LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, url))
    assert not refetched.cache_hit and refetched.path.read_bytes() == LORA
    assert server.count("/a.safetensors") == 2


def test_verify_always_rehashes_on_every_hit(tmp_path, server):
    server.route("/a.safetensors", body=LORA)
    url = server.url("/a.safetensors")
    cache = LoraCache(cache_settings(tmp_path / "cache", verify_on_hit="always"))
    path = cache.resolve(LoraRequest(0, url)).path
    stat = path.stat()
    path.write_bytes(LORA[:-1] + bytes([LORA[-1] ^ 1]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not cache.resolve(LoraRequest(0, url)).cache_hit
    assert server.count("/a.safetensors") == 2


def test_verify_changed_skips_the_hash_until_size_or_mtime_change(tmp_path, server):
    server.route("/a.safetensors", body=LORA)
    url = server.url("/a.safetensors")
    LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, url))
    cache = LoraCache(cache_settings(tmp_path / "cache", verify_on_hit="changed"))
    path = cache.resolve(LoraRequest(0, url)).path
    path.write_bytes(LORA[:-1] + bytes([LORA[-1] ^ 1]))  # new mtime
    assert not cache.resolve(LoraRequest(0, url)).cache_hit
    assert server.count("/a.safetensors") == 2


def test_a_truncated_cached_file_is_refetched(tmp_path, server):
    server.route("/a.safetensors", body=LORA)
    url = server.url("/a.safetensors")
    path = LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, url)).path
    path.write_bytes(LORA[:100])
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    assert cache.resolve(LoraRequest(0, url)).path.read_bytes() == LORA
    assert server.count("/a.safetensors") == 2 and temp_leftovers(tmp_path / "cache") == []


def test_a_requested_sha256_that_differs_from_the_entry_refetches(tmp_path, server):
    route = server.route("/moving.safetensors", body=LORA)
    url = server.url("/moving.safetensors")
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    cache.resolve(LoraRequest(0, url))
    route.body = OTHER
    wanted = hashlib.sha256(OTHER).hexdigest()
    updated = cache.resolve(LoraRequest(0, url, sha256=wanted))
    assert not updated.cache_hit and updated.path.read_bytes() == OTHER and updated.sha256 == wanted
    assert cache.resolve(LoraRequest(0, url)).sha256 == wanted
    assert server.count("/moving.safetensors") == 2


def test_extension_comes_from_the_content_when_the_url_has_none(tmp_path, server):
    server.route("/download/123", body=LORA)
    server.route("/download/124", body=torch_lora_bytes())
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    assert cache.resolve(LoraRequest(0, server.url("/download/123"))).path.name == "weights.safetensors"
    torch_file = cache.resolve(LoraRequest(0, server.url("/download/124")))
    assert torch_file.path.name == "weights.pt"


def test_plain_torch_files_are_accepted(tmp_path, server):
    server.route("/x", body=torch_lora_bytes(), headers={"Content-Disposition": 'attachment; filename="old.ckpt"'})
    resolved = LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, server.url("/x")))
    assert resolved.path.name == "weights.ckpt" and resolved.display_name == "old.ckpt"


# -- refusals: a clear error naming the LoRA, nothing cached -------------------------------------------------------


def assert_nothing_cached(root: Path) -> None:
    assert visible(root) == [] and temp_leftovers(root) == []
    assert list((root / ".locks").iterdir()) == []


@pytest.mark.parametrize("body, headers, fragment", [
    (b"<!DOCTYPE html><html><body>Please log in</body></html>", {"Content-Type": "text/html"}, "HTML page"),
    (b'{"error": "Model not found"}', {}, "JSON document"),
    (os.urandom(5000), {}, "not a valid safetensors file"),
    (b"", {}, "empty"),
    (lora_bytes()[:-10], {}, "not a valid safetensors file"),
    (LORA, {"Content-Disposition": 'attachment; filename="model.zip"'}, "unsupported file type '.zip'"),
])
def test_files_that_are_not_loras_are_refused(tmp_path, server, body, headers, fragment):
    server.route("/bad.safetensors", body=body, headers=headers)
    with pytest.raises(LoraError) as caught:
        LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(4, server.url("/bad.safetensors")))
    assert str(caught.value).startswith("loras[4] (127.0.0.1:")
    assert fragment in str(caught.value)
    assert_nothing_cached(tmp_path / "cache")


def test_safetensors_without_tensors_is_refused(tmp_path, server):
    header = b'{"__metadata__": {"format": "pt"}}'
    server.route("/empty.safetensors", body=len(header).to_bytes(8, "little") + header)
    with pytest.raises(LoraError, match="holds no tensors"):
        LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, server.url("/empty.safetensors")))


def test_sha256_mismatch_is_refused_and_nothing_cached(tmp_path, server):
    server.route("/a.safetensors", body=LORA)
    with pytest.raises(LoraError, match=f"sha256 mismatch: expected {'1' * 64}, downloaded"):
        LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, server.url("/a.safetensors"), sha256="1" * 64))
    assert_nothing_cached(tmp_path / "cache")


def test_a_pickle_that_would_run_code_is_refused_and_its_code_never_runs(tmp_path, server):
    marker = tmp_path / "pwned"
    payload = malicious_pickle_bytes(marker)
    server.route("/evil.pt", body=payload)
    with pytest.raises(LoraError, match=r"refused \.pt file: it does not load with torch\.load\(weights_only=True\)"):
        LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, server.url("/evil.pt")))
    assert not marker.exists()
    assert_nothing_cached(tmp_path / "cache")
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(pickle.dumps({"x": _MarkerCall(marker)}, protocol=2))
    with pytest.raises(LoraError, match="refused"):
        check_weights_file(legacy, ".ckpt")
    assert not marker.exists()
    pickle.loads(legacy.read_bytes())  # the control: plain pickle would have run it
    assert marker.exists()


class _MarkerCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_404_and_timeout_are_errors_naming_the_lora_and_cache_nothing(tmp_path, server):
    server.route("/slow.safetensors", body=LORA, delay_s=1.0)
    cache = LoraCache(cache_settings(tmp_path / "cache", read_timeout_s=0.3, download_retries=0))
    with pytest.raises(LoraError, match=r"^loras\[0\] \(127\.0\.0\.1:\d+/missing\.safetensors\): not found \(HTTP 404\)"):
        cache.resolve(LoraRequest(0, server.url("/missing.safetensors")))
    with pytest.raises(LoraError, match=r"^loras\[1\] \(slow\): timed out"):
        cache.resolve(LoraRequest(1, server.url("/slow.safetensors"), name="slow"))
    assert_nothing_cached(tmp_path / "cache")


def test_size_over_the_limit_is_refused(tmp_path, server):
    server.route("/big.safetensors", body=BIG)
    with pytest.raises(LoraError, match=r"over the limit of 100\.0 kB \(LORA_MAX_BYTES\)"):
        LoraCache(cache_settings(tmp_path / "cache", max_bytes=100_000)).resolve(LoraRequest(0, server.url("/big.safetensors")))
    assert_nothing_cached(tmp_path / "cache")


def test_tokens_never_appear_in_logs_errors_or_manifests(tmp_path, server, caplog):
    caplog.set_level(logging.DEBUG)
    settings = cache_settings(tmp_path / "cache", civitai_token=TOKEN, civitai_hosts=("127.0.0.1",))
    server.route("/api/download/models/1", body=LORA, require_auth=f"Bearer {TOKEN}", headers=DISPOSITION)
    server.route("/api/download/models/2", require_auth="Bearer another")
    cache = LoraCache(settings)
    ok = cache.resolve(LoraRequest(0, server.url(f"/api/download/models/1?token={TOKEN}"), name=f"x{TOKEN}"))
    with pytest.raises(LoraError) as caught:
        cache.resolve(LoraRequest(1, server.url(f"/api/download/models/2?token={TOKEN}")))
    assert "CIVITAI_TOKEN" in str(caught.value) and "HTTP 401" in str(caught.value)
    for text in (str(caught.value), caplog.text, (ok.path.parent / "manifest.json").read_text()):
        assert TOKEN not in text


def test_resolve_all_fails_as_a_whole_on_the_first_error(tmp_path, server):
    server.route("/a.safetensors", body=LORA)
    requests, errors = parse_lora_requests([server.url("/a.safetensors"), server.url("/nope.safetensors"),
                                            server.url("/never.safetensors")], 8)
    assert errors == []
    with pytest.raises(LoraError, match=r"^loras\[1\] "):
        LoraCache(cache_settings(tmp_path / "cache")).resolve_all(requests)
    assert server.count("/never.safetensors") == 0


def test_progress_messages_show_percent_and_mb_and_are_throttled(tmp_path, server):
    server.route("/big.safetensors", body=BIG, chunk_size=16_384)
    messages: list[str] = []
    LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(1, server.url("/big.safetensors"), name="big"),
                                              messages.append)
    assert messages[-1].startswith("loras[1] (big): downloading 100% (") and messages[-1].endswith(" MB)")
    assert 2 <= len(messages) <= 22


# -- names in the cache ----------------------------------------------------------------------------------------------


def test_files_placed_by_hand_are_found_by_name_and_checked(tmp_path):
    root = tmp_path / "cache"
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    write_lora(root / "my_style.safetensors", seed=5)
    resolved = cache.resolve(LoraRequest(0, "my_style.safetensors"))
    assert resolved.cache_hit and resolved.path == (root / "my_style.safetensors").resolve()
    assert resolved.sha256 == hashlib.sha256(resolved.path.read_bytes()).hexdigest() and resolved.entry_key is None
    (root / "evil.pt").write_bytes(malicious_pickle_bytes(tmp_path / "pwned"))
    (root / "notes.txt").write_text("hi")
    (tmp_path / "outside.safetensors").write_bytes(LORA)
    os.symlink(tmp_path / "outside.safetensors", root / "escape.safetensors")
    cases = {"evil.pt": "refused .pt file", "notes.txt": "unsupported file type '.txt'",
             "escape.safetensors": "leads outside the LoRA cache", "absent.safetensors": "no entry named"}
    for name, fragment in cases.items():
        with pytest.raises(LoraError) as caught:
            cache.resolve(LoraRequest(2, name))
        assert str(caught.value).startswith(f"loras[2] ({name}): ") and fragment in str(caught.value)
    assert not (tmp_path / "pwned").exists()


def test_a_peft_folder_placed_by_hand_and_a_downloaded_entry_by_folder_name(tmp_path, server):
    root = tmp_path / "cache"
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    folder = root / "my_adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    write_lora(folder / "adapter_model.safetensors")
    peft = cache.resolve(LoraRequest(0, "my_adapter"))
    assert peft.path == folder.resolve() and peft.sha256 == hashlib.sha256(
        (folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    server.route("/a.safetensors", body=LORA)
    downloaded = cache.resolve(LoraRequest(0, server.url("/a.safetensors")))
    by_name = cache.resolve(LoraRequest(0, downloaded.entry_key))
    assert by_name.path.resolve() == downloaded.path.resolve() and by_name.entry_key == downloaded.entry_key
    (folder / "adapter_config.json").unlink()
    with pytest.raises(LoraError, match="not a PEFT adapter folder"):
        LoraCache(cache_settings(tmp_path / "cache")).resolve(LoraRequest(0, "my_adapter"))


def test_a_hand_placed_file_is_hashed_once_per_process_until_it_changes(tmp_path):
    root = tmp_path / "cache"
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    path = write_lora(root / "a.safetensors", seed=1)
    first = cache.resolve(LoraRequest(0, "a.safetensors")).sha256
    write_lora(root / "a.safetensors", seed=2)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cache.resolve(LoraRequest(0, "a.safetensors")).sha256 != first


# -- one download across threads and processes -----------------------------------------------------------------------


def test_threads_asking_at_once_share_one_download_and_log_wait(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger="sdxl_worker")
    server.route("/shared.safetensors", body=BIG, chunk_size=65_536, chunk_delay_s=0.02)
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    results: list[ResolvedLora] = []
    threads = [threading.Thread(target=lambda: results.append(
        cache.resolve(LoraRequest(0, server.url("/shared.safetensors"))))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4 and len({item.path for item in results}) == 1
    assert sorted(item.cache_hit for item in results) == [False, True, True, True]
    assert server.count("/shared.safetensors") == 1
    assert "lora wait" in caplog.text and cache.stats()["waits"] == 3


def test_eight_processes_asking_at_once_cause_exactly_one_download(tmp_path, server):
    root = tmp_path / "cache"
    server.route("/one.safetensors", body=BIG, chunk_size=65_536, chunk_delay_s=0.03)
    go = tmp_path / "go"
    outs = [tmp_path / f"out{n}.json" for n in range(8)]
    children = [subprocess.Popen([sys.executable, "-m", "tests.support.servers.resolve_child",
                                  server.url("/one.safetensors"), str(out), str(go)],
                                 cwd=PROJECT_ROOT, env=child_env(root), stderr=subprocess.PIPE) for out in outs]
    deadline = time.monotonic() + 30
    while not all(out.with_name(out.name + ".ready").exists() for out in outs) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    for child in children:
        assert child.wait(60) == 0, child.stderr.read().decode()[-2000:]
    results = [json.loads(out.read_text()) for out in outs]
    assert server.count("/one.safetensors") == 1
    assert len({result["path"] for result in results}) == 1 and len({result["sha256"] for result in results}) == 1
    assert sorted(result["hit"] for result in results) == [False] + [True] * 7
    assert Path(results[0]["path"]).read_bytes() == BIG
    waits = sum(b"lora wait" in child.stderr.read() for child in children)
    assert waits >= 1


def test_a_downloader_killed_midway_leaves_no_partial_entry_and_the_next_request_recovers(tmp_path, server):
    root = tmp_path / "cache"
    route = server.route("/slow.safetensors", body=BIG, chunk_size=16_384, chunk_delay_s=0.05)
    url = server.url("/slow.safetensors")
    child = subprocess.Popen([sys.executable, "-m", "tests.support.servers.resolve_child", url, str(tmp_path / "out.json")],
                             cwd=PROJECT_ROOT, env=child_env(root), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while server.sent["/slow.safetensors"] < 100_000 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    key = LoraRequest(0, url).cache_key
    assert server.sent["/slow.safetensors"] < len(BIG)
    assert not (root / key).exists() and (root / ".locks" / f"{key}.lock").exists()
    assert len(temp_leftovers(root)) == 1

    route.chunk_delay_s = 0.0
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    assert temp_leftovers(root) == []
    resolved = cache.resolve(LoraRequest(0, url))
    assert not resolved.cache_hit and resolved.path.read_bytes() == BIG
    assert not (root / ".locks" / f"{key}.lock").exists()
    assert server.count("/slow.safetensors") == 2
    weights = [path for path in root.rglob("weights*")]
    assert weights == [resolved.path]


def test_a_lock_of_another_host_is_respected_while_its_heartbeat_runs_then_broken(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger="sdxl_worker")
    server.route("/l.safetensors", body=LORA)
    url = server.url("/l.safetensors")
    settings = cache_settings(tmp_path / "cache", lock_stale_s=0.5)
    cache = LoraCache(settings)
    lock = tmp_path / "cache" / ".locks" / f"{LoraRequest(0, url).cache_key}.lock"
    write_owner(lock, "another-machine", 1)
    stop = time.monotonic() + 1.5

    def heartbeat() -> None:
        while time.monotonic() < stop:
            os.utime(lock, ns=(time.time_ns(), time.time_ns()))
            time.sleep(0.1)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    start = time.monotonic()
    resolved = cache.resolve(LoraRequest(0, url))
    waited = time.monotonic() - start
    beating.join()
    assert 1.9 <= waited < 10 and resolved.path.read_bytes() == LORA
    assert "lora wait" in caplog.text and "broke a stale lock of another-machine pid 1" in caplog.text


def test_a_lock_whose_owner_died_on_this_host_is_broken_at_once(tmp_path, server):
    server.route("/l.safetensors", body=LORA)
    url = server.url("/l.safetensors")
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    write_owner(tmp_path / "cache" / ".locks" / f"{LoraRequest(0, url).cache_key}.lock", socket.gethostname(),
                dead_pid())
    start = time.monotonic()
    assert cache.resolve(LoraRequest(0, url)).path.read_bytes() == LORA
    assert time.monotonic() - start < 2


def test_leftovers_of_dead_owners_and_trash_are_cleaned_by_a_later_run(tmp_path):
    root = tmp_path / "cache"
    for name, host, pid in ((".tmp-dead", socket.gethostname(), dead_pid()), (".tmp-remote", "elsewhere", 1),
                            (".tmp-mine", socket.gethostname(), os.getpid())):
        (root / name).mkdir(parents=True)
        write_owner(root / name / ".owner", host, pid)
        (root / name / "download.part").write_bytes(b"partial")
    (root / ".trash-x").mkdir()
    LoraCache(cache_settings(tmp_path / "cache"))
    assert temp_leftovers(root) == [".tmp-mine", ".tmp-remote"]
    old = time.time() - 7200
    for path in (root / ".tmp-remote", root / ".tmp-remote" / ".owner", root / ".tmp-remote" / "download.part"):
        os.utime(path, (old, old))
    LoraCache(cache_settings(tmp_path / "cache"))
    assert temp_leftovers(root) == [".tmp-mine"]


# -- eviction ----------------------------------------------------------------------------------------------------------


def fill(tmp_path: Path, server: FaultServer, names: list[str]) -> list[ResolvedLora]:
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    resolved = []
    for seed, name in enumerate(names):
        server.route(f"/{name}.safetensors", body=lora_bytes(seed=seed))
        resolved.append(cache.resolve(LoraRequest(0, server.url(f"/{name}.safetensors"))))
        time.sleep(0.01)
    return resolved


def test_least_recently_used_entries_are_evicted_but_never_one_in_use(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger="sdxl_worker")
    a, b = fill(tmp_path, server, ["a", "b"])
    per_entry = LoraCache(cache_settings(tmp_path / "cache")).stats()["size_bytes"] / 2
    cache = LoraCache(cache_settings(tmp_path / "cache", cache_max_bytes=int(2.5 * per_entry), evict_grace_s=0))
    with cache.in_use([cache.resolve(LoraRequest(0, a.request.source))]):
        server.route("/c.safetensors", body=lora_bytes(seed=9))
        c = cache.resolve(LoraRequest(0, server.url("/c.safetensors")))
        assert a.path.exists() and not b.path.exists() and c.path.exists()
    assert "lora evict" in caplog.text and cache.stats()["evictions"] == 1
    server.route("/d.safetensors", body=lora_bytes(seed=10))
    cache.resolve(LoraRequest(0, server.url("/d.safetensors")))
    assert not a.path.exists() and c.path.exists()
    stats = cache.stats()
    assert stats["entries"] == 2 and stats["size_bytes"] <= stats["budget_bytes"] and stats["evictions"] == 2


def test_a_lease_of_another_machine_protects_until_it_goes_stale(tmp_path, server):
    a, b = fill(tmp_path, server, ["a", "b"])
    per_entry = LoraCache(cache_settings(tmp_path / "cache")).stats()["size_bytes"] / 2
    cache = LoraCache(cache_settings(tmp_path / "cache", cache_max_bytes=int(1.5 * per_entry), evict_grace_s=0,
                                   lease_stale_s=60))
    lease_dir = tmp_path / "cache" / ".leases" / a.entry_key
    lease_dir.mkdir(parents=True)
    write_owner(lease_dir / "remote.lease", "another-machine", 1)
    server.route("/c.safetensors", body=lora_bytes(seed=9))
    cache.resolve(LoraRequest(0, server.url("/c.safetensors")))
    assert a.path.exists() and not b.path.exists()
    old = time.time() - 120
    os.utime(lease_dir / "remote.lease", (old, old))
    server.route("/d.safetensors", body=lora_bytes(seed=10))
    cache.resolve(LoraRequest(0, server.url("/d.safetensors")))
    assert not a.path.exists() and not (lease_dir / "remote.lease").exists()


def test_recently_used_entries_are_kept_over_budget_within_the_grace_period(tmp_path, server, caplog):
    caplog.set_level(logging.INFO, logger="sdxl_worker")
    a, _ = fill(tmp_path, server, ["a", "b"])
    cache = LoraCache(cache_settings(tmp_path / "cache", cache_max_bytes=1))
    server.route("/c.safetensors", body=lora_bytes(seed=9))
    cache.resolve(LoraRequest(0, server.url("/c.safetensors")))
    assert a.path.exists() and cache.stats()["entries"] == 3
    assert "over its budget" in caplog.text


def test_in_use_takes_leases_that_other_processes_can_see(tmp_path, server):
    (a,) = fill(tmp_path, server, ["a"])
    cache = LoraCache(cache_settings(tmp_path / "cache"))
    with cache.in_use([a]):
        leases = list((tmp_path / "cache" / ".leases" / a.entry_key).glob("*.lease"))
        assert len(leases) == 1 and json.loads(leases[0].read_text())["pid"] == os.getpid()
    assert list((tmp_path / "cache" / ".leases" / a.entry_key).glob("*.lease")) == []


def test_resolve_all_keeps_its_own_earlier_entries_from_eviction(tmp_path, server):
    fill(tmp_path, server, ["old"])
    server.route("/x.safetensors", body=lora_bytes(seed=20))
    server.route("/y.safetensors", body=lora_bytes(seed=21))
    per_entry = LoraCache(cache_settings(tmp_path / "cache")).stats()["size_bytes"]
    cache = LoraCache(cache_settings(tmp_path / "cache", cache_max_bytes=int(1.5 * per_entry), evict_grace_s=0))
    requests, _ = parse_lora_requests([server.url("/x.safetensors"), server.url("/y.safetensors")], 8)
    resolved = cache.resolve_all(requests)
    assert all(item.path.exists() for item in resolved)


# -- settings ----------------------------------------------------------------------------------------------------------


def test_settings_from_env(tmp_path):
    settings = CacheSettings.from_env({"LORA_CACHE_DIR": str(tmp_path), "LORA_CACHE_MAX_GB": "1.5",
                                       "LORA_ALLOW_PRIVATE_HOSTS": "true", "CIVITAI_TOKEN": "civ-secret", "HF_TOKEN": "hf-secret",
                                       "HF_ENDPOINT": "http://hub.local/", "LORA_VERIFY_ON_HIT": "ALWAYS",
                                       "LORA_DOWNLOAD_RETRIES": "2", "LORA_READ_TIMEOUT_S": "5.5"})
    assert settings.cache_dir == tmp_path and settings.cache_max_bytes == int(1.5 * GIB)
    assert settings.allow_private_hosts and settings.hf_endpoint == "http://hub.local"
    assert settings.verify_on_hit == "always" and settings.download_retries == 2 and settings.read_timeout_s == 5.5
    assert "civ-secret" not in repr(settings) and "hf-secret" not in repr(settings)
    defaults = CacheSettings.from_env({})
    assert (defaults.max_bytes, defaults.max_per_request, defaults.cache_max_bytes) == (2 * GIB, 8, None)
    assert (defaults.connect_timeout_s, defaults.read_timeout_s, defaults.download_retries) == (10, 60, 4)
    assert not defaults.allow_private_hosts and defaults.civitai_token is None
    assert defaults.cache_dir in (Path("/runpod-volume/loras"), Path("/models/loras"))
    for name, value in (("LORA_MAX_BYTES", "lots"), ("LORA_CACHE_MAX_GB", "-1"), ("LORA_ALLOW_PRIVATE_HOSTS", "maybe"),
                        ("LORA_VERIFY_ON_HIT", "never"), ("LORA_READ_TIMEOUT_S", "nan")):
        with pytest.raises(ValueError, match=name):
            CacheSettings.from_env({name: value})


def test_stats_report_entries_budget_and_counters(tmp_path, server):
    fill(tmp_path, server, ["a", "b"])
    write_lora(tmp_path / "cache" / "hand.safetensors")
    stats = LoraCache(cache_settings(tmp_path / "cache", cache_max_bytes=10**9)).stats()
    assert stats["entries"] == 2 and stats["user_entries"] == 1 and stats["budget_bytes"] == 10**9
    assert stats["size_bytes"] > 2 * len(LORA)
    assert {"hits", "misses", "waits", "evictions"} <= set(stats)


# -- the lock itself -----------------------------------------------------------------------------------------------


def test_try_acquire_takes_an_old_foreign_lock_but_not_a_fresh_one(tmp_path):
    path = tmp_path / "x.lock"
    write_owner(path, "another-machine", 1)
    lock = EntryLock(path, Heartbeat(0.05), stale_s=60, wait_s=0)
    assert not lock.try_acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    assert lock.try_acquire() and json.loads(path.read_text())["pid"] == os.getpid()
    first = path.stat().st_mtime_ns
    time.sleep(0.3)
    assert path.stat().st_mtime_ns > first  # the heartbeat keeps a held lock fresh
    lock.release()
    assert not path.exists()


def test_release_never_deletes_a_lock_taken_over_by_someone_else(tmp_path):
    path = tmp_path / "y.lock"
    lock = EntryLock(path, Heartbeat(10), stale_s=60, wait_s=0)
    assert lock.try_acquire()
    write_owner(path, "another-machine", 2)
    lock.release()
    assert json.loads(path.read_text())["host"] == "another-machine"
    with pytest.raises(LockTimeout, match="another-machine pid 2"):
        EntryLock(path, Heartbeat(10), stale_s=60, wait_s=0.2).acquire()


@pytest.mark.parametrize("stalled", [True, False], ids=["holder-stalled", "holder-progressing"])
def test_a_lock_waiter_gives_up_on_a_live_holder_whose_download_makes_no_progress(tmp_path, server, stalled):
    """Two caches on one folder (as two workers): the first holds the entry's lock (its heartbeat keeps it fresh)
    while its server stalls for 8 s before answering, or sends 64 kB every 0.3 s. The second, with
    ``lock_idle_s`` 1, gives up on the stalled holder within seconds, naming why, but keeps waiting for the one
    that progresses and then finds its entry."""
    route = ({"delay_s": 8.0} if stalled else {"chunk_size": 65_536, "chunk_delay_s": 0.3})
    server.route("/held.safetensors", body=BIG, **route)
    url = server.url("/held.safetensors")
    holder = LoraCache(cache_settings(tmp_path / "cache", read_timeout_s=15, download_retries=0, heartbeat_s=0.2))
    results: dict[str, object] = {}
    thread = threading.Thread(target=lambda: results.setdefault("holder", holder.resolve(LoraRequest(0, url))))
    thread.start()
    lock = tmp_path / "cache" / ".locks" / f"{LoraRequest(0, url).cache_key}.lock"
    deadline = time.monotonic() + 10
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    waiter = LoraCache(cache_settings(tmp_path / "cache", lock_idle_s=1.0, lock_stale_s=60))
    start = time.monotonic()
    try:
        if stalled:
            with pytest.raises(LoraError, match="its download made no progress for 1 s; try again later"):
                waiter.resolve(LoraRequest(0, url))
            assert time.monotonic() - start < 5
        else:
            resolved = waiter.resolve(LoraRequest(0, url))
            assert resolved.cache_hit and resolved.path.read_bytes() == BIG and time.monotonic() - start > 2
    finally:
        thread.join(30)
    assert results["holder"].path.read_bytes() == BIG and server.count("/held.safetensors") == 1
