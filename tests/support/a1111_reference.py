"""The oracle for A1111's prompt parser and emphasis.

``PARSER_CASES``: inputs and outputs copied from the doctests of ``parse_prompt_attention`` in A1111's
``modules/prompt_parser.py`` (AUTOMATIC1111/stable-diffusion-webui, AGPL-3.0; the examples are quoted, the code is
not vendored), plus cases worked out by hand from its rules. ``reference_hidden``: A1111's "Original" emphasis
(``modules/sd_emphasis.py``) written straight from its formula for one 77-token chunk, independent of the worker's
chunking code.
"""

from __future__ import annotations

import torch

PARSER_CASES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    # by hand from the rules: squares divide, stray closers are text, escapes of backslash, BREAK, negative weights
    ("[[dim]]", [["dim", 1 / 1.1 / 1.1]]),
    ("a) b]", [["a) b]", 1.0]]),
    ("a \\\\ b", [["a \\ b", 1.0]]),
    ("a cat BREAK a dog", [["a cat", 1.0], ["BREAK", -1.0], ["a dog", 1.0]]),
    ("(cold:-0.5) snow", [["cold", -0.5], [" snow", 1.0]]),
    ("", [["", 1.0]]),
]


def reference_hidden(tokenizer, encoder, fragments: list[list], layer: int = -2) -> torch.Tensor:
    """One chunk's hidden states as A1111 computes them: BOS + tokens + EOS + padding, weights per token, then the
    whole chunk rescaled to its unweighted mean."""
    ids, weights = [], []
    for text, weight in fragments:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        weights += [weight] * len(tokens)
    padded = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    padded += [tokenizer.pad_token_id] * (77 - len(padded))
    multipliers = torch.tensor([1.0, *weights] + [1.0] * (77 - 1 - len(weights)))
    states = encoder(torch.tensor([padded]), output_hidden_states=True).hidden_states[layer]
    weighted = states * multipliers.reshape(1, 77, 1)
    return weighted * (states.mean() / weighted.mean())
