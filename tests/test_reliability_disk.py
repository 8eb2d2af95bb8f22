"""A full or read-only LoRA cache folder, made for real on any machine, as root or not, without mounts:

- full: the worker's own file size limit (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored) makes every write past N bytes
  fail with ``EFBIG`` in the kernel, exactly where a full volume fails with ``ENOSPC``;
- read-only: ``chmod`` on the folder tree, and a worker subprocess that (when root) has dropped the capabilities
  that would let it ignore file modes (``tests.support.servers.job_runner --no-dac-override``).

The LoRA job fails with an error naming the LoRA and the disk problem, nothing broken is left in the cache, LoRAs
already there (or small enough) still work, and jobs without LoRAs return their reference bytes.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sdxl_worker.request.entries import LoraRequest
from sdxl_worker.store.cache import LoraCache
from tests.support.cache_audit import cache_problems, entry_keys
from tests.support.factories import FAULT_TIMINGS, cache_settings
from tests.support.servers.fault_http import FaultServer
from tests.support.worker_env import PROJECT_ROOT, PYTHON, images_of, run_through_sdk, small_job, subprocess_env

FILE_LIMIT = 1_000_000  # the small LoRA (60 kB) fits, the big one (3.2 MB) does not; this process's logs fit too


def job(loras: list | None = None) -> dict:
    return small_job(seed=71, num_inference_steps=1, **({"loras": loras} if loras else {}))


@pytest.fixture(scope="module")
def server(lora_blobs):
    with FaultServer() as running:
        for name in ("small", "style", "big"):
            running.route(f"/{name}.safetensors", body=lora_blobs[name])
        yield running


@pytest.fixture(scope="module")
def references(make_handler, tmp_path_factory, server) -> dict[str, list[str]]:
    """Images of the jobs below from a worker with a healthy cache."""
    handler = make_handler(cache_settings(tmp_path_factory.mktemp("healthy-cache"), **FAULT_TIMINGS))
    return {name: images_of(run_through_sdk(handler, job(loras))) for name, loras in (
        ("plain", None), ("small", [server.url("/small.safetensors")]), ("big", [server.url("/big.safetensors")]))}


@contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes past ``max_bytes`` in any file fail with EFBIG in this process (as a full disk fails with ENOSPC)."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_cache_fails_the_lora_job_clearly_and_the_worker_keeps_serving(make_handler, tmp_path, server,
                                                                              references):
    root = tmp_path / "cache"
    handler = make_handler(cache_settings(root, **FAULT_TIMINGS))
    with file_size_limit(FILE_LIMIT):
        with pytest.raises(OSError, match="File too large"):  # the control: the kernel enforces the limit here
            (tmp_path / "probe").write_bytes(bytes(FILE_LIMIT + 1))
        result = run_through_sdk(handler, job([{"path": server.url("/big.safetensors"), "name": "big"}]))
        plain = run_through_sdk(handler, job())
        small = run_through_sdk(handler, job([server.url("/small.safetensors")]))
    assert result["error"] == (f"loras[0] (big): the LoRA cache folder {root} cannot store a file this large (a "
                               "file size limit of the volume or the process): File too large; free space on the "
                               "volume or set LORA_CACHE_MAX_GB below its size")
    assert images_of(plain) == references["plain"]
    assert images_of(small) == references["small"]
    assert entry_keys(root) == [LoraRequest(0, server.url("/small.safetensors")).cache_key]
    assert cache_problems(root) == []
    assert images_of(run_through_sdk(handler, job([server.url("/big.safetensors")]))) == references["big"]
    assert cache_problems(root) == [] and len(entry_keys(root)) == 2


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {str(path.relative_to(root)): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else None)
            for path in sorted(root.rglob("*"))}


def _set_modes(root: Path, folder_mode: int, file_mode: int) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(folder_mode if path.is_dir() else file_mode)


def test_a_read_only_cache_serves_what_it_holds_and_refuses_new_loras_clearly(tmp_path, server, references,
                                                                              lora_blobs):
    """A worker started on a read-only volume (its internal folders never created) still serves plain jobs, a
    downloaded entry and a hand-placed file, and names the folder when a LoRA would need a download."""
    root = tmp_path / "cache"
    LoraCache(cache_settings(root, **FAULT_TIMINGS)).resolve(LoraRequest(0, server.url("/small.safetensors")))
    (root / "placed.safetensors").write_bytes(lora_blobs["small"])
    for internal in (".locks", ".leases"):
        (root / internal).rmdir()
    jobs = [job(), job([server.url("/small.safetensors")]), job(["placed.safetensors"]),
            job([{"path": server.url("/style.safetensors"), "name": "style"}]), job()]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    before = _tree(root)
    _set_modes(root, 0o555, 0o444)
    try:
        done = subprocess.run([PYTHON, "-m", "tests.support.servers.job_runner", str(tmp_path / "jobs.json"),
                               str(tmp_path / "out.json"), "--no-dac-override"], cwd=PROJECT_ROOT,
                              env=subprocess_env(root), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _tree(root) == before
    finally:
        _set_modes(root, 0o755, 0o644)
    plain, downloaded, placed, refused, plain_again = json.loads((tmp_path / "out.json").read_text())
    assert images_of(plain) == images_of(plain_again) == references["plain"]
    assert images_of(downloaded) == images_of(placed) == references["small"]
    assert refused["error"] == (f"loras[0] (style): the LoRA cache folder {root} is not writable: Permission denied; "
                                "check LORA_CACHE_DIR and how the volume is mounted")
    assert "LoRA cache not ready" in done.stderr
    assert cache_problems(root) == []
