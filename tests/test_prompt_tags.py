"""``<lora:NAME:WEIGHT>`` prompt tags, ``LORA_ALIASES`` and trigger words at the validation level: accepted forms, the
prompt the model sees, the conflict rule, and every problem named with its field and tag."""

from __future__ import annotations

import json

import pytest

from sdxl_worker.errors import InputError
from sdxl_worker.request.aliases import load_aliases, shown_aliases
from sdxl_worker.request.prompt_tags import extract_lora_tags, with_trigger_words
from sdxl_worker.request.validation import JobParams, validate_job_input

ALIASES = {
    "pixel": {"path": "nerijs/pixel-art-xl", "weight_name": "pixel-art-xl.safetensors", "scale": 0.8},
    "film": "https://example.com/loras/film-grain.safetensors?token=SECRET",
    "mine": "my-style.safetensors",
}


@pytest.fixture(scope="module")
def aliases():
    return load_aliases(json.dumps(ALIASES))


def validated(aliases, **fields) -> JobParams:
    return validate_job_input({"prompt": "a cat", **fields}, max_loras=8, aliases=aliases)


def error_of(aliases, **fields) -> str:
    with pytest.raises(InputError) as caught:
        validated(aliases, **fields)
    return str(caught.value)


@pytest.mark.parametrize("prompt, seen", [
    ("a cat, <lora:x:0.8>", "a cat"),
    ("<lora:x>, a cat", "a cat"),
    ("a <lora:x> cat", "a cat"),
    ("a cat,<lora:x>,snow", "a cat,snow"),
    ("pixel art,\n <LoRA: x : -0.5 >\tcabin", "pixel art, cabin"),
    ("a , <lora:x> , <lyco:y:1>, b", "a, b"),
    ("<lora:x>", ""),
])
def test_tags_are_removed_and_the_prompt_tidied(prompt, seen):
    errors: list[str] = []
    assert extract_lora_tags(prompt, errors)[0] == seen and errors == []


def test_a_prompt_without_tags_is_untouched_byte_for_byte():
    prompt = "  a cat ,, in  the\nsnow <3 (masterpiece:1.2) "
    assert extract_lora_tags(prompt, [])[0] == prompt
    assert validated({}, prompt=prompt).prompt == prompt


def test_weights_default_to_the_alias_scale_then_one(aliases):
    params = validated(aliases, prompt="a cat <lora:pixel> <lora:pixel-2> <lora:mine:-1.5> <LORA:other.safetensors:2>")
    assert params.prompt == "a cat"
    assert [(r.source, r.scale, r.name, r.origin) for r in params.loras] == [
        ("nerijs/pixel-art-xl", 0.8, "pixel", "prompt <lora:pixel>"),
        ("pixel-2", 1.0, None, "prompt <lora:pixel-2>"),
        ("my-style.safetensors", -1.5, "mine", "prompt <lora:mine:-1.5>"),
        ("other.safetensors", 2.0, None, "prompt <LORA:other.safetensors:2>")]
    assert params.loras[0].weight_name == "pixel-art-xl.safetensors" and params.loras[0].ref == "prompt <lora:pixel>"


@pytest.mark.parametrize("tag, scales", [
    # A1111's extra_networks_lora.py: te = positional[1] (default 1.0), te= overrides; unet = positional[2], else
    # te, unet= overrides.
    ("<lora:x:0.7>", (0.7, 0.7)),
    ("<lora:x:0.25:0.75>", (0.75, 0.25)),
    ("<lora:x:te=0.5:unet=1.0>", (1.0, 0.5)),
    ("<lora:x: unet = 1.5 : te = 0 >", (1.5, 0.0)),
    ("<lora:x:te=0.5>", (0.5, 0.5)),
    ("<lora:x:unet=0.5>", (0.5, 1.0)),
    ("<lora:x:0.3:unet=0>", (0.0, 0.3)),
    ("<lora:pixel:unet=0.5>", (0.5, 0.8)),  # the omitted te weight is the alias's default, as 1.0 is in A1111
])
def test_tags_give_the_text_encoders_and_the_unet_a1111s_weights(aliases, tag, scales):
    (request,) = validated(aliases, prompt=f"a cat {tag}").loras
    assert (request.scale, request.te_scale) == scales


