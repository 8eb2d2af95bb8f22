"""The ``loras`` list of a job: accepted forms, every malformed entry named by index and field, all at once."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_worker.request.entries import LoraRequest, parse_lora_requests, source_kind

SHA = "AB" * 32


def parsed(raw, max_per_request: int = 8) -> list[LoraRequest]:
    requests, errors = parse_lora_requests(raw, max_per_request)
    assert errors == []
    return requests


def errors_of(raw, max_per_request: int = 8) -> list[str]:
    requests, errors = parse_lora_requests(raw, max_per_request)
    assert errors and requests == []
    return errors


def test_string_forms_are_civitai_url_hf_repo_or_cache_name():
    requests = parsed(["https://civitai.com/api/download/models/123", "https://example.com/x.safetensors",
                       "owner/repo.v2", "my_style.safetensors"])
    assert [request.kind for request in requests] == ["civitai", "url", "hf", "cache"]
    assert [request.index for request in requests] == [0, 1, 2, 3]
    assert all(request.scale == 1.0 for request in requests)


def test_dict_form_with_every_field():
    (request,) = parsed([{"path": " owner/repo ", "scale": -0.5, "weight_name": "sub/x.safetensors",
                          "revision": "v1.0", "sha256": SHA, "name": "style"}])
    assert request == LoraRequest(index=0, source="owner/repo", scale=-0.5, weight_name="sub/x.safetensors",
                                  revision="v1.0", sha256=SHA.lower(), name="style")
    assert request.label == "style"


def test_te_scale_is_the_text_encoders_strength_and_defaults_to_scale():
    plain, split, off = parsed([{"path": "a.safetensors", "scale": 0.4}, {"path": "b.safetensors", "te_scale": 0},
                                {"path": "c.safetensors", "scale": 0, "te_scale": 0}])
    assert (plain.scale, plain.te_scale, plain.is_off) == (0.4, 0.4, False)
    assert (split.scale, split.te_scale, split.is_off) == (1.0, 0.0, False)
    assert off.is_off


@pytest.mark.parametrize("te_scale", ["abc", True, math.nan, 10.5])
def test_bad_te_scale_is_named_with_index_and_field(te_scale):
    (error,) = errors_of([{"path": "c.safetensors", "te_scale": te_scale}])
    assert error.startswith("loras[0].te_scale: must be a number with |scale| <= 10, got ")


@pytest.mark.parametrize("scale", [0, 10, -10, 2.5])
def test_scale_bounds_are_inclusive(scale):
    (request,) = parsed([{"path": "a.safetensors", "scale": scale}])
    assert request.scale == float(scale) and isinstance(request.scale, float)


@pytest.mark.parametrize("scale", ["abc", True, None, math.nan, math.inf, 10.01, -11, [1], 10**400])
def test_bad_scale_is_named_with_index_and_field(scale):
    (error,) = errors_of(["a.safetensors", "b.safetensors", {"path": "c.safetensors", "scale": scale}])
    assert error.startswith("loras[2].scale: must be a number with |scale| <= 10, got ")


def test_the_documented_error_text():
    assert errors_of([{"path": "a.safetensors", "scale": "abc"}]) == [
        "loras[0].scale: must be a number with |scale| <= 10, got 'abc'"]


def test_all_problems_are_reported_at_once():
    errors = errors_of([
        {"path": "ftp://host/x.safetensors"},
        {"path": "a.safetensors", "colour": "red"},
        {"scale": 1},
        42,
        {"path": "b.safetensors", "sha256": "xyz"},
        {"path": "a/b/c"},
    ])
    text = "\n".join(errors)
    for fragment in ("loras[0].path: unsupported URL scheme 'ftp'", "loras[1]: unknown key(s) 'colour'",
                     "loras[2].path: required", "loras[3]: must be a source string", "loras[4].sha256",
                     "loras[5].path: must be an http(s) URL, a Hugging Face repo"):
        assert fragment in text
    assert len(errors) == 6


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://example.com/x", "gopher://x/y", "../secret",
                                    "/etc/passwd", ".locks", "a\0b", "..", "", "   ", "owner/../repo",
                                    "http://"])
def test_unsafe_or_unknown_sources_are_refused_before_any_download(source):
    (error,) = errors_of([source])
    assert error.startswith("loras[0]")


def test_weight_name_and_revision_only_apply_to_hf_repos():
    errors = errors_of([{"path": "https://x.example/a.safetensors", "revision": "main"},
                        {"path": "a.safetensors", "weight_name": "b.safetensors"}])
    assert errors == ["loras[0].revision: only applies to Hugging Face repos ('owner/repo')",
                      "loras[1].weight_name: only applies to Hugging Face repos ('owner/repo')"]


@pytest.mark.parametrize("weight_name", ["../x.safetensors", "/abs.safetensors", "a//b", "a\\b", ""])
def test_weight_name_must_stay_inside_the_repo(weight_name):
    (error,) = errors_of([{"path": "owner/repo", "weight_name": weight_name}])
    assert error.startswith("loras[0].weight_name")


def test_too_many_entries_is_one_error_about_the_count():
    assert errors_of(["x.safetensors"] * 5000) == [
        "loras: at most 8 LoRAs per request (LORA_MAX_PER_REQUEST), got 5000"]
    assert len(parsed([f"{n}.safetensors" for n in range(3)], max_per_request=3)) == 3


@pytest.mark.parametrize("raw", ["x.safetensors", 3, {"path": "x"}, True])
def test_not_a_list_is_one_error(raw):
    assert errors_of(raw) == [(f"loras: must be a list of LoRA sources or objects with path and scale, got "
                              f"{type(raw).__name__}")]


def test_none_means_no_loras():
    assert parse_lora_requests(None, 8) == ([], [])


def test_same_source_twice_is_an_error_after_normalization():
    errors = errors_of(["HTTPS://Example.com:443/a.safetensors?token=one",
                        {"path": "https://example.com/a.safetensors?token=two", "scale": 0.3}])
    assert errors == ["loras[1]: the same LoRA as loras[0] (same source, weight_name and revision)"]
    assert errors_of(["Owner/Repo", "owner/repo"])[0].startswith("loras[1]: the same LoRA as loras[0]")


def test_same_repo_with_other_weight_name_or_revision_is_allowed():
    requests = parsed(["owner/repo", {"path": "owner/repo", "weight_name": "b.safetensors"},
                       {"path": "owner/repo", "revision": "v2"}])
    assert len({request.cache_key for request in requests}) == 3


def test_cache_key_ignores_secret_query_parameters_but_not_others():
    base = LoraRequest(0, "https://example.com/download/1?type=Model&token=a")
    assert base.cache_key == LoraRequest(0, "https://example.com/download/1?type=Model&token=b").cache_key
    assert base.cache_key != LoraRequest(0, "https://example.com/download/1?type=VAE").cache_key
    assert len(base.cache_key) == 32 and int(base.cache_key, 16) >= 0


def test_labels_are_short_and_never_show_query_strings():
    assert LoraRequest(0, "https://civitai.com/api/download/models/77?token=SECRET").label == \
        "civitai.com/api/download/models/77"
    assert LoraRequest(0, "https://user:pw@example.com/" + "d" * 100 + "/x.safetensors").label.endswith(
        "x.safetensors")
    assert "pw" not in LoraRequest(0, "https://user:pw@example.com/x.safetensors").label
    assert LoraRequest(0, "owner/repo", weight_name="a.safetensors").label == "owner/repo:a.safetensors"


def test_errors_never_show_a_token_in_a_url():
    (error,) = errors_of([{"path": "https://example.com/a.safetensors?token=SECRET123", "scale": "x"}])
    assert "loras[0].scale" in error
    errors = errors_of([{"path": "https://example.com/a?token=SECRET123", "revision": "main", "bogus": 1}])
    assert "SECRET123" not in "".join(errors)


@pytest.mark.parametrize("source, kind", [("https://a.b/c", "url"), ("http://1.2.3.4/x", "url"),
                                          ("a-b/c_d.e", "hf"), ("x.pt", "cache"), ("entry", "cache")])
def test_source_kind(source, kind):
    assert source_kind(source) == kind


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_entry = st.one_of(_json, st.fixed_dictionaries({"path": _json}, optional={
    "scale": _json, "weight_name": _json, "revision": _json, "sha256": _json, "name": _json, "extra": _json}))


@settings(max_examples=150, deadline=None)
@given(st.one_of(_json, st.lists(_entry, max_size=10)))
def test_any_json_value_gives_requests_or_errors_and_never_raises(raw):
    requests, errors = parse_lora_requests(raw, 8)
    assert all(isinstance(error, str) and error.startswith("loras") for error in errors)
    assert not (requests and errors)
    for request in requests:
        assert abs(request.scale) <= 10 and request.kind in ("civitai", "url", "hf", "cache")
        assert len(request.cache_key) == 32 and request.label


# -- Civitai forms ---------------------------------------------------------------------------------------------------

CIVITAI_FORMS = ["civitai:368189", "urn:air:sdxl:lora:civitai:328553@368189",
                 "URN:AIR:pony:lycoris:civitai:328553@368189.safetensors",
                 "https://civitai.com/api/download/models/368189",
                 "https://civitai.com/api/download/models/368189?type=Model&format=SafeTensor&token=SECRET9",
                 "https://www.civitai.com/models/328553/pixel-style?modelVersionId=368189",
                 "https://civitai.green/models/328553?modelVersionId=368189"]


@pytest.mark.parametrize("source", CIVITAI_FORMS)
def test_every_civitai_form_names_the_version_and_shares_its_cache_key(source):
    (request,) = parsed([source])
    assert request.kind == "civitai" and request.identity == ("civitai", "368189", "", "")
    assert request.cache_key == LoraRequest(0, "civitai:368189").cache_key
    assert "SECRET9" not in request.label and request.label


def test_two_forms_of_one_civitai_version_in_a_job_are_the_same_lora():
    errors = errors_of(["civitai:368189", {"path": "urn:air:sdxl:lora:civitai:328553@368189", "scale": 0.5}])
    assert errors == ["loras[1]: the same LoRA as loras[0] (same source, weight_name and revision)"]
    assert len(parsed(["civitai:368189", "civitai:368190"])) == 2


@pytest.mark.parametrize("source, fragment", [
    ("civitai:abc", "'civitai:' must name a model version id"),
    ("civitai:0", "'civitai:' must name a model version id"),
    ("urn:air:sd1:lora:civitai:1@2", "the AIR is for the 'sd1' ecosystem"),
    ("urn:air:flux1:lora:civitai:1@2", "the AIR is for the 'flux1' ecosystem"),
    ("urn:air:sdxl:checkpoint:civitai:1@2", "the AIR names a 'checkpoint', not a LoRA"),
    ("urn:air:sdxl:lora:huggingface:1@2", "only Civitai AIRs"),
    ("urn:air:sdxl:lora:civitai:328553", "must name a model version id"),
    ("urn:air:sdxl:lora", "not a valid AIR"),
    ("https://civitai.com/models/328553/pixel-style", "must include ?modelVersionId="),
    ("https://civitai.com/models/328553?modelVersionId=x", "modelVersionId must name a model version id"),
    ("https://civitai.com/api/download/models/1?type=Training%20Data", "must point to the model file (type=Model)"),
])
def test_malformed_civitai_sources_are_named_before_any_download(source, fragment):
    (error,) = errors_of([{"path": source, "name": "x"}])
    assert error.startswith("loras[0].path: ") and fragment in error


def test_other_civitai_paths_and_lookalike_hosts_stay_plain_urls():
    assert source_kind("https://civitai.com/images/12345") == "url"
    assert source_kind("https://civitai.com.evil.org/api/download/models/1") == "url"
    assert source_kind("https://evilcivitai.com/models/1?modelVersionId=2") == "url"


def test_weight_name_and_revision_do_not_apply_to_civitai_sources():
    assert errors_of([{"path": "civitai:5", "revision": "main"}]) == [
        "loras[0].revision: only applies to Hugging Face repos ('owner/repo')"]
