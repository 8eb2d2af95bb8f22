"""Stream one http(s) URL to a file, for LoRAs and for ``image_url``.

- Streamed in 1 MiB chunks (never whole in memory), hashed with sha256 and written on a second thread while the
  next chunk is read (``chunk_writer``), fsynced at the end.
- Redirects are followed by hand (at most 10); every hop passes ``url_safety.check_url`` and connections are made
  through ``url_safety.guarded_session``. ``Authorization`` is recomputed per hop, so a token never follows a
  redirect to another host.
- Connect/read timeouts; retries (``retry.with_retries``: exponential backoff with jitter) on connection errors,
  timeouts, broken or short bodies, 408, 429 and 5xx, honouring ``Retry-After`` (seconds or a date) capped at
  ``retry_wait_max_s``.
- A total deadline and a minimum throughput (``pace``): the body is read with ``read1``, which returns as soon as
  some bytes arrive, so a server dripping bytes under the read timeout is measured between reads and cut off.
- Size limit ``max_bytes``: checked against ``Content-Length`` before the body and while streaming.
- ``CIVITAI_TOKEN`` goes only to Civitai hosts (``civitai.com``, ``civitai.green`` and their subdomains) and the
  ``CIVITAI_API_BASE`` host, ``HF_TOKEN`` only to the ``HF_ENDPOINT`` host, both as ``Authorization: Bearer``.
- ``progress(done, total)`` is called once before the body when its size is known (``done`` 0), then after every
  chunk; an exception it raises (the free-space floor) ends the download.
- Messages show URLs without query strings or credentials (``redact.redact_url``).
Failures raise ``LoraError`` with the cause only; callers add which LoRA or field it was.
"""

from __future__ import annotations

import email.message
import http.client
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError, ReadTimeoutError

from sdxl_worker.errors import LoraError
from sdxl_worker.net.chunk_writer import ChunkWriter
from sdxl_worker.net.pace import Pace, TooSlow
from sdxl_worker.net.redact import QueryRedactingFilter, public_url, redact_url
from sdxl_worker.net.retry import Failure, retry_after_s, with_retries
from sdxl_worker.net.transfer_progress import format_size
from sdxl_worker.net.url_safety import check_url, guarded_session, url_host
from sdxl_worker.request.civitai_refs import is_civitai_host
from sdxl_worker.settings import CacheSettings

LOG = logging.getLogger(__name__)
logging.getLogger("urllib3.connectionpool").addFilter(QueryRedactingFilter())
MAX_REDIRECTS = 10
CHUNK_BYTES = 1024 * 1024
USER_AGENT = "sdxl-worker-lora/1"
ByteProgress = Callable[[int, int | None], None]
T = TypeVar("T")
_BROKEN_BODY_CAUSES: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionResetError, "connection reset by the server"),
    (http.client.IncompleteRead, "the server closed the connection before the end"),
    (ReadTimeoutError, "read timed out"),
)


@dataclass(frozen=True)
class DownloadInfo:
    """What a finished download wrote and what the server said about it."""

    size: int
    sha256: str
    filename: str | None     # from Content-Disposition, sanitized to a bare file name
    etag: str | None
    final_url: str           # the last hop, without credentials or secret query parameters


