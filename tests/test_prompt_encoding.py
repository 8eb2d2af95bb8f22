"""Long prompts, A1111 weights, BREAK and clip_skip: the parser against A1111's own examples, the embeddings against
diffusers' encoding and a reference of A1111's emphasis, and the images through the worker on the tiny SDXL."""

from __future__ import annotations

import pytest
import torch

from sdxl_worker.generation.prompt_encoding import (CHUNK_TOKENS, MAX_CHUNKS, needs_encoding, prompt_arguments,
                                                     prompt_embeddings)
from sdxl_worker.request.prompt_weights import is_plain, parse_prompt_attention
from tests.support.a1111_reference import PARSER_CASES, reference_hidden
from tests.support.factories import cache_settings, make_worker
from tests.support.worker_env import error_of, output_of, small_job

CABIN = "pixel art, a cozy cabin in a snowy forest"


@pytest.fixture(scope="module")
def worker(pipes, tmp_path_factory):
    return make_worker(cache_settings(tmp_path_factory.mktemp("prompt-cache")))


def _diffusers(pipe, prompt, negative=None, clip_skip=None):
    return pipe.encode_prompt(prompt, negative_prompt=negative, device="cpu", num_images_per_prompt=1,
                              do_classifier_free_guidance=True, clip_skip=clip_skip)


@pytest.mark.parametrize(("text", "expected"), PARSER_CASES)
def test_the_parser_gives_a1111s_fragments_and_weights(text, expected):
    assert parse_prompt_attention(text) == expected


def test_only_plain_prompts_are_plain():
    assert is_plain(CABIN) and is_plain("photo: a cat")
    assert not any(is_plain(text) for text in ("(cat)", "[cat]", "a \\(cat\\)", "a BREAK b", "(cat:1.0)"))


def test_a_plain_short_prompt_takes_todays_call(tiny_pipeline):
    assert prompt_arguments(tiny_pipeline, CABIN, "blurry", None) == {"prompt": CABIN, "negative_prompt": "blurry"}
    assert prompt_arguments(tiny_pipeline, CABIN, None, 2) == {"prompt": CABIN, "negative_prompt": None}
    assert needs_encoding(tiny_pipeline, CABIN, "(blurry)", None)
    assert needs_encoding(tiny_pipeline, "snow " * 80, None, None)
    assert needs_encoding(tiny_pipeline, CABIN, None, 1)


def test_a_plain_prompt_encoded_here_equals_diffusers_encoding(tiny_pipeline):
    ours = prompt_embeddings(tiny_pipeline, CABIN, "blurry", None)
    embeds, negative, pooled, negative_pooled = _diffusers(tiny_pipeline, CABIN, "blurry")
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    assert torch.equal(ours["negative_prompt_embeds"], negative)
    assert torch.equal(ours["negative_pooled_prompt_embeds"], negative_pooled)


def test_weight_one_equals_the_bare_word(tiny_pipeline):
    weighted = prompt_embeddings(tiny_pipeline, "a (cabin:1.0) in snow", None, None)
    plain = prompt_embeddings(tiny_pipeline, "a cabin in snow", None, None)
    assert torch.equal(weighted["prompt_embeds"], plain["prompt_embeds"])


def test_a_weighted_prompt_equals_a1111s_emphasis_for_each_encoder(tiny_pipeline):
    text = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."
    ours = prompt_embeddings(tiny_pipeline, text, "[[ugly]]", None)
    fragments = PARSER_CASES[5][1]
    expected = torch.cat([reference_hidden(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, fragments),
                          reference_hidden(tiny_pipeline.tokenizer_2, tiny_pipeline.text_encoder_2, fragments)], -1)
    torch.testing.assert_close(ours["prompt_embeds"], expected, rtol=1e-5, atol=1e-6)
    plain_pooled = _diffusers(tiny_pipeline, "a house on a hill, sun, sky.")[2]
    assert torch.equal(ours["pooled_prompt_embeds"], plain_pooled)  # the pooled output ignores weights, as in A1111
    negative = torch.cat([reference_hidden(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder,
                                           [["ugly", 1 / 1.1 / 1.1]]),
                          reference_hidden(tiny_pipeline.tokenizer_2, tiny_pipeline.text_encoder_2,
                                           [["ugly", 1 / 1.1 / 1.1]])], -1)
    torch.testing.assert_close(ours["negative_prompt_embeds"], negative, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours["prompt_embeds"], _diffusers(tiny_pipeline, "a house on a hill, sun, sky.")[0])


