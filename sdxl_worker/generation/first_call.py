"""Run an action once, on the calling thread, right before a module's first forward call.

A job's LoRA session (``weights.session``) uses it to apply the LoRAs at the last possible moment: the pipeline
encodes the prompt and prepares timesteps, latents and time ids while the LoRAs still load, and the UNet's first
forward call waits for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def before_first_call(module: torch.nn.Module, action: Callable[[], None]) -> Iterator[None]:
    """Within the block, ``action()`` runs once, just before ``module``'s first forward; its exceptions propagate.

    The hook is removed before ``action`` runs and again when the block ends, so it never fires twice and never
    outlives the block (also when the block raises or ``module`` is never called).
    """
    handle = None

    def hook(_module: torch.nn.Module, _args: tuple) -> None:
        handle.remove()
        action()

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
