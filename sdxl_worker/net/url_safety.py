"""What a job may make the worker fetch or read: URL and address rules, and names inside the cache folder.

URLs: only ``http``/``https``, read once by the parser the HTTP client uses (urllib3's ``parse_url``, as
``requests`` does): the host checked, the host connected to and the host a token is chosen for are one and the same
(``url_host``). A URL another parser would read differently is refused: a backslash, whitespace or a control
character in the authority (``https://attacker.example\\@huggingface.co/`` is ``attacker.example`` to ``requests``
but ``huggingface.co`` to ``urllib.parse``), or any host on which ``urllib.parse`` and urllib3 disagree. The host, whether a literal address in any form (``127.0.0.1``, ``2130706433``,
``0x7f000001``, ``0177.1``, ``[::1]``, IPv4-mapped IPv6) or a name resolved with ``getaddrinfo``, must not lead to a
loopback, private, link-local, shared, reserved, multicast or unspecified address unless private hosts are allowed;
the cloud metadata addresses are refused always. Every redirect hop is checked the same way (``check_url``), and
``guarded_session`` checks the address each connection actually reached, so a DNS answer that changes between the
check and the connect (DNS rebinding) is refused too. Proxies from the environment are not used.

Cache names: a bare file or folder name in the cache root; separators, ``..``, leading dots (internal folders),
NUL and control characters are refused, and the resolved path (symlinks followed) must stay inside the root.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import LocationParseError
from urllib3.util import Url, parse_url

from sdxl_worker.errors import LoraError
from sdxl_worker.net.redact import redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOWED_SCHEMES = ("http", "https")
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
MAX_NAME_CHARS = 255
_AMBIGUOUS = re.compile(r"[\\\x00-\x20\x7f]")


class RefusedAddress(LoraError):
    """A connection reached an address the rules refuse."""


def literal_ip(host: str) -> IPAddress | None:
    """The address a literal host stands for, including the decimal, hex, octal and short IPv4 forms."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def refusal_reason(address: IPAddress, allow_private: bool) -> str | None:
    """Why the address may not be reached, or ``None`` when it may."""
    embedded = getattr(address, "ipv4_mapped", None) or getattr(address, "sixtofour", None)
    if embedded is not None:
        return refusal_reason(embedded, allow_private)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return None
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None if address.is_global else "not a public address"


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be read one way only (see the module docstring), or ``None`` when it can."""
    try:
        split = urlsplit(url)
        if _AMBIGUOUS.search(split.netloc):
            return "a backslash, space or control character in its authority makes its host ambiguous"
        split.port  # noqa: B018 - raises ValueError on a bad port
        theirs = (split.hostname or "").lower()
        ours = (parse_url(url).host or "").lower().strip("[]")
    except (ValueError, LocationParseError):
        return "it cannot be parsed"
    if theirs != ours:
        return f"its host reads as {ours or 'nothing'} to the HTTP client but {theirs or 'nothing'} to urllib"
    return None


def parse_http_url(url: str) -> Url:
    """``url`` as the HTTP client reads it; ``LoraError`` when it is ambiguous or unparsable."""
    problem = url_problem(url)
    if problem:
        raise LoraError(f"refused URL {redact_url(url)}: {problem}")
    return parse_url(url)


def url_host(url: str) -> str:
    """The lower-case host the HTTP client connects to for ``url`` (``parse_http_url``); ``""`` for none."""
    return (parse_http_url(url).host or "").lower().strip("[]")


def check_url(url: str, allow_private: bool) -> None:
    """Raise ``LoraError`` unless ``url`` is http(s), unambiguous, and its host leads only to allowed addresses."""
    shown = redact_url(url)
    parts = parse_http_url(url)
    if (parts.scheme or "").lower() not in ALLOWED_SCHEMES:
        raise LoraError(f"refused URL {shown}: only http and https are allowed")
    host = url_host(url)
    if not host:
        raise LoraError(f"refused URL {shown}: no host")
    literal = literal_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise LoraError(f"cannot resolve the host of {shown}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    for address in addresses:
        reason = refusal_reason(address, allow_private)
        if reason:
            raise LoraError(f"refused URL {shown}: {host} is {reason} ({address}); "
                            "set LORA_ALLOW_PRIVATE_HOSTS=1 to allow private hosts")


def _check_peer(sock: socket.socket, allow_private: bool) -> None:
    address = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
    reason = refusal_reason(address, allow_private)
    if reason:
        sock.close()
        raise RefusedAddress(f"refused connection to {address}: {reason}")


@functools.cache
def _guarded_adapter_class(allow_private: bool) -> type[HTTPAdapter]:
    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _check_peer(sock, allow_private)
            return sock

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _check_peer(sock, allow_private)
            return sock

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}

    return GuardedAdapter


def guarded_session(allow_private: bool) -> requests.Session:
    """A ``requests`` session that refuses connections reaching a refused address; no proxies, no netrc."""
    session = requests.Session()
    session.trust_env = False
    adapter = _guarded_adapter_class(allow_private)()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def cache_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an entry of the cache root, or ``None`` if it can."""
    if not name or len(name) > MAX_NAME_CHARS:
        return f"a cache name must have 1..{MAX_NAME_CHARS} characters"
    if "/" in name or "\\" in name:
        return "a cache name must not contain path separators"
    if name.startswith("."):
        return "a cache name must not start with '.'"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "a cache name must not contain NUL or control characters"
    return None


def resolve_in_cache(root: Path, name: str) -> Path:
    """``root / name`` with symlinks resolved; ``LoraError`` if the name is unsafe or leads out of the cache."""
    problem = cache_name_problem(name)
    if problem:
        raise LoraError(problem)
    real_root = root.resolve()
    path = (real_root / name).resolve()
    if not path.is_relative_to(real_root) or path == real_root:
        raise LoraError(f"'{name}' leads outside the LoRA cache")
    return path
