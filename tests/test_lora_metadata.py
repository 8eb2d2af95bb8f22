"""LoRA metadata from the safetensors header alone: kohya ``ss_*`` and ``modelspec.*`` fields, base model families,
trigger words, files whose tensors are never read, and whether a LoRA may patch a text encoder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdxl_worker.weights.load import TEXT_ENCODERS, load_lora
from sdxl_worker.weights.metadata import (LoraMetadata, base_model_problem, lora_metadata, may_patch_text_encoders,
                                          merge_trigger_words, metadata_from_fields, read_header_metadata)
from tests.support.lora_forms import (canonical_factors, write_diffusers, write_kohya, write_old_diffusers,
                                      write_peft_folder)
from tests.support.servers.lora_files import lora_tensors, torch_lora_bytes

KOHYA = {
    "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4", "ss_v2": "False",
    "ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_output_name": "pixel-cabin",
    "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 12, " pixel art": 12, "snow": 5},
                                    "2_extra": {"forest": 2, "ohwx": 2, "pixel art": 2}}),
}
MODELSPEC = {
    "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.title": "Film Grain XL", "modelspec.trigger_phrase": "film grain, analog photo,, Film Grain",
    "ss_output_name": "film_grain_v3",
}


def write(path: Path, metadata: dict[str, str] | None) -> Path:
    save_file(lora_tensors(), str(path), metadata=metadata)
    return path


def test_kohya_fields_give_name_base_model_and_most_frequent_tags(tmp_path):
    metadata = lora_metadata(write(tmp_path / "k.safetensors", KOHYA), "k")
    assert metadata.report() == {"name": "pixel-cabin", "base_model": "SDXL", "trigger_words": ["ohwx", "pixel art"]}
    assert metadata.evidence == "ss_base_model_version='sdxl_base_v1-0'" and base_model_problem(metadata) is None


def test_modelspec_title_and_trigger_phrase_win_over_kohya_fields(tmp_path):
    metadata = lora_metadata(write(tmp_path / "m.safetensors", MODELSPEC), "m")
    assert metadata.report() == {"name": "Film Grain XL", "base_model": "SDXL",
                                 "trigger_words": ["film grain", "analog photo"]}


def test_no_metadata_pt_files_and_broken_headers_report_nothing(tmp_path):
    assert lora_metadata(write(tmp_path / "plain.safetensors", None), "p") == LoraMetadata()
    (tmp_path / "old.pt").write_bytes(torch_lora_bytes())
    assert lora_metadata(tmp_path / "old.pt", "o") == LoraMetadata()
    for name, data in (("short", b"\x01\x00"), ("huge", struct.pack("<Q", 2**40) + b"{}"),
                       ("notjson", struct.pack("<Q", 5) + b"{nope"), ("list", struct.pack("<Q", 2) + b"[]")):
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        assert read_header_metadata(tmp_path / f"{name}.safetensors") == {}


def test_only_the_header_is_read_a_file_truncated_after_it_still_reports(tmp_path):
    path = write(tmp_path / "cut.safetensors", {**KOHYA, "ss_base_model_version": "sd_v1"})
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:header_end])  # every tensor byte gone
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="pt")  # the control: a tensor reader refuses this file
    metadata = lora_metadata(path, "cut")
    assert metadata.family == "SD 1.x" and metadata.name == "pixel-cabin"


@pytest.mark.parametrize("fields, family", [
    ({"ss_base_model_version": "sd_v1"}, "SD 1.x"),
    ({"ss_base_model_version": "sd_v1_v"}, "SD 1.x"),
    ({"ss_base_model_version": "sd_v2_v"}, "SD 2.x"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
    ({"ss_base_model_version": "flux1"}, "Flux"),
    ({"ss_v2": "True"}, "SD 2.x"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "SD 1.x"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "SD 2.x"),
    ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "SD 3"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "Flux"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, "SDXL refiner"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_base_model_version": "sd_v1"}, "SDXL"),
])
def test_base_model_families(fields, family):
    metadata = metadata_from_fields(fields)
    assert metadata.family == family and metadata.base_model == family
    problem = base_model_problem(metadata)
    assert (problem is None) == (family == "SDXL")
    if problem:
        assert problem.startswith(f"its metadata says it was trained for {family} (") and "not SDXL" in problem


def test_unrecognized_base_model_is_reported_as_written_and_allowed():
    metadata = metadata_from_fields({"ss_base_model_version": "pony_v6", "ss_v2": "False"})
    assert metadata.base_model == "pony_v6" and metadata.family is None and base_model_problem(metadata) is None


def test_peft_folder_reports_its_config_base_model(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "r": 4, "base_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0"}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    metadata = lora_metadata(folder, "peft")
    assert metadata.base_model == "stabilityai/stable-diffusion-xl-base-1.0" and metadata.family is None


def test_tag_frequency_that_is_not_the_kohya_shape_gives_no_words():
    for raw in ("not json", "[1, 2]", json.dumps({"a": ["x"]}), json.dumps({"a": {"x": "many"}})):
        assert metadata_from_fields({"ss_tag_frequency": raw}).trigger_words == ()


def test_merge_trigger_words_keeps_order_and_drops_repeats_ignoring_case():
    assert merge_trigger_words(["Ohwx", "pixel art"], ["ohwx", "snow"], []) == ("Ohwx", "pixel art", "snow")


def write_text_encoder_peft_folder(folder: Path, factors) -> Path:
    """A PEFT adapter folder for the first text encoder, keyed ``base_model.model.text_model.<path>`` as PEFT saves
    a ``CLIPTextModel``'s adapter."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    state = {}
    for (_, name), (down, up, _) in factors.items():
        key = f"base_model.model.text_model.{name}"
        state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


UNET, TEXT_ENCODER, ALL = ("unet",), ("text_encoder",), ("unet", "text_encoder", "text_encoder_2")
WRITERS = {"kohya": write_kohya, "diffusers": write_diffusers, "old diffusers": write_old_diffusers,
           "PEFT": write_peft_folder, "PEFT text encoder": write_text_encoder_peft_folder}


@pytest.mark.parametrize("form, components", [
    ("kohya", UNET), ("kohya", ALL), ("kohya", TEXT_ENCODER), ("diffusers", UNET), ("diffusers", ALL),
    ("old diffusers", UNET), ("old diffusers", ALL), ("PEFT", UNET), ("PEFT text encoder", TEXT_ENCODER),
])
def test_the_header_tells_whether_parsing_finds_text_encoder_weights(tmp_path, tiny_pipeline, form, components):
    factors = canonical_factors(tiny_pipeline, components, rank=4, seed=7)
    path = WRITERS[form](tmp_path / ("adapter" if form.startswith("PEFT") else "lora.safetensors"), factors)
    parsed = load_lora(path, "sha", unet_config=tiny_pipeline.unet.config)
    patches = any(parsed.components.get(name) for name in TEXT_ENCODERS)
    assert patches == (components != UNET)
    assert may_patch_text_encoders(path) == patches


def test_without_a_readable_header_a_lora_may_patch_a_text_encoder(tmp_path):
    (tmp_path / "unet-only.pt").write_bytes(torch_lora_bytes())
    (tmp_path / "broken.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    assert may_patch_text_encoders(tmp_path / "unet-only.pt")
    assert may_patch_text_encoders(tmp_path / "broken.safetensors")
    assert not may_patch_text_encoders(write(tmp_path / "unet-only.safetensors", KOHYA))
