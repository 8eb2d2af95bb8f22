"""Civitai sources in the forms users paste, all naming one model version (so they share one cache entry):

- ``civitai:<versionId>``, e.g. ``civitai:368189``;
- an AIR URN ``urn:air:<ecosystem>:<type>:civitai:<modelId>@<versionId>[.<format>]``, e.g.
  ``urn:air:sdxl:lora:civitai:328553@368189``. Ecosystems: ``sdxl`` and the SDXL-based ``pony``, ``illustrious``
  and ``noobai``; types: ``lora`` and ``lycoris`` (Civitai's LoCon). The format suffix is accepted and ignored;
- a download URL ``https://civitai.com/api/download/models/<versionId>`` (optional ``type=Model``, ``format=...``);
- a model page URL ``https://civitai.com/models/<modelId>[/<slug>]?modelVersionId=<versionId>``. A page without
  ``modelVersionId`` is refused: it would mean "the newest version", which changes over time.

URLs count as Civitai URLs on ``civitai.com``, ``civitai.green`` and their subdomains; other paths on those hosts
stay plain URLs. A ``token=`` query parameter of a pasted URL is kept as that job's Civitai API key.
Pure parsing, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

CIVITAI_DOMAINS = ("civitai.com", "civitai.green")
AIR_ECOSYSTEMS = ("sdxl", "pony", "illustrious", "noobai")
AIR_TYPES = ("lora", "lycoris")
_ID = r"[0-9]{1,12}"
_AIR = re.compile(rf"^urn:air:(?P<ecosystem>[a-z0-9_-]+):(?P<type>[a-z0-9_-]+):(?P<source>[a-z0-9_-]+):"
                  rf"(?P<model>{_ID})(?:@(?P<version>[^.:]*))?(?:\.(?P<format>[a-z0-9_-]+))?$", re.IGNORECASE)
_DOWNLOAD_PATH = re.compile(rf"^/api/download/models/(?P<version>{_ID})/?$")
_MODEL_PAGE_PATH = re.compile(rf"^/models/(?P<model>{_ID})(?:/[^/]*)?/?$")
_EXAMPLE = "for example civitai:368189 or urn:air:sdxl:lora:civitai:328553@368189"


@dataclass(frozen=True)
class CivitaiRef:
    """A Civitai model version, and the API key a pasted URL carried (``token=``), if any."""

    version_id: int
    token: str | None = field(default=None, repr=False)


def is_civitai_host(host: str, domains: tuple[str, ...] = CIVITAI_DOMAINS) -> bool:
    """Whether ``host`` is one of ``domains`` or a subdomain of one."""
    host = host.lower()
    return any(host == domain or host.endswith("." + domain) for domain in domains)


def _version(text: str | None, what: str) -> int:
    if text is None or not re.fullmatch(_ID, text) or int(text) == 0:
        raise ValueError(f"{what} must name a model version id (digits), {_EXAMPLE}")
    return int(text)


def _from_air(source: str) -> CivitaiRef:
    match = _AIR.match(source)
    if match is None:
        raise ValueError(f"not a valid AIR: expected urn:air:<ecosystem>:<type>:civitai:<modelId>@<versionId>, "
                         f"{_EXAMPLE}")
    ecosystem, kind, origin = (match[name].lower() for name in ("ecosystem", "type", "source"))
    if origin != "civitai":
        raise ValueError(f"only Civitai AIRs (':civitai:') are supported, not '{origin}'")
    if ecosystem not in AIR_ECOSYSTEMS:
        raise ValueError(f"the AIR is for the '{ecosystem}' ecosystem; this worker applies SDXL LoRAs "
                         f"({', '.join(AIR_ECOSYSTEMS)})")
    if kind not in AIR_TYPES:
        raise ValueError(f"the AIR names a '{kind}', not a LoRA ({', '.join(AIR_TYPES)})")
    return CivitaiRef(_version(match["version"], "the AIR (after '@')"))


def _from_url(source: str) -> CivitaiRef | None:
    parts = urlsplit(source)
    if not is_civitai_host(parts.hostname or ""):
        return None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    token = query.get("token") or None
    download = _DOWNLOAD_PATH.match(parts.path)
    if download is not None:
        if query.get("type", "Model").lower() != "model":
            raise ValueError(f"a Civitai download URL must point to the model file (type=Model), "
                             f"got type={query['type'][:40]!r}")
        return CivitaiRef(_version(download["version"], "the download URL"), token)
    if _MODEL_PAGE_PATH.match(parts.path) is not None:
        if "modelVersionId" not in query:
            raise ValueError("a Civitai model page URL must include ?modelVersionId=<versionId> (open the version "
                             "on the page and copy its link), or use civitai:<versionId>")
        return CivitaiRef(_version(query["modelVersionId"], "modelVersionId"), token)
    return None


def civitai_ref(source: str) -> CivitaiRef | None:
    """The model version a source names, ``None`` if it is no Civitai form; ``ValueError`` (the reason) for a
    Civitai form that is malformed or names something other than an SDXL LoRA."""
    lowered = source.lower()
    if lowered.startswith("civitai:"):
        return CivitaiRef(_version(source[len("civitai:"):], "'civitai:'"))
    if lowered.startswith("urn:air:"):
        return _from_air(source)
    if lowered.startswith(("http://", "https://")):
        return _from_url(source)
    return None
