"""A1111-style LoRA tags in the prompt (``<lora:NAME>``, ``<lora:NAME:0.8>``), and trigger words appended to it.

Accepted, with A1111's meaning of each position (``extra_networks_lora.py``): ``<lora:NAME>`` (weights: the alias's
``scale`` and ``te_scale``, else 1.0, as in A1111), ``<lora:NAME:WEIGHT>`` (one weight for the text encoders and
the UNet), ``<lora:NAME:TE:UNET>`` (the text encoders' weight, then the UNet's) and the named forms ``te=W`` and
``unet=W`` (``<lora:NAME:te=0.5:unet=1.0>``, or mixed: ``<lora:NAME:0.5:unet=1>``). As in A1111, an omitted UNet
weight is the text encoders' weight, and an omitted text-encoder weight is the default (the alias's, else 1.0).
Each weight is a finite number with ``|weight| <= 10``; spaces around the parts are ignored, the word ``lora`` may be
in any case, and ``<lyco:...>`` is read as ``<lora:...>`` (A1111 1.5+ does the same). NAME is an alias
(``LORA_ALIASES``) or a file or folder in the LoRA cache (``NAME`` or ``NAME.safetensors``). Refused with an error
naming the tag: ``dyn=`` or a fourth part (A1111's dynamic rank: not supported), a weight given both by position and
by name, other names than ``te``/``unet``, other tags such as ``<hypernet:...>``, URLs or ``owner/repo`` in a tag
(list those in ``loras`` or in an alias), and LoRA tags in ``negative_prompt`` (A1111 leaves them there as plain
text; here they are an error rather than a silent no-op).

The prompt the model sees: every tag removed; then runs of whitespace become one space, a space before a comma
goes, commas left next to each other become one, and spaces and commas at either end are trimmed. A prompt without
tags is passed on untouched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sdxl_worker.net.url_safety import cache_name_problem
from sdxl_worker.request.entries import MAX_SCALE, Aliases, LoraRequest, parse_entry

TAG = re.compile(r"<(?P<kind>\w+):(?P<args>[^<>]*)>")
LORA_KINDS = ("lora", "lyco")
_WHITESPACE = re.compile(r"\s+")
_SPACE_BEFORE_COMMA = re.compile(r" ,")
_REPEATED_COMMAS = re.compile(r",(?: ?,)+")
TAG_WEIGHTS = ("te", "unet")  # A1111's order of the positional weights
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: its text as written, the name, and its weights (``None`` when omitted): ``te`` for the
    text encoders, ``unet`` for the UNet."""

    text: str
    name: str
    te: float | None = None
    unet: float | None = None


def _weight(text: str) -> float | None:
    if not _NUMBER.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) and abs(value) <= MAX_SCALE else None


def _tag_weights(parts: list[str]) -> tuple[dict[str, float], str | None]:
    """A1111's ``te`` and ``unet`` weights of a tag's parts after the name, or the reason they are refused."""
    positional = [part for part in parts if "=" not in part]
    named = dict(part.split("=", 1) for part in parts if "=" in part)
    named = {key.strip().lower(): value.strip() for key, value in named.items()}
    if "dyn" in named or len(positional) > 2:
        return {}, "a dynamic rank (dyn=, a fourth part) is not supported"
    unknown = sorted(set(named) - set(TAG_WEIGHTS))
    if unknown:
        return {}, f"unknown weight name(s) {', '.join(unknown)} (use te= and unet=)"
    given = dict(zip(TAG_WEIGHTS, positional))
    twice = sorted(set(given) & set(named))
    if twice:
        return {}, f"the {' and '.join(twice)} weight is given twice (by position and by name)"
    weights = {}
    for key, value in {**given, **named}.items():
        weight = _weight(value)
        if weight is None:
            return {}, f"the weight must be a number with |weight| <= {MAX_SCALE:g} ({key}: {value!r})"
        weights[key] = weight
    return weights, None


def _parse_tag(match: re.Match, errors: list[str]) -> LoraTag | None:
    text = match.group(0)
    if match["kind"].lower() not in LORA_KINDS:
        errors.append(f"prompt: {text}: only <lora:NAME> and <lora:NAME:WEIGHT> tags (and <lora:NAME:TE:UNET>, "
                      "te=, unet=) are supported")
        return None
    parts = [part.strip() for part in match["args"].split(":")]
    if not parts[0]:
        errors.append(f"prompt: {text}: the tag names no LoRA")
        return None
    weights, problem = _tag_weights(parts[1:])
    if problem:
        errors.append(f"prompt: {text}: {problem}")
        return None
    return LoraTag(text, parts[0], **weights)


