"""Retry with exponential backoff, for HTTP downloads (``download``) and Hugging Face Hub calls (``sources.hub``).

``with_retries`` makes ``1 + download_retries`` attempts. The caller says what each exception means
(``Classify``): not a failure of its own (re-raised unchanged), final (a ``LoraError`` with its message at once), or
retryable, then the next attempt follows after ``retry_backoff_s * 2 ** (attempt - 1)`` seconds (capped at
``retry_wait_max_s``, jittered by ±20 %), or after the server's ``Retry-After`` (capped at ``retry_wait_max_s``).
The last retryable failure becomes ``LoraError("<message>; gave up after N attempts")``.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from sdxl_worker.errors import LoraError
from sdxl_worker.settings import CacheSettings

LOG = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """What a caller reads in an exception: the message, whether another attempt may help, the server's wait."""

    message: str
    retryable: bool
    wait_s: float | None = None   # Retry-After, in seconds, for a retryable failure


Classify = Callable[[Exception], Failure | None]   # None: not the caller's to translate, re-raised as it is


def retry_after_s(value: str | None) -> float | None:
    """The seconds a ``Retry-After`` header asks for (a number of seconds or an HTTP date), at least 0; ``None``
    when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0)


def _delay_s(failure: Failure, attempt: int, settings: CacheSettings) -> float:
    if failure.wait_s is not None:
        return min(failure.wait_s, settings.retry_wait_max_s)
    delay = min(settings.retry_backoff_s * 2 ** (attempt - 1), settings.retry_wait_max_s)
    return delay * random.uniform(0.8, 1.2)


def with_retries(call: Callable[[], T], classify: Classify, settings: CacheSettings, what: str) -> T:
    """``call()``, again after each retryable failure under the module's rules; ``what`` names the call in the log
    line of each retry (``"<what>: <message>; retry 1 of 2 in 0.5 s"``)."""
    attempts = settings.download_retries + 1
    attempt = 1
    while True:
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classify decides; what it does not claim is re-raised
            failure = classify(error)
            if failure is None:
                raise
            if not failure.retryable:
                raise LoraError(failure.message) from None
            if attempt >= attempts:
                raise LoraError(f"{failure.message}; gave up after {attempts} attempts") from None
            delay = _delay_s(failure, attempt, settings)
            LOG.info("%s: %s; retry %d of %d in %.1f s", what, failure.message, attempt, attempts - 1, delay)
            time.sleep(delay)
            attempt += 1
