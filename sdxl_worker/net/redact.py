"""Keep secrets out of messages, logs, cache keys and manifests.

- ``redact_url``: what a message or a log line may show of a URL: scheme, host, port and path only.
- ``public_url``: a normalized URL without credentials, fragment and secret-looking query parameters (tokens,
  keys, signatures); used for cache keys and manifests, so ``?token=A`` and ``?token=B`` share one entry.
- ``public_source``: a LoRA source as outputs may show it: any URL (Civitai's included) through ``public_url``.
- ``scrub``: replaces known token values in any text.
- ``QueryRedactingFilter``: a logging filter for third-party loggers (urllib3 logs request paths with their
  query strings at DEBUG level).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_PARTS = ("token", "key", "secret", "sig", "pass", "auth", "cred", "session")
_SECRET_PREFIXES = ("x-amz-", "x-goog-")
_SECRET_NAMES = {"expires", "policy"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_QUERY = re.compile(r"\?[^\s\"'<>]+")


def _netloc(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{port}"
    return host


def is_secret_param(name: str) -> bool:
    """Whether a query parameter name looks like it carries a credential or a signature."""
    lowered = name.lower()
    return (lowered in _SECRET_NAMES or lowered.startswith(_SECRET_PREFIXES)
            or any(part in lowered for part in _SECRET_PARTS))


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path``, with ``?…`` standing for a dropped query; never credentials."""
    try:
        parts = urlsplit(url)
        shown = urlunsplit((parts.scheme.lower(), _netloc(url), parts.path, "", ""))
    except ValueError:
        return "<unparsable URL>"
    return shown + ("?…" if parts.query else "")


def public_url(url: str) -> str:
    """Lower-case scheme and host, no default port, credentials, fragment or secret query parameters."""
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True)
             if not is_secret_param(name)]
    return urlunsplit((parts.scheme.lower(), _netloc(url), parts.path or "/", urlencode(query), ""))


def public_source(source: str) -> str:
    """A LoRA source for job outputs and listings: a URL of any kind as ``public_url`` gives it (a Civitai download
    URL pasted with ``?token=`` included), any other source unchanged."""
    return public_url(source) if "://" in source else source


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty secret value replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class QueryRedactingFilter(logging.Filter):
    """Replaces every ``?query`` in a record's message by ``?…``; attach it to a logger that shows raw URLs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _QUERY.sub("?…", record.getMessage())
        record.args = None
        return True