def test_long_prompts_are_chunked_and_break_starts_a_chunk(tiny_pipeline):
    text = "snow " * 40
    count = len(tiny_pipeline.tokenizer(text, add_special_tokens=False).input_ids)
    assert 2 * CHUNK_TOKENS < count <= 3 * CHUNK_TOKENS
    long = prompt_embeddings(tiny_pipeline, text, "blurry", None)  # 3 chunks, the negative padded to 3
    assert long["prompt_embeds"].shape[1] == long["negative_prompt_embeds"].shape[1] == 3 * 77
    broken = prompt_embeddings(tiny_pipeline, "a cabin BREAK snow", None, None)
    assert broken["prompt_embeds"].shape[1] == 2 * 77
    first, second = (_diffusers(tiny_pipeline, part)[0] for part in ("a cabin", "snow"))
    assert torch.equal(broken["prompt_embeds"], torch.cat([first, second], dim=1))
    assert torch.equal(broken["pooled_prompt_embeds"], _diffusers(tiny_pipeline, "a cabin")[2])  # first chunk's


def test_clip_skip_counts_as_a1111_and_maps_to_diffusers_minus_two(tiny_pipeline):
    for ours, theirs in ((3, 1), (5, 3)):
        embeds, _, pooled, _ = _diffusers(tiny_pipeline, CABIN, clip_skip=theirs)
        encoded = prompt_embeddings(tiny_pipeline, CABIN, None, ours)
        assert torch.equal(encoded["prompt_embeds"], embeds) and torch.equal(encoded["pooled_prompt_embeds"], pooled)
    last = prompt_embeddings(tiny_pipeline, CABIN, None, 1)["prompt_embeds"]
    hidden = tiny_pipeline.text_encoder(tiny_pipeline.tokenizer(CABIN, padding="max_length", max_length=77,
                                                                return_tensors="pt").input_ids,
                                        output_hidden_states=True).hidden_states[-1]
    assert torch.equal(last[..., :hidden.shape[-1]], hidden)


def test_a_200_token_prompts_tail_changes_the_image_where_todays_call_ignores_it(worker, tiny_pipeline):
    head = "a cozy cabin in a snowy forest, " * 8  # 200 tokens for the tiny tokenizer
    assert len(tiny_pipeline.tokenizer(head, add_special_tokens=False).input_ids) >= 200
    tails = ("red roof", "green lake")
    images = [output_of(worker, small_job(seed=5, prompt=head + tail))["images"] for tail in tails]
    assert images[0] != images[1]
    today = [tiny_pipeline(prompt=head + tail, num_inference_steps=2, height=64, width=64, output_type="np",
                           generator=torch.Generator().manual_seed(5)).images for tail in tails]
    assert (today[0] == today[1]).all()


def test_clip_skip_2_is_todays_image_and_other_values_change_it(worker):
    default = output_of(worker, small_job(seed=8))["images"]
    assert output_of(worker, small_job(seed=8, clip_skip=2))["images"] == default
    assert output_of(worker, small_job(seed=8, clip_skip=3))["images"] != default


def test_bad_clip_skip_is_an_error_naming_the_field_and_the_worker_keeps_serving(worker):
    assert "clip_skip" in error_of(worker, small_job(clip_skip=0))
    assert "clip_skip" in error_of(worker, small_job(clip_skip=13))
    assert "clip_skip: 6 exceeds" in error_of(worker, small_job(clip_skip=6))  # the tiny encoders have 5 layers
    assert output_of(worker, small_job())["images"]


def test_a_prompt_past_the_chunk_limit_is_cut_and_the_output_says_what(worker, tiny_pipeline):
    per_word = len(tiny_pipeline.tokenizer_2("snow", add_special_tokens=False).input_ids)
    assert MAX_CHUNKS * CHUNK_TOKENS % per_word == 0
    words = ["snow"] * (MAX_CHUNKS * CHUNK_TOKENS // per_word) + ["lighthouse"]
    output = output_of(worker, small_job(prompt=" ".join(words), negative_prompt="(blurry)"))
    (warning,) = output["warnings"]
    assert warning.startswith("prompt: longer than 600 tokens") and warning.endswith("starting 'lighthouse'")
    assert "warnings" not in output_of(worker, small_job(prompt="snow " * 100))


def test_weights_work_with_prompt_lora_tags_and_negative_prompts(worker):
    weighted = output_of(worker, small_job(seed=9, prompt="a (cabin:1.4) in snow", negative_prompt="[blurry]"))
    plain = output_of(worker, small_job(seed=9, prompt="a cabin in snow", negative_prompt="blurry"))
    assert weighted["images"] != plain["images"]
    assert "prompt" not in weighted  # the attention syntax is not a rewrite of the prompt


def test_every_prompt_of_runpods_tests_json_is_plain_so_keeps_todays_call():
    import json

    from tests.support.worker_env import PROJECT_ROOT

    jobs = json.loads((PROJECT_ROOT / ".runpod" / "tests.json").read_text())["tests"]
    texts = [job["input"].get(name) for job in jobs for name in ("prompt", "negative_prompt")]
    assert texts and all(is_plain(text) for text in texts if text)
