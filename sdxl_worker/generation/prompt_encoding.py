"""Prompt embeddings the way A1111 builds them, for prompts diffusers' own encoding would change or cut.

A prompt takes today's path (the pipeline encodes the strings itself) when it and the negative prompt are plain
(``request.prompt_weights.is_plain``), fit in 77 tokens for every tokenizer, and ``clip_skip`` is unset or 2.
Otherwise both are encoded here, as A1111 does (``modules/sd_hijack_clip.py``):
- each tokenizer's tokens go in chunks of 75, each chunk sent as ``BOS + 75 + EOS`` (padding after the first EOS is
  the tokenizer's pad token, as diffusers pads); ``BREAK`` starts a new chunk; the chunks' hidden states are
  concatenated; A1111's comma backtrack option (``comma_padding_backtrack``) is not followed;
- each chunk's hidden states are multiplied by their tokens' weights, then rescaled to the chunk's original mean
  (A1111's "Original" emphasis), per text encoder;
- the pooled embedding is the first chunk's, unweighted (A1111's SDXL conditioner);
- the shorter of prompt and negative prompt is padded with empty chunks (A1111's ``pad_cond_uncond``);
- ``clip_skip`` N takes ``hidden_states[-N]`` of every text encoder (2 is SDXL's usual penultimate layer).
A prompt past ``MAX_CHUNKS`` chunks is cut there, and ``truncation_notes`` says what was cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdxl_worker.errors import InputError
from sdxl_worker.request.prompt_weights import BREAK_WEIGHT, is_plain, parse_prompt_attention

CHUNK_TOKENS = 75
MAX_CHUNKS = 8
DEFAULT_CLIP_SKIP = 2
MAX_SHOWN_CHARS = 200


@dataclass(frozen=True)
class Chunks:
    """A prompt's token ids and weights, chunk by chunk (75 tokens each at most, no BOS/EOS); ``dropped`` counts
    tokens past ``MAX_CHUNKS``."""

    ids: list[list[int]]
    weights: list[list[float]]
    dropped: list[int]


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    return [(tokenizer, encoder) for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                                           (pipe.tokenizer_2, pipe.text_encoder_2))
            if tokenizer is not None and encoder is not None]


def chunk_prompt(tokenizer: Any, text: str) -> Chunks:
    """``text`` parsed (A1111 weights, ``BREAK``) and tokenized into chunks of at most ``CHUNK_TOKENS``."""
    ids: list[list[int]] = [[]]
    weights: list[list[float]] = [[]]
    for fragment, weight in parse_prompt_attention(text):
        if fragment == "BREAK" and weight == BREAK_WEIGHT:
            ids.append([])
            weights.append([])
            continue
        for token in tokenizer(fragment, add_special_tokens=False, truncation=False)["input_ids"]:
            if len(ids[-1]) == CHUNK_TOKENS:
                ids.append([])
                weights.append([])
            ids[-1].append(token)
            weights[-1].append(weight)
    dropped = [token for chunk in ids[MAX_CHUNKS:] for token in chunk]
    return Chunks(ids[:MAX_CHUNKS], weights[:MAX_CHUNKS], dropped)


def needs_encoding(pipe: Any, prompt: str, negative: str | None, clip_skip: int | None) -> bool:
    """False when the pipeline's own encoding gives A1111's result: today's call, unchanged."""
    if clip_skip not in (None, DEFAULT_CLIP_SKIP):
        return True
    for text in (prompt, negative or ""):
        if not is_plain(text):
            return True
        for tokenizer, _ in _encoders(pipe):
            if len(tokenizer(text, truncation=False)["input_ids"]) > tokenizer.model_max_length:
                return True
    return False


def truncation_notes(pipe: Any, prompt: str, negative: str | None) -> list[str]:
    """One line per prompt cut at ``MAX_CHUNKS`` chunks, naming the field and the text that was dropped."""
    notes = []
    for field, text in (("prompt", prompt), ("negative_prompt", negative)):
        if not text:
            continue
        tokenizer = _encoders(pipe)[-1][0]
        dropped = chunk_prompt(tokenizer, text).dropped
        if dropped:
            text = tokenizer.decode(dropped)
            shown = text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "..."
            notes.append(f"{field}: longer than {MAX_CHUNKS * CHUNK_TOKENS} tokens; {len(dropped)} token(s) were "
                         f"not used, starting {shown!r}")
    return notes


def _chunk_input(tokenizer: Any, ids: list[int]) -> list[int]:
    """A chunk as the encoder sees it: BOS, the tokens, EOS, then the tokenizer's padding to 77."""
    tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return tokens + [tokenizer.pad_token_id] * (CHUNK_TOKENS + 2 - len(tokens))


def _encode_text(tokenizer: Any, encoder: Any, text: str, clip_skip: int, chunks: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden states (1, 77*k, C), pooled or last hidden)`` of ``text`` for one encoder, padded to ``chunks``."""
    parsed = chunk_prompt(tokenizer, text)
    ids, weights = parsed.ids, parsed.weights
    if chunks is not None:
        ids = ids + [[]] * (chunks - len(ids))
        weights = weights + [[]] * (chunks - len(weights))
    if clip_skip > encoder.config.num_hidden_layers:
        raise InputError(f"Invalid input: clip_skip: {clip_skip} exceeds the text encoder's {encoder.config.num_hidden_layers} layers")
    device = encoder.device
    hidden, pooled = [], None
    for chunk_ids, chunk_weights in zip(ids, weights):
        tokens = torch.tensor([_chunk_input(tokenizer, chunk_ids)], device=device)
        out = encoder(tokens, output_hidden_states=True)
        states = out.hidden_states[-clip_skip]
        multipliers = torch.tensor([1.0, *chunk_weights] + [1.0] * (CHUNK_TOKENS + 1 - len(chunk_weights)),
                                   device=device, dtype=states.dtype)
        if any(weight != 1.0 for weight in chunk_weights):
            original_mean = states.mean()
            states = states * multipliers[None, :, None]
            states = states * (original_mean / states.mean())
        hidden.append(states)
        if pooled is None:
            pooled = out[0]
    return torch.cat(hidden, dim=1), pooled


def _chunk_count(pipe: Any, text: str) -> int:
    return max(len(chunk_prompt(tokenizer, text).ids) for tokenizer, _ in _encoders(pipe))


def _encode(pipe: Any, text: str, clip_skip: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every encoder, concatenated, and the last encoder's pooled output (SDXL's projection)."""
    results = [_encode_text(tokenizer, encoder, text, clip_skip, chunks) for tokenizer, encoder in _encoders(pipe)]
    return torch.cat([states for states, _ in results], dim=-1), results[-1][1]


@torch.inference_mode()
def prompt_embeddings(pipe: Any, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
    """The pipeline's ``prompt_embeds``, ``pooled_prompt_embeds`` and their negatives for ``prompt``/``negative``."""
    skip = clip_skip or DEFAULT_CLIP_SKIP
    chunks = max(_chunk_count(pipe, prompt), _chunk_count(pipe, negative or ""))
    embeds, pooled = _encode(pipe, prompt, skip, chunks)
    if negative is None and pipe.config.force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = _encode(pipe, negative or "", skip, chunks)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled}


def prompt_arguments(pipe: Any, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
    """The prompt arguments of a pipeline call: the strings (today's call) unless ``needs_encoding``."""
    if not needs_encoding(pipe, prompt, negative, clip_skip):
        return {"prompt": prompt, "negative_prompt": negative}
    return prompt_embeddings(pipe, prompt, negative, clip_skip)
