"""Property-based tests over whole job inputs: wrong types, huge and negative numbers, NaN and infinities, unicode,
prompts up to and past the limit, thousands of LoRA entries, nested junk, unknown keys, inputs that are not objects.

Each drawn input knows which fields it spoiled. The worker (the SDK's ``run_job`` on an in-process ``Worker``) must
answer every one with either images or ``{"error": str}``; never a traceback or an "Internal error"; an invalid
input's error names every spoiled field, before any model work; a problem found past validation (a LoRA missing from
the cache, refused before any download; an ``image_url`` that is not one) names that field. After any input, a fixed
job returns its reference bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from schemas import INPUT_SCHEMA, MAX_PROMPT_CHARS, SCHEDULERS
from sdxl_worker.errors import InputError
from sdxl_worker.request.validation import validate_job_input
from tests.support.factories import FAULT_TIMINGS, cache_settings
from tests.support.worker_env import images_of, run_through_sdk, small_job

PLACED_LORA = "placed-style.safetensors"
REFERENCE_JOB = small_job(seed=91, num_inference_steps=1)


@dataclass
class Drawn:
    """A job input and what is wrong with it: fields refused by validation, and the one found later (if any)."""

    value: Any
    spoiled: set[str] = field(default_factory=set)
    late: str | None = None   # how the error of a problem found past validation starts


_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
_containers = st.one_of(st.booleans(), st.lists(_junk, max_size=3), st.dictionaries(st.text(max_size=5), _junk,
                                                                                   max_size=3))
_not_text = st.one_of(_containers, st.integers(), st.floats())
_not_a_number = st.one_of(st.text(max_size=20), _containers)
_bad_int = st.one_of(_not_a_number, st.none(), st.floats(), st.integers(max_value=-1),
                     st.integers(min_value=10**6), st.just(10**400), st.just(-(10**400)))
_bad_number = st.one_of(_not_a_number, st.sampled_from([math.nan, math.inf, -math.inf]),
                        st.floats(min_value=1e6, allow_infinity=False), st.just(10**400), st.just(-(10**400)))
_bad_float = st.none() | _bad_number
_unicode = "ünïcødé 🎨 \u200b\U0001F600 "
_text = st.text(max_size=300) | st.integers(0, MAX_PROMPT_CHARS).map(lambda n: (_unicode * n)[:n])
_prompt = _text.filter(lambda text: text.strip() != "")
_too_long = st.integers(MAX_PROMPT_CHARS + 1, 3 * MAX_PROMPT_CHARS).map(lambda n: "p" * n)

# (valid, invalid) per field; "valid" stays cheap on the tiny model: 64 or 72 pixels, 1-2 steps, 1-2 images.
FIELDS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "prompt": (_prompt, st.one_of(_not_text, st.none(), _too_long, st.sampled_from(["", "   ", "\n\t"]))),
    "negative_prompt": (st.none() | _text, _not_text | _too_long),
    "height": (st.sampled_from([64, 72]), st.one_of(_bad_int, st.sampled_from([0, 8, 63, 65, 100, 2056, 4096]))),
    "width": (st.sampled_from([64, 72]), st.one_of(_bad_int, st.sampled_from([0, 8, 63, 65, 100, 2056, 4096]))),
    "seed": (st.none() | st.integers(0, 2**63 - 1), st.one_of(_not_a_number, st.floats(), st.integers(max_value=-1),
                                                              st.integers(min_value=2**63))),
    "scheduler": (st.sampled_from(SCHEDULERS), st.one_of(st.text(max_size=30).filter(lambda t: t not in SCHEDULERS),
                                                       _not_text)),
    "num_inference_steps": (st.integers(1, 2), st.one_of(_bad_int, st.sampled_from([0, 151, 10**9]))),
    "refiner_inference_steps": (st.integers(1, 150), st.one_of(_bad_int, st.sampled_from([0, 151]))),
    "guidance_scale": (st.floats(0, 50) | st.integers(0, 50), st.one_of(_bad_float, st.floats(max_value=-1e-3))),
    "strength": (st.floats(0.01, 1.0), st.one_of(_bad_float, st.sampled_from([0, 0.0, -0.5, 1.01]))),
    "num_images": (st.integers(1, 2), st.one_of(_bad_int, st.sampled_from([0, 5, 100]))),
    "high_noise_frac": (st.none() | st.floats(0.01, 0.99), _bad_number | st.sampled_from([0.0, 1.0, 2.0])),
}
_cache_name = st.from_regex(r"[a-z][a-z0-9_-]{0,20}\.safetensors", fullmatch=True)
_lora_entry = st.one_of(
    st.just(PLACED_LORA),
    st.fixed_dictionaries({"path": st.just(PLACED_LORA)}, optional={
        "scale": st.floats(-10, 10) | st.integers(-10, 10), "name": st.text(min_size=1, max_size=40)}),
)
_bad_lora_entry = st.one_of(
    st.integers(), st.none(), st.lists(_junk, max_size=3), st.dictionaries(st.text(max_size=8), _junk, max_size=4)
    .filter(lambda entry: "path" not in entry),
    st.text(max_size=40).map(lambda text: "../" + text), st.text(max_size=40).map(lambda text: "file:///" + text),
    st.fixed_dictionaries({"path": st.just(PLACED_LORA), "scale": st.one_of(
        _not_a_number, st.sampled_from([math.nan, math.inf, -math.inf, 10.5, -11, 10**400]))}),
    st.fixed_dictionaries({"path": st.just(PLACED_LORA), "sha256": st.text(max_size=70)
                           .filter(lambda text: len(text) != 64)}),
    st.fixed_dictionaries({"path": st.just(PLACED_LORA), "extra": _junk}),
)


@st.composite
def job_inputs(draw) -> Drawn:
    """A job input that is clean (every field valid or absent, maybe a problem found only later: a third of them),
    spoiled (some fields invalid, maybe unknown keys), or not an object at all."""
    mode = draw(st.sampled_from(["clean", "spoiled", "spoiled", "not-an-object"]))
    if mode == "not-an-object":
        return Drawn(draw(st.one_of(st.lists(_junk, max_size=3), st.text(max_size=20), st.integers(), st.none(),
                                    st.floats())), {"input"})
    drawn = Drawn({})
    choices = ["valid", "valid", "absent"] + (["invalid"] if mode == "spoiled" else [])
    for name, (valid, invalid) in FIELDS.items():
        choice = draw(st.sampled_from(choices if name != "prompt" or mode == "spoiled" else ["valid"]))
        if choice == "valid":
            drawn.value[name] = draw(valid)
        elif choice == "invalid":
            drawn.value[name] = draw(invalid)
            drawn.spoiled.add(name)
        elif name == "prompt":
            drawn.spoiled.add(name)
    for name, cheap in (("num_inference_steps", 1), ("height", 64), ("width", 64)):
        drawn.value.setdefault(name, cheap)  # the defaults (25 steps, 1024 pixels) would make valid jobs slow
    _draw_loras(draw, drawn, spoiling=mode == "spoiled")
    _draw_image_url(draw, drawn, spoiling=mode == "spoiled")
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda key: key not in INPUT_SCHEMA), _junk,
                                 max_size=2 if mode == "spoiled" else 0))
    drawn.value.update(extra)
    drawn.spoiled.update(extra)
    return drawn


def _draw_loras(draw, drawn: Drawn, spoiling: bool) -> None:
    kinds = ["absent", "none", "valid", "valid", "missing"]
    kind = draw(st.sampled_from(kinds + (["spoiled", "spoiled", "thousands", "not-list"] if spoiling else [])))
    if kind == "none":
        drawn.value["loras"] = None
    elif kind == "valid":
        drawn.value["loras"] = [draw(_lora_entry)]
    elif kind == "missing":
        drawn.value["loras"] = [draw(_cache_name.filter(lambda name: name != PLACED_LORA))]
        drawn.late = "Invalid input: loras[0]: unknown LoRA"  # the worker's name check, before any download
    elif kind == "spoiled":
        good = draw(st.lists(_lora_entry, max_size=1))
        drawn.value["loras"] = good + draw(st.lists(_bad_lora_entry, min_size=1, max_size=4))
        drawn.spoiled.add("loras")
    elif kind == "thousands":
        count = draw(st.integers(9, 5000))
        drawn.value["loras"] = [{"path": f"{index}.safetensors", "scale": 0.5} for index in range(count)]
        drawn.spoiled.add("loras")
    elif kind == "not-list":
        drawn.value["loras"] = draw(st.one_of(st.text(max_size=20), st.integers(), st.booleans(),
                                              st.dictionaries(st.text(max_size=5), _junk, max_size=3)))
        drawn.spoiled.add("loras")


def _draw_image_url(draw, drawn: Drawn, spoiling: bool) -> None:
    kind = draw(st.sampled_from(["absent", "absent", "absent", "absent", "none", "junk"] + (["not-text"] * spoiling)))
    if kind == "none":
        drawn.value["image_url"] = None
    elif kind == "junk":  # strings pass validation; loading refuses them before any download or model work
        drawn.value["image_url"] = draw(st.one_of(
            st.text(max_size=40).map(lambda text: "x-" + text),
            st.sampled_from(["file:///etc/passwd", "ftp://example.com/a.png", "data:image/png;base64,!!!",
                             "data:image/png;base64,aGVsbG8=", "javascript:alert(1)", "http://169.254.169.254/x"])))
        drawn.late = drawn.late or "image_url"  # a LoRA missing from the cache is refused first, at validation
    elif kind == "not-text":
        drawn.value["image_url"] = draw(_not_text)
        drawn.spoiled.add("image_url")


def assert_names_every_spoiled_field(message: str, drawn: Drawn) -> None:
    assert message.startswith("Invalid input: "), message
    for name in drawn.spoiled:
        assert name in message, (name, message)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(job_inputs())
def test_validation_names_every_spoiled_field_and_accepts_the_rest(drawn):
    try:
        params = validate_job_input(drawn.value, max_loras=8)
    except InputError as error:
        assert drawn.spoiled, f"a valid input was refused: {error}"
        assert_names_every_spoiled_field(str(error), drawn)
    else:
        assert not drawn.spoiled, f"spoiled fields {drawn.spoiled} were accepted"
        assert params.prompt == drawn.value["prompt"]


@pytest.fixture(scope="module")
def worker(make_handler, tmp_path_factory, lora_blobs):
    """A worker whose cache holds one hand-placed LoRA; Hugging Face points at a closed local port (never used)."""
    root = tmp_path_factory.mktemp("input-cache")
    (root / PLACED_LORA).write_bytes(lora_blobs["small"])
    handler = make_handler(cache_settings(root, **FAULT_TIMINGS, hf_endpoint="http://127.0.0.1:9"))
    return handler, images_of(run_through_sdk(handler, REFERENCE_JOB))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(job_inputs())
def test_any_job_input_gets_images_or_an_error_naming_the_field_and_the_worker_stays_exact(worker, drawn):
    handler, reference = worker
    result = run_through_sdk(handler, drawn.value)
    if drawn.spoiled:
        event("refused by validation")
        assert set(result) == {"error"} and isinstance(result["error"], str), result
        assert_names_every_spoiled_field(result["error"], drawn)
        return
    if drawn.late:
        event(f"refused later: {drawn.late}")
        assert set(result) == {"error"} and result["error"].startswith(drawn.late), result
    else:
        event("generated" + (" with a LoRA" if drawn.value.get("loras") else ""))
        images = images_of(result)
        assert len(images) == drawn.value.get("num_images", 1)
    assert "Traceback" not in repr(result) and "Internal error" not in repr(result)
    assert images_of(run_through_sdk(handler, REFERENCE_JOB)) == reference
