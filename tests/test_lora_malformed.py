"""Hostile but parseable LoRA files and corrupt cache manifests (issue 18, items 3, 4, 5, 9), through a real worker.

Each bad file is written with safetensors/torch here, placed in a worker's cache by name (or downloaded from a real
HTTP server on 127.0.0.1), run as a job, listed and prefetched through the cache actions; after each, a good job
still returns its image.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdxl_worker.store.manifest import MANIFEST_NAME
from sdxl_worker.weights.metadata import MAX_METADATA_FIELDS, read_header_metadata
from tests.support.factories import cache_settings, make_worker
from tests.support.lora_forms import Factors, canonical_factors, kohya_state, write_kohya, write_peft_folder
from tests.support.servers.fault_http import FaultServer
from tests.support.worker_env import error_of, output_of, small_job

GOOD = "good.safetensors"


@pytest.fixture(scope="module")
def factors(tiny_model_dir) -> Factors:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    return canonical_factors(pipe, ("unet",), rank=4, seed=81)


def _first(factors: Factors) -> tuple[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]:
    return next(iter(factors.items()))


def _kohya_with(factors: Factors, change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], Path]:
    """A writer of the kohya file of ``factors`` after ``change`` edited its state in place."""
    def write(path: Path) -> Path:
        state = kohya_state(factors)
        change(state)
        save_file(state, str(path))
        return path
    return write


def _first_key(state: dict[str, torch.Tensor], suffix: str) -> str:
    return sorted(key for key in state if key.endswith(suffix))[0]


def _set(suffix: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(state: dict[str, torch.Tensor]) -> None:
        key = _first_key(state, suffix)
        state[key] = value(state[key])
    return change


def _rank_zero(state: dict[str, torch.Tensor]) -> None:
    down = _first_key(state, ".lora_down.weight")
    up = down.replace(".lora_down.", ".lora_up.")
    state[down], state[up] = state[down][:0].contiguous(), state[up][:, :0].contiguous()


def _huge(state: dict[str, torch.Tensor]) -> None:
    """Finite factors whose product overflows float32 (the tiny pipeline's dtype)."""
    for key in [key for key in state if key.endswith((".lora_down.weight", ".lora_up.weight"))]:
        state[key] = state[key].sign() * 1e20 + 1e20


def _peft_with(factors: Factors, **config: object) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        write_peft_folder(folder, factors)
        written = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**written, **config}))
        return folder
    return write


def _nan(tensor: torch.Tensor) -> torch.Tensor:
    changed = tensor.clone()
    changed.view(-1)[0] = math.nan
    return changed


BAD = {
    "nan-up.safetensors": (lambda f: _kohya_with(f, _set(".lora_up.weight", _nan)), "hold NaN or infinite values"),
    "inf-alpha.safetensors": (lambda f: _kohya_with(f, _set(".alpha", lambda a: torch.tensor(math.inf))),
                              "hold NaN or infinite values"),
    "nan-alpha.safetensors": (lambda f: _kohya_with(f, _set(".alpha", lambda a: torch.tensor(math.nan))),
                              "hold NaN or infinite values"),
    "overflow.safetensors": (lambda f: _kohya_with(f, _huge), "fusing gives NaN or infinite weights"),
    "vector-alpha.safetensors": (lambda f: _kohya_with(f, _set(".alpha", lambda a: torch.ones(3))),
                                 "malformed tensor(s)"),
    "rank-zero.safetensors": (lambda f: _kohya_with(f, _rank_zero), "malformed tensor(s)"),
    "scalar-down.safetensors": (lambda f: _kohya_with(f, _set(".lora_down.weight", lambda d: torch.tensor(1.0))),
                                "malformed tensor(s)"),
    "peft-r0": (lambda f: _peft_with(f, r=0), "adapter_config.json: r must be a positive integer, got 0"),
    "peft-r-string": (lambda f: _peft_with(f, r="4"), "r must be a positive integer, got '4'"),
    "peft-alpha-null": (lambda f: _peft_with(f, lora_alpha=None), "lora_alpha must be a finite number, got None"),
    "peft-rank-pattern-list": (lambda f: _peft_with(f, rank_pattern=["to_q"]),
                               "rank_pattern must map module names to positive integers"),
}


@pytest.fixture
def root(tmp_path, factors) -> Path:
    """A cache folder holding the good LoRA by name."""
    folder = tmp_path / "cache"
    folder.mkdir()
    write_kohya(folder / GOOD, factors)
    return folder


@pytest.fixture
def worker(worker_handler, root):
    return make_worker(cache_settings(root))


