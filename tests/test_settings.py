"""One settings object for every variable: strict parsing naming the variable, defaults as the README shows them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sdxl_worker.settings import GIB, VARIABLES, WorkerSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]+)` \| (.*?) \| .* \|$")


def readme_variables() -> dict[str, str]:
    """Name -> default cell of every row of the README's "Environment variables" tables."""
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text[text.index("## Environment variables"):text.index("## Local use")]
    rows = [ROW.match(line) for line in section.splitlines()]
    names = [row[1] for row in rows if row]
    assert len(names) == len(set(names)), "a variable has two rows"
    return {row[1]: row[2] for row in rows if row}


def test_the_readme_tables_list_exactly_the_settings_variables_with_their_defaults():
    documented = readme_variables()
    assert sorted(documented) == sorted(VARIABLES)
    assert {name: cell for name, cell in documented.items()} == {
        name: variable.shown_default for name, variable in VARIABLES.items()}


def test_no_module_of_the_package_reads_the_environment_itself():
    readers = [str(path.relative_to(PROJECT_ROOT)) for path in (PROJECT_ROOT / "sdxl_worker").rglob("*.py")
               if re.search(r"os\.environ|getenv\(", path.read_text())]
    assert readers == []


@pytest.mark.parametrize("name", [name for name, variable in VARIABLES.items() if variable.default])
def test_the_declared_default_is_the_value_used_when_the_variable_is_unset(name):
    assert WorkerSettings.from_env({name: VARIABLES[name].default}) == WorkerSettings.from_env({})


def test_values_are_parsed_into_every_group(tmp_path):
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"px": {"path": "me/pixel", "scale": 0.5}}))
    settings = WorkerSettings.from_env({
        "SDXL_MODEL": "tiny", "REFINER_MODEL": "", "SDXL_DTYPE": "BFloat16", "MAX_CONCURRENCY": "3",
        "LOG_LEVEL": "debug", "PROGRESS_INTERVAL_S": "0.25", "RUNPOD_WEBHOOK_POST_OUTPUT": "http://x/post",
        "LORA_RAM_CACHE_GB": "0.5", "LORA_OVERLAP": "off", "LORA_REUSE_FUSED": "false",
        "PRELOAD_LORAS": " a.safetensors , ,me/b ", "LORA_ALIASES": str(aliases),
        "BUCKET_ENDPOINT_URL": "http://s3.local", "BUCKET_ACCESS_KEY_ID": "key", "BUCKET_NAME": "images",
        "LORA_CACHE_DIR": str(tmp_path), "LORA_CACHE_MAX_GB": "1.5", "HF_ENDPOINT": "http://hub.local/"})
    assert (settings.models.sdxl_model, settings.models.refiner_model, settings.models.dtype) == ("tiny", "", "bfloat16")
    assert settings.runtime.max_concurrency == 3 and settings.runtime.log_level == "DEBUG"
    assert settings.runtime.progress_interval_s == 0.25 and settings.runtime.progress_remote
    assert settings.loras.ram_cache_bytes == GIB // 2 and not settings.loras.overlap and not settings.loras.reuse_fused
    assert settings.loras.preload_sources == ("a.safetensors", "me/b")
    assert dict(settings.loras.aliases) == {"px": {"path": "me/pixel", "scale": 0.5}}
    assert settings.upload.endpoint_url == "http://s3.local" and settings.upload.missing == ["BUCKET_SECRET_ACCESS_KEY"]
    assert "key" not in repr(settings.upload)
    assert settings.cache.cache_dir == tmp_path and settings.cache.cache_max_bytes == int(1.5 * GIB)
    assert settings.cache.hf_endpoint == "http://hub.local"
    unset = WorkerSettings.from_env({})
    assert unset.models.refiner_model is None and unset.models.sdxl_model is None and not unset.runtime.progress_remote
    assert unset.upload.endpoint_url is None and unset.loras.aliases == {}


@pytest.mark.parametrize(("name", "value"), [
    ("SDXL_DTYPE", "int8"), ("MAX_CONCURRENCY", "0"), ("MAX_CONCURRENCY", "two"), ("LOG_LEVEL", "LOUD"),
    ("PROGRESS_INTERVAL_S", "-1"), ("LORA_RAM_CACHE_GB", "lots"), ("LORA_OVERLAP", "maybe"),
    ("LORA_REUSE_FUSED", "2"), ("LORA_ALIASES", "{not json"), ("LORA_MAX_BYTES", "1.5"),
    ("LORA_MAX_PER_REQUEST", "-3"), ("LORA_CACHE_MAX_GB", "inf"), ("LORA_CACHE_MIN_FREE_MB", "nan"),
    ("LORA_ALLOW_PRIVATE_HOSTS", "sure"), ("LORA_CONNECT_TIMEOUT_S", "soon"), ("LORA_DOWNLOAD_RETRIES", "x"),
    ("LORA_VERIFY_ON_HIT", "never"), ("HF_ENDPOINT", "ftp://hub"), ("CIVITAI_API_BASE", "civitai.com"),
])
def test_a_malformed_value_is_an_error_naming_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        WorkerSettings.from_env({name: value})
