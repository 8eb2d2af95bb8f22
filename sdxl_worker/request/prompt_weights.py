"""A1111's prompt attention syntax: ``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.3)``, nesting (weights multiply),
escapes ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``, and ``BREAK`` (a new 75-token chunk).

Written here to A1111's rules (``modules/prompt_parser.py``, ``parse_prompt_attention``): unclosed brackets still
apply their multiplier to the end, stray closers are text, runs of equal weight merge. ``BREAK`` is returned as the
``BREAK`` marker with weight -1, as A1111 does.
"""

from __future__ import annotations

import re

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0

_ATTENTION = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

Fragments = list[list]  # [[text, weight], ...]


def parse_prompt_attention(text: str) -> Fragments:
    """``text`` as ``[[fragment, weight], ...]`` by A1111's arithmetic; ``[["BREAK", -1.0]]`` entries split chunks."""
    fragments: Fragments = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for item in fragments[start:]:
            item[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    fragments.append(["BREAK", BREAK_WEIGHT])
                fragments.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    return _merged(fragments or [["", 1.0]])


def _merged(fragments: Fragments) -> Fragments:
    """Adjacent fragments of equal weight joined into one."""
    merged = [fragments[0]]
    for text, weight in fragments[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged


def is_plain(text: str) -> bool:
    """True when ``text`` has no weights, escapes or ``BREAK``: the model sees it exactly as written."""
    return parse_prompt_attention(text) == [[text, 1.0]]