@pytest.fixture(scope="module")
def good_image(worker_handler, tmp_path_factory, factors) -> list:
    """The images of the good job on a fresh worker."""
    folder = tmp_path_factory.mktemp("reference")
    write_kohya(folder / GOOD, factors)
    return _good_image(make_worker(cache_settings(folder)))


def _good_image(worker) -> list:
    return output_of(worker, small_job(seed=5, loras=[GOOD]))["images"]


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_malformed_or_non_finite_lora_is_refused_by_name_and_the_worker_keeps_serving(worker, root, factors,
                                                                                       good_image, name):
    writer, fragment = BAD[name]
    writer(factors)(root / name)
    error = error_of(worker, small_job(seed=5, loras=[name]))
    assert error.startswith(f"loras[0] ({name}): "), error
    assert fragment in error and "Internal error" not in error and "Traceback" not in error, error
    assert _good_image(worker) == good_image


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_metadata_string_nested_100000_deep_costs_nothing_in_jobs_listings_and_prefetch(worker, root, factors,
                                                                                         good_image):
    name = "deep.safetensors"
    save_file(kohya_state(factors), str(root / name),
              metadata={"ss_tag_frequency": json.dumps({"set": {"deep": 1}})[:-2] + ', "x": ' + _nested(100_000)
                        + "}}", "ss_output_name": "deep"})
    for _ in range(2):  # the second job meets the entry cached in memory
        output = output_of(worker, small_job(seed=5, loras=[name]))
        assert output["loras"][0]["metadata"]["name"] == "deep"
    listing = output_of(worker, {"action": "list_loras"})
    listed = next(item for item in listing["hand_placed"] if item["name"] == name)
    assert listed["metadata"]["trigger_words"] == []
    prefetch = output_of(worker, {"action": "prefetch", "loras": [name]})
    assert prefetch["failed"] == 0, prefetch
    assert _good_image(worker) == good_image


def test_a_header_nested_deeper_than_safetensors_allows_is_not_parsed(worker, tmp_path, factors):
    path = write_kohya(tmp_path / "plain.safetensors", factors, metadata={"ss_output_name": "plain"})
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"]["ss_output_name"] = "plain"
    text = json.dumps(header)[:-1] + ', "junk": ' + _nested(100_000) + "}"
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(len(text).to_bytes(8, "little") + text.encode() + data[8 + length:])
    assert read_header_metadata(path) == {"ss_output_name": "plain"}
    assert read_header_metadata(bomb) == {}


def test_millions_of_metadata_keys_are_bounded(tmp_path, factors):
    many = tmp_path / "many.safetensors"
    save_file(kohya_state(factors), str(many), metadata={f"k{i}": "" for i in range(300_000)})
    start = time.perf_counter()
    assert read_header_metadata(many) == {}
    assert time.perf_counter() - start < 5
    some = tmp_path / "some.safetensors"
    save_file(kohya_state(factors), str(some), metadata={f"k{i}": "v" for i in range(MAX_METADATA_FIELDS + 500)})
    assert len(read_header_metadata(some)) == MAX_METADATA_FIELDS


@pytest.fixture
def server(factors, tmp_path):
    path = write_kohya(tmp_path / "served.safetensors", factors)
    with FaultServer() as running:
        running.route("/served.safetensors", body=path.read_bytes())
        yield running


@pytest.mark.parametrize("field, value", [("last_used_at", "yesterday"), ("path", "."), ("size", "12"),
                                          ("trigger_words", "a, b"), ("downloaded_at", None), ("key", 7)])
def test_a_manifest_field_of_the_wrong_type_makes_the_entry_corrupt_not_an_internal_error(
        worker_handler, tmp_path, server, field, value):
    root = tmp_path / "cache"
    worker = make_worker(cache_settings(root))
    url = server.url("/served.safetensors")
    first = output_of(worker, small_job(seed=6, loras=[url]))
    (entry,) = [child for child in root.iterdir() if (child / MANIFEST_NAME).is_file()]
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    (entry / MANIFEST_NAME).write_text(json.dumps({**manifest, field: value}))

    listing = output_of(worker, {"action": "list_loras"})
    assert listing["entries"] == []
    again = output_of(worker, small_job(seed=6, loras=[url]))
    assert again["loras"][0]["cache_hit"] is False and again["images"] == first["images"]
    assert server.count("/served.safetensors") == 2
    assert [item["key"] for item in output_of(worker, {"action": "list_loras"})["entries"]] == [entry.name]

    (entry / MANIFEST_NAME).write_text(json.dumps({**manifest, field: value}))
    prefetch = output_of(worker, {"action": "prefetch", "loras": [url]})
    assert prefetch["downloaded"] == 1 and prefetch["failed"] == 0, prefetch
