"""The README's examples of prompt tags, aliases, metadata and cache actions, run as written.

Every JSON block preceded by ``<!-- example: request NAME -->`` is sent to a worker, in README order, through the
runpod SDK's ``run_job``; the block marked ``response NAME`` must describe the answer: the same keys (all of them
for actions and errors, a subset for generation outputs, which the README abridges), the same values for the keys
whose values are stable (labels, statuses, prompts, errors, ...), the same types for the others. The aliases block
is the worker's ``LORA_ALIASES``; the Hugging Face repos the examples name are served by a local Hub.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_worker.request.aliases import load_aliases
from tests.support.factories import cache_settings, make_worker
from tests.support.lora_forms import canonical_factors, write_kohya
from tests.support.servers.fake_hub import FakeHub
from tests.support.worker_env import PROJECT_ROOT, run_through_sdk

EXAMPLE = re.compile(r"<!-- example: (?P<role>aliases|request|response)(?: (?P<name>[\w-]+))? -->\n```json\n"
                     r"(?P<body>.*?)\n```", re.DOTALL)
EXACT = {"action", "prompt", "seed", "label", "scale", "source", "file", "status", "entry", "key", "name", "kind",
         "base_model", "trigger_words", "weight_name", "path", "in_use", "reason", "error", "downloaded", "cached",
         "failed", "evicted", "user_entries"}
ALL = ("unet", "text_encoder", "text_encoder_2")


def readme_examples() -> list[tuple[str, str | None, object]]:
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    return [(match["role"], match["name"], json.loads(match["body"])) for match in EXAMPLE.finditer(text)]


def assert_documented(documented, actual, strict: bool, key: str = "output") -> None:
    """``actual`` has the documented shape: keys, exact values for ``EXACT`` keys, types for the others."""
    where = f"{key}: documented {documented!r:.80}, got {actual!r:.200}"
    if key in EXACT:
        assert documented == actual, where
    elif isinstance(documented, dict):
        assert isinstance(actual, dict), where
        if strict and key != "timings":
            assert set(documented) == set(actual), where
        assert set(documented) <= set(actual), where
        for name, value in documented.items():
            assert_documented(value, actual[name], strict, name)
    elif isinstance(documented, list):
        assert isinstance(actual, list) and len(actual) == len(documented), where
        for item, got in zip(documented, actual):
            assert_documented(item, got, strict, key)
    elif documented is None or isinstance(documented, (bool, str)):
        assert type(actual) is type(documented), where
    else:
        assert isinstance(actual, (int, float)) and not isinstance(actual, bool), where


@pytest.fixture(scope="module")
def readme_worker(pipes, tmp_path_factory, tiny_model_dir):
    """A worker whose cache, aliases and Hub hold exactly what the README's examples assume."""
    folder = tmp_path_factory.mktemp("readme")
    cache = folder / "loras"
    cache.mkdir()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    unet = canonical_factors(pipe, ("unet",), rank=4, seed=81)
    pixel = write_kohya(folder / "pixel-art-xl.safetensors", unet, {
        "ss_output_name": "pixel-art-xl", "ss_base_model_version": "sdxl_base_v1-0",
        "ss_tag_frequency": json.dumps({"20_pixel": {"pixel art": 20, "pixelated": 6}})})
    watercolor = write_kohya(folder / "watercolor.safetensors", canonical_factors(pipe, ("unet",), 4, 82), {
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.title": "Watercolor Style",
        "modelspec.trigger_phrase": "watercolor style"})
    write_kohya(cache / "my-style.safetensors", canonical_factors(pipe, ALL, rank=4, seed=83))
    write_kohya(cache / "old-sd15-style.safetensors", unet, {"ss_base_model_version": "sd_v1",
                                                             "ss_output_name": "old-style"})
    (aliases_text,) = [json.dumps(body) for role, _, body in readme_examples() if role == "aliases"]
    with FakeHub() as hub:
        hub.add_repo("nerijs/pixel-art-xl", {"pixel-art-xl.safetensors": pixel.read_bytes()})
        hub.add_repo("ostris/watercolor_style_lora_sdxl", {"watercolor_v1_sdxl.safetensors": watercolor.read_bytes()})
        yield make_worker(cache_settings(cache, hf_endpoint=hub.endpoint, evict_grace_s=0),
                          aliases=load_aliases(aliases_text))


def test_the_readme_examples_run_as_written_and_answer_as_documented(readme_worker):
    examples = readme_examples()
    requests = [(name, body) for role, name, body in examples if role == "request"]
    responses = {name: body for role, name, body in examples if role == "response"}
    assert {"tags", "trigger-words", "prefetch", "list", "evict", "stats", "sd15"} <= set(responses)
    assert set(responses) <= {name for name, _ in requests}
    results = {}
    for name, job in requests:
        result = run_through_sdk(readme_worker.run, job["input"], job_id=f"readme-{name}")
        results[name] = result.get("output", result)
        if name in responses:
            is_action = "action" in job["input"] or "error" in result
            assert_documented(responses[name], results[name], strict=is_action, key=f"[{name}]")
    assert results["tags"]["images"] == results["same-as-tags"]["images"]