class Retryable(Exception):
    """A failure worth another attempt (``retry_http``); ``wait_s`` is the server's ``Retry-After``, if any."""

    def __init__(self, cause: str, wait_s: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.wait_s = wait_s


def _is_civitai(host: str, settings: CacheSettings) -> bool:
    return is_civitai_host(host, settings.civitai_hosts) or host == url_host(settings.civitai_api_base)


def auth_header(url: str, settings: CacheSettings) -> dict[str, str]:
    """The ``Authorization`` header the host ``url`` connects to may receive: Civitai or HF token, or nothing.

    The host is read as the HTTP client reads it (``url_safety.url_host``); an ambiguous URL raises ``LoraError``."""
    host = url_host(url)
    if settings.civitai_token and _is_civitai(host, settings):
        return {"Authorization": f"Bearer {settings.civitai_token}"}
    if settings.hf_token and host == url_host(settings.hf_endpoint):
        return {"Authorization": f"Bearer {settings.hf_token}"}
    return {}


def _token_hint(url: str, settings: CacheSettings) -> str:
    host = url_host(url)
    if _is_civitai(host, settings):
        return ("CIVITAI_TOKEN was sent and refused; check that the key may download this model"
                if settings.civitai_token else "set CIVITAI_TOKEN to a Civitai API key")
    if host == url_host(settings.hf_endpoint):
        return ("HF_TOKEN was sent and refused; check its access to this repo" if settings.hf_token
                else "set HF_TOKEN to a Hugging Face token with access")
    return "the URL needs credentials the worker does not send"


def _status_message(status: int, url: str, settings: CacheSettings) -> str:
    shown = redact_url(url)
    if status in (401, 403):
        return f"access denied (HTTP {status}) by {shown}: {_token_hint(url, settings)}"
    if status in (404, 410):
        return f"not found (HTTP {status}): {shown}"
    return f"HTTP {status} from {shown}"


def disposition_filename(value: str | None) -> str | None:
    """The bare file name a ``Content-Disposition`` header gives (``filename*`` or ``filename``), or ``None``."""
    if not value:
        return None
    message = email.message.Message()
    message["content-disposition"] = value
    name = message.get_filename()
    if not name:
        return None
    name = "".join(char for char in name.replace("\\", "/").rsplit("/", 1)[-1] if ord(char) >= 32).strip()
    return name[:200] if name not in ("", ".", "..") else None


def url_filename(url: str) -> str | None:
    """The URL path's last segment, if it looks like a file name."""
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return segment if "." in segment.strip(".") else None


def _broken_body_cause(error: BaseException) -> str:
    """Why a body stopped midway, from the exception chain requests wraps it in (reset, early close, timeout)."""
    pending: list[BaseException] = [error]
    while pending:
        item = pending.pop()
        for kind, cause in _BROKEN_BODY_CAUSES:
            if isinstance(item, kind):
                return cause
        pending.extend(arg for arg in item.args if isinstance(arg, BaseException))
    return type(error).__name__


def _content_length(response: requests.Response) -> int | None:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    value = response.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def open_url(session: requests.Session, url: str, settings: CacheSettings) -> tuple[requests.Response, str]:
    """GET ``url`` streamed, following redirects under the module's rules; ``(response, final URL)``."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        check_url(current, settings.allow_private_hosts)
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT, **auth_header(current, settings)}
        try:
            response = session.get(current, headers=headers, stream=True, allow_redirects=False,
                                   timeout=(settings.connect_timeout_s, settings.read_timeout_s))
        except requests.Timeout:
            raise Retryable(f"timed out (connect {settings.connect_timeout_s:g} s, read {settings.read_timeout_s:g} s)"
                            f" on {redact_url(current)}") from None
        except requests.ConnectionError:
            raise Retryable(f"cannot connect to {redact_url(current)}") from None
        except requests.RequestException as error:
            raise LoraError(f"request to {redact_url(current)} failed ({type(error).__name__})") from None
        if not response.is_redirect:
            return response, current
        response.close()
        current = urljoin(current, response.headers["Location"])
        LOG.debug("redirected to %s", redact_url(current))
    raise LoraError(f"more than {MAX_REDIRECTS} redirects from {redact_url(url)}")


def check_status(response: requests.Response, url: str, settings: CacheSettings) -> None:
    """Nothing for HTTP 200; ``Retryable`` for 408, 429 and 5xx; ``LoraError`` otherwise (naming the token
    variable on 401/403)."""
    status = response.status_code
    if status in (408, 429) or status >= 500:
        raise Retryable(f"HTTP {status} from {redact_url(url)}", retry_after_s(response.headers.get("Retry-After")))
    if status != 200:
        raise LoraError(_status_message(status, url, settings))


class _BrokenBody(Exception):
    """Reading the body failed (``cause``): the connection, not the disk."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _body(response: requests.Response, pace: Pace) -> Iterator[bytes]:
    """The body as it arrives, up to ``CHUNK_BYTES`` a read, ``pace`` checked after every read; a failed read is a
    ``_BrokenBody`` (so a failed write of the caller, disk full for one, is never taken for a broken download)."""
    pace.start_body()
    done = 0
    while True:
        try:
            data = response.raw.read1(CHUNK_BYTES, decode_content=True)
        except (HTTPError, OSError) as error:
            raise _BrokenBody(error) from None
        if not data:
            return
        done += len(data)
        yield data
        pace.check_body(done)


def _attempt(session: requests.Session, url: str, target: Path, settings: CacheSettings,
             progress: ByteProgress | None, pace: Pace) -> DownloadInfo:
    pace.check_deadline()
    response, final_url = open_url(session, url, settings)
    with response:
        check_status(response, final_url, settings)
        total = _content_length(response)
        limit = f"over the limit of {format_size(settings.max_bytes)} (LORA_MAX_BYTES)"
        if total is not None and total > settings.max_bytes:
            raise LoraError(f"the file is {format_size(total)}, {limit}")
        if progress is not None and total is not None:
            progress(0, total)
        done = 0
        with ChunkWriter(target) as sink:
            try:
                for chunk in _body(response, pace):
                    done += len(chunk)
                    if done > settings.max_bytes:
                        raise LoraError(f"the download passed {format_size(done)}, {limit}")
                    sink.put(chunk)
                    if progress is not None:
                        progress(done, total)
            except TooSlow as error:
                raise Retryable(str(error)) from None
            except _BrokenBody as broken:
                received = max(done, response.raw.tell())  # bytes of a chunk cut short count too
                expected = f" of {format_size(total)}" if total is not None else ""
                raise Retryable(f"the download broke off after {format_size(received)}{expected}: "
                                f"{_broken_body_cause(broken.cause)}") from None
            if total is not None and done != total:
                raise Retryable(f"the body ended after {done} of {total} bytes")
    return DownloadInfo(size=done, sha256=sink.sha256,
                        filename=disposition_filename(response.headers.get("Content-Disposition")),
                        etag=response.headers.get("ETag"), final_url=public_url(final_url))


def _http_failure(error: Exception) -> Failure | None:
    """A ``Retryable`` as a retryable failure; every other exception is already final and passes through."""
    return Failure(error.cause, True, error.wait_s) if isinstance(error, Retryable) else None


def retry_http(call: Callable[[], T], url: str, settings: CacheSettings) -> T:
    """``call()``, again after ``Retryable`` (``retry.with_retries``); then ``LoraError``."""
    return with_retries(call, _http_failure, settings, f"request to {redact_url(url)}")


def download_url(url: str, target: Path, settings: CacheSettings,
                 progress: ByteProgress | None = None) -> DownloadInfo:
    """Download ``url`` into ``target`` (created or truncated) under the rules of the module docstring."""
    pace = Pace(settings)
    with guarded_session(settings.allow_private_hosts) as session:
        return retry_http(lambda: _attempt(session, url, target, settings, progress, pace), url, settings)
