"""``LORA_ALIASES``: short names an endpoint owner gives to LoRA sources, usable in prompt tags and ``loras`` lists.

The variable holds a JSON object, or the path of a file holding one (a value that starts with neither ``{`` nor
``[`` is read as a path). Each key is a name; each value is a source string or an object like a ``loras`` entry
(``path`` required; ``weight_name``, ``revision``, ``sha256``, ``scale``, ``te_scale`` and ``name`` optional)::

    LORA_ALIASES='{"pixel": {"path": "nerijs/pixel-art-xl", "weight_name": "pixel-art-xl.safetensors", "scale": 0.8},
                   "film": "https://example.com/loras/film-grain.safetensors"}'

An alias's ``scale`` and ``te_scale`` are its defaults: tag weights or an entry's keys override them. Names are
1..100 characters without ``/``, ``:``, ``<``, ``>``, control characters or surrounding spaces; an alias shadows a
cache file of the same name. Aliases do not chain: a value's ``path`` is read as a source. Everything is checked
when the worker starts; any problem stops it with a message naming ``LORA_ALIASES``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sdxl_worker.net.redact import public_source
from sdxl_worker.request.entries import LoraRequest, SourceKind, parse_entry

VARIABLE = "LORA_ALIASES"
MAX_ALIAS_CHARS = 100
_NAME = re.compile(r"^[^\s/:<>\x00-\x1f\x7f](?:[^/:<>\x00-\x1f\x7f]{0,98}[^\s/:<>\x00-\x1f\x7f])?$")


def alias_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an alias, or ``None`` when it can."""
    if _NAME.match(name) is None:
        return (f"an alias name must have 1..{MAX_ALIAS_CHARS} characters without '/', ':', '<', '>', control "
                "characters or surrounding spaces")
    return None


def _read_variable(value: str) -> Any:
    text = value.strip()
    where = VARIABLE
    if not text.startswith(("{", "[")):
        path = Path(text).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"{VARIABLE}: not a JSON object and not a readable file ({path}: "
                             f"{error.strerror or error})") from None
        where = f"{VARIABLE} (file {path})"
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"{where}: invalid JSON ({error})") from None


def parse_aliases(data: Any) -> dict[str, dict[str, Any]]:
    """Validated aliases as ``{name: loras-entry object}``; ``ValueError`` listing every problem."""
    if not isinstance(data, dict):
        raise ValueError(f"{VARIABLE}: must be a JSON object mapping names to LoRA sources, got "
                         f"{type(data).__name__}")
    errors: list[str] = []
    aliases: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        where = f"{VARIABLE}[{name!r}]"
        problem = alias_name_problem(name)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        if parse_entry(0, value, errors, where=where) is not None:
            entry = {"path": value} if isinstance(value, str) else value
            aliases[name] = {key: item.strip() if key == "path" else item for key, item in entry.items()}
    if errors:
        raise ValueError("; ".join(errors))
    return aliases


def load_aliases(value: str) -> Mapping[str, Mapping[str, Any]]:
    """The aliases of a ``LORA_ALIASES`` value (none when empty), read-only."""
    raw = value.strip()
    aliases = parse_aliases(_read_variable(raw)) if raw else {}
    return MappingProxyType(aliases)


def shown_aliases(aliases: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Aliases as a job may see them: URL sources (Civitai's too) without credentials or secret query parameters."""
    return {name: {**entry, "path": public_source(entry["path"])} for name, entry in aliases.items()}


def unknown_name_errors(requests: list[LoraRequest], exists: Callable[[str], bool]) -> list[str]:
    """One message per cache-name request for which ``exists(name)`` is false (checked before any download)."""
    errors = []
    for request in requests:
        if request.kind is SourceKind.CACHE and not exists(request.source):
            errors.append(f"{request.ref}: unknown LoRA '{request.source}': not an alias in {VARIABLE} and no such "
                          f"file or folder in the LoRA cache")
    return errors