def test_an_alias_te_scale_is_the_default_of_a_tag_without_weights():
    aliases = {"px": {"path": "x.safetensors", "scale": 0.6, "te_scale": 0.2}}
    (request,) = validated(aliases, prompt="a <lora:px>").loras
    assert (request.scale, request.te_scale) == (0.6, 0.2)
    (request,) = validated(aliases, prompt="a <lora:px:unet=1>").loras
    assert (request.scale, request.te_scale) == (1.0, 0.2)


def test_list_entries_come_first_and_tags_are_numbered_after_them(aliases):
    params = validated(aliases, prompt="<lora:pixel:0.5> a cat", loras=["film", {"path": "mine", "scale": 0.3}])
    assert [(r.index, r.ref, r.label, r.scale) for r in params.loras] == [
        (0, "loras[0]", "film", 1.0), (1, "loras[1]", "mine", 0.3), (2, "prompt <lora:pixel:0.5>", "pixel", 0.5)]
    assert params.loras[0].source.startswith("https://example.com/") and params.loras[0].kind == "url"


def test_alias_entries_keep_the_job_entry_keys_over_the_alias_ones(aliases):
    (request,) = validated(aliases, loras=[{"path": "pixel", "scale": 0.1, "name": "px", "revision": "v2"}]).loras
    assert (request.source, request.scale, request.name, request.revision, request.weight_name) == (
        "nerijs/pixel-art-xl", 0.1, "px", "v2", "pixel-art-xl.safetensors")


@pytest.mark.parametrize("fields, fragment", [
    ({"prompt": "a <lora:x:1:0.5:8>"}, "prompt: <lora:x:1:0.5:8>: a dynamic rank (dyn=, a fourth part) is not"),
    ({"prompt": "a <lora:x:te=1:dyn=8>"}, "prompt: <lora:x:te=1:dyn=8>: a dynamic rank"),
    ({"prompt": "a <lora:x:0.5:te=1>"}, "prompt: <lora:x:0.5:te=1>: the te weight is given twice"),
    ({"prompt": "a <lora:x:clip=1>"}, "prompt: <lora:x:clip=1>: unknown weight name(s) clip (use te= and unet=)"),
    ({"prompt": "a <lora:x:1:unet=big>"}, "prompt: <lora:x:1:unet=big>: the weight must be a number"),
    ({"prompt": "a <lora:x:strong>"}, "prompt: <lora:x:strong>: the weight must be a number with |weight| <= 10"),
    ({"prompt": "a <lora:x:11>"}, "prompt: <lora:x:11>: the weight must be"),
    ({"prompt": "a <lora:x:1_0>"}, "prompt: <lora:x:1_0>: the weight must be"),
    ({"prompt": "a <lora::1>"}, "prompt: <lora::1>: the tag names no LoRA"),
    ({"prompt": "a <hypernet:x:1>"}, "prompt: <hypernet:x:1>: only <lora:NAME> and <lora:NAME:WEIGHT> tags"),
    ({"prompt": "a <lora:owner/repo:1>"}, "prompt: <lora:owner/repo:1>: a tag names an alias (LORA_ALIASES) or a file"),
    ({"prompt": "a <lora:..:1>"}, "prompt: <lora:..:1>: a tag names an alias"),
    ({"prompt": "a cat", "negative_prompt": "blurry <lora:x:1>"},
     "negative_prompt: <lora:x:1>: LoRA tags are read in prompt only"),
])
def test_bad_tags_are_errors_naming_the_field_and_the_tag(aliases, fields, fragment):
    assert fragment in error_of(aliases, **fields)


def test_the_same_lora_in_a_tag_and_the_list_is_an_error_whatever_the_spelling(aliases):
    assert "prompt: <lora:film:0.5>: the same LoRA as loras[0]; name it once, in loras or in the prompt" in error_of(
        aliases, prompt="<lora:film:0.5>", loras=["https://EXAMPLE.com/loras/film-grain.safetensors"])
    assert "prompt: <lora:my-style>: the same LoRA as loras[0]" in error_of(
        aliases, prompt="<lora:my-style>", loras=["mine"])
    assert "prompt: <lora:pixel:0.2>: the same LoRA as <lora:pixel>" in error_of(
        aliases, prompt="<lora:pixel> <lora:pixel:0.2>")


