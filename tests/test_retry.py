"""``net.retry``: one backoff loop for HTTP and the Hub; the caller's ``classify`` says what each exception means."""

from __future__ import annotations

import email.utils
import logging
import time

import pytest

from sdxl_worker.errors import LoraError
from sdxl_worker.net.retry import Failure, retry_after_s, with_retries
from sdxl_worker.settings import CacheSettings
from tests.support.factories import cache_settings


def settings(tmp_path, **options) -> CacheSettings:
    return cache_settings(tmp_path, **({"download_retries": 2} | options))


class Flaky:
    """Raises ``errors`` one per call, then returns ``"ok"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def retryable(error: Exception) -> Failure | None:
    if isinstance(error, ConnectionError):
        return Failure(f"cannot connect ({error})", True)
    if isinstance(error, PermissionError):
        return Failure("access denied", False)
    return None


def test_retryable_failures_are_retried_with_a_log_line_each(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdxl_worker")
    call = Flaky(ConnectionError("a"), ConnectionError("b"))
    assert with_retries(call, retryable, settings(tmp_path), "request to https://example.com/x") == "ok"
    assert call.calls == 3
    assert "request to https://example.com/x: cannot connect (a); retry 1 of 2 in " in caplog.text
    assert "request to https://example.com/x: cannot connect (b); retry 2 of 2 in " in caplog.text


def test_the_last_retryable_failure_gives_up_naming_the_attempts(tmp_path):
    call = Flaky(*(ConnectionError("down") for _ in range(5)))
    with pytest.raises(LoraError, match=r"^cannot connect \(down\); gave up after 3 attempts$"):
        with_retries(call, retryable, settings(tmp_path), "request")
    assert call.calls == 3


def test_a_final_failure_is_not_retried_and_other_errors_pass_unchanged(tmp_path):
    final = Flaky(PermissionError("no"))
    with pytest.raises(LoraError, match=r"^access denied$"):
        with_retries(final, retryable, settings(tmp_path), "request")
    assert final.calls == 1
    unclaimed = Flaky(KeyError("key"))
    with pytest.raises(KeyError):
        with_retries(unclaimed, retryable, settings(tmp_path), "request")
    assert unclaimed.calls == 1


def test_the_servers_wait_is_honoured_and_capped(tmp_path):
    def classify(error: Exception) -> Failure:
        return Failure("HTTP 429", True, wait_s=3600.0)

    start = time.monotonic()
    assert with_retries(Flaky(ConnectionError()), classify, settings(tmp_path, retry_wait_max_s=0.2), "x") == "ok"
    assert 0.2 <= time.monotonic() - start < 2.0


def test_retry_after_reads_seconds_and_dates():
    assert retry_after_s("7") == 7.0 and retry_after_s("-3") == 0.0
    assert 50 < retry_after_s(email.utils.formatdate(time.time() + 60, usegmt=True)) <= 60
    assert retry_after_s(None) is None and retry_after_s("soon") is None