def tidy(prompt: str) -> str:
    """The prompt after tags were cut out: single spaces, no empty comma-separated items, trimmed ends."""
    text = _SPACE_BEFORE_COMMA.sub(",", _WHITESPACE.sub(" ", prompt))
    return _REPEATED_COMMAS.sub(",", text).strip(" ,")


def extract_lora_tags(prompt: str, errors: list[str]) -> tuple[str, list[LoraTag]]:
    """``(prompt the model sees, tags in order)``; problems go to ``errors``, naming ``prompt`` and the tag."""
    matches = list(TAG.finditer(prompt))
    if not matches:
        return prompt, []
    tags = [tag for tag in (_parse_tag(match, errors) for match in matches) if tag is not None]
    return tidy(TAG.sub(" ", prompt)), tags


def _tag_scales(tag: LoraTag, alias: Mapping[str, Any]) -> dict[str, Any]:
    """The entry keys a tag's weights set, with A1111's defaults: an omitted UNet weight is the text encoders'; an
    omitted text-encoder weight is the default one (the alias's, else 1.0)."""
    if tag.te is None and tag.unet is None:
        return {}
    te = tag.te if tag.te is not None else alias.get("te_scale", alias.get("scale", 1.0))
    return {"scale": tag.unet if tag.unet is not None else te, "te_scale": te}


def _tag_request(tag: LoraTag, index: int, aliases: Aliases, errors: list[str]) -> LoraRequest | None:
    where = f"prompt {tag.text}"
    problem = None if tag.name in aliases else cache_name_problem(tag.name)
    if problem:
        errors.append(f"prompt: {tag.text}: a tag names an alias (LORA_ALIASES) or a file in the LoRA cache; "
                      f"{problem} (list URLs and Hugging Face repos in loras)")
        return None
    entry = {"path": tag.name, **_tag_scales(tag, aliases.get(tag.name, {}))}
    return parse_entry(index, entry, errors, where=where, aliases=aliases)


def merge_tag_requests(listed: list[LoraRequest], tags: list[LoraTag], first_index: int, max_per_request: int,
                       aliases: Aliases, errors: list[str]) -> list[LoraRequest]:
    """The job's LoRAs: ``listed`` (the ``loras`` list) then the tags' requests, numbered from ``first_index``.

    A LoRA named by a tag and by ``loras``, or by two tags, is an error (name it once); so is a total above
    ``max_per_request``. Problems are appended to ``errors``.
    """
    if first_index + len(tags) > max_per_request:
        errors.append(f"prompt: {len(tags)} LoRA tag(s) and {first_index} loras entries make more than "
                      f"{max_per_request} LoRAs per request (LORA_MAX_PER_REQUEST)")
        return listed
    merged = list(listed)
    for offset, tag in enumerate(tags):
        request = _tag_request(tag, first_index + offset, aliases, errors)
        if request is None:
            continue
        twin = next((other for other in merged if other.identity == request.identity), None)
        if twin is not None:
            errors.append(f"prompt: {tag.text}: the same LoRA as {twin.ref.removeprefix('prompt ')}; name it once, "
                          "in loras or in the prompt")
            continue
        merged.append(request)
    return merged


def negative_prompt_errors(negative_prompt: str | None) -> list[str]:
    """LoRA tags in ``negative_prompt`` are errors: they are read in ``prompt`` only."""
    if not negative_prompt:
        return []
    return [f"negative_prompt: {match.group(0)}: LoRA tags are read in prompt only; remove it from negative_prompt"
            for match in TAG.finditer(negative_prompt) if match["kind"].lower() in LORA_KINDS]


def _mentions(prompt: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", prompt, re.IGNORECASE) is not None


def with_trigger_words(prompt: str, words: Iterable[str]) -> str:
    """``prompt`` (trailing spaces and commas trimmed) + ``", "`` + the words it does not already contain, joined by
    ``", "``. A word counts as present when it appears as a whole phrase, ignoring case. No new words: unchanged."""
    missing: list[str] = []
    for word in words:
        if not _mentions(prompt, word) and not any(word.lower() == seen.lower() for seen in missing):
            missing.append(word)
    if not missing:
        return prompt
    head = prompt.rstrip(" ,")
    return ", ".join([head, *missing] if head else missing)