def test_tags_and_list_share_the_per_request_limit_and_all_problems_come_at_once(aliases):
    message = error_of(aliases, prompt="<lora:a> <lora:b> <lora:c> <lora:d:x>", loras=[f"{n}.pt" for n in range(6)],
                       width=1001)
    assert "prompt: 3 LoRA tag(s) and 6 loras entries make more than 8 LoRAs" in message
    assert "width: must be" in message and "<lora:d:x>: the weight must be" in message
    assert len(validated(aliases, prompt="<lora:a> <lora:b>", loras=[f"{n}.pt" for n in range(6)]).loras) == 8


def test_append_trigger_words_is_a_boolean_defaulting_to_false(aliases):
    assert validated(aliases).append_trigger_words is False
    assert validated(aliases, append_trigger_words=True).append_trigger_words is True
    assert "append_trigger_words: must be true or false, got 'yes'" in error_of(aliases, append_trigger_words="yes")
    assert "append_trigger_words" in error_of(aliases, append_trigger_words=1)


def test_with_trigger_words_appends_only_the_missing_words():
    assert with_trigger_words("a cat", ["ohwx", "pixel art"]) == "a cat, ohwx, pixel art"
    assert with_trigger_words("a cat, Pixel Art,", ["pixel art", "ohwx", "OHWX"]) == "a cat, Pixel Art, ohwx"
    assert with_trigger_words("ohwxy", ["ohwx"]) == "ohwxy, ohwx"  # a whole phrase, not a substring
    assert with_trigger_words("", ["ohwx"]) == "ohwx"
    assert with_trigger_words("ohwx cat", ["ohwx"]) == "ohwx cat"


# -- LORA_ALIASES --------------------------------------------------------------------------------------------------


def test_aliases_from_a_json_string_and_from_a_file_are_the_same(tmp_path, aliases):
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps(ALIASES))
    from_file = load_aliases(f"  {path}  ")
    assert dict(from_file) == dict(aliases) and load_aliases("") == {} and load_aliases(" ") == {}
    assert aliases["film"] == {"path": ALIASES["film"]} and aliases["pixel"]["scale"] == 0.8


def test_shown_aliases_never_carry_secret_query_parameters(aliases):
    shown = shown_aliases(aliases)
    assert "SECRET" not in json.dumps(shown)
    assert shown["film"]["path"] == "https://example.com/loras/film-grain.safetensors"


def test_a_civitai_url_alias_is_shown_without_the_token_pasted_into_it():
    pasted = "https://civitai.com/api/download/models/128713?type=Model&token=PASTED-SECRET-9"
    aliases = load_aliases(json.dumps({"civ": pasted}))
    assert shown_aliases(aliases) == {"civ": {"path": "https://civitai.com/api/download/models/128713?type=Model"}}


@pytest.mark.parametrize("value, fragment", [
    ("[1, 2]", "LORA_ALIASES: must be a JSON object mapping names to LoRA sources, got list"),
    ('{"a": ', "LORA_ALIASES: invalid JSON"),
    ("/nonexistent/aliases.json", "LORA_ALIASES: not a JSON object and not a readable file"),
    ('{"a/b": "x.safetensors"}', "LORA_ALIASES['a/b']: an alias name must have 1..100 characters without '/'"),
    ('{"px:1": "x.safetensors"}', "LORA_ALIASES['px:1']: an alias name"),
    ('{" px": "x.safetensors"}', "LORA_ALIASES[' px']: an alias name"),
    ('{"px": "ftp://host/x"}', "LORA_ALIASES['px']: unsupported URL scheme 'ftp'"),
    ('{"px": {"path": "x.safetensors", "scale": 99}}', "LORA_ALIASES['px'].scale: must be a number"),
    ('{"px": {"path": "x.safetensors", "colour": 1}}', "LORA_ALIASES['px']: unknown key(s) 'colour'"),
    ('{"px": 3}', "LORA_ALIASES['px']: must be a source string or an object with path and scale"),
])
def test_bad_aliases_stop_the_start_with_a_message_naming_the_variable(value, fragment):
    with pytest.raises(ValueError) as caught:
        load_aliases(value)
    assert fragment in str(caught.value)


def test_every_bad_alias_is_reported_at_once():
    with pytest.raises(ValueError) as caught:
        load_aliases(json.dumps({"a": "ftp://x/y", "b": {"scale": 1}, "ok": "x.pt"}))
    assert "LORA_ALIASES['a']" in str(caught.value) and "LORA_ALIASES['b'].path: required" in str(caught.value)
