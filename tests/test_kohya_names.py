"""kohya names (SGM and diffusers UNet paths, text encoders): every module kind maps, on the tiny model and on the
full-size SDXL architecture; SGM-named files patch the same bits as their diffusers-named twins; a key that would
not be applied refuses the file, naming the key.

The SGM <-> diffusers mapping the tests use is kohya's own (``tests.support.kohya_reference``), not the worker's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.pipelines import FULL_ARCH_DIR
from sdxl_worker.errors import LoraError
from sdxl_worker.weights.kohya_names import kohya_module
from sdxl_worker.weights.load import load_lora
from sdxl_worker.weights.patcher import LoraPatcher, ScaledLora
from tests.support.kohya_reference import kohya_name, kohya_sgm_name
from tests.support.lora_forms import Factors, write_diffusers, write_kohya
from tests.support.weights import snapshot

ALL = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
ARCH_DIR = next((path for path in (FULL_ARCH_DIR, Path(__file__).resolve().parents[2] / "shared" / "sdxl-arch")
                 if (path / "unet" / "config.json").is_file()), None)


@pytest.fixture
def pipe(tiny_model_dir):
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d: what LyCORIS' full preset targets, a superset of kohya's, OneTrainer's,
    SimpleTuner's and diffusers' trainers' choices."""
    return {name: layer for name, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}


def every_layer_factors(pipe, rank: int = 2, seed: int = 0) -> Factors:
    generator = torch.Generator().manual_seed(seed)
    factors: Factors = {}
    for component in ALL:
        for name, layer in sorted(layers(getattr(pipe, component)).items()):
            out_features, in_features, *kernel = layer.weight.shape
            down = torch.randn(rank, in_features, *kernel, generator=generator) / (layer.weight[0].numel() ** 0.5)
            up = torch.randn(out_features, rank, *([1] * len(kernel)), generator=generator) * 0.2
            factors[(component, name)] = (down, up, float(rank * 2))
    return factors


def sgm_name(component: str, path: str) -> str:
    """The name kohya sd-scripts writes for a module (SGM block names for the UNet), by kohya's own code."""
    name = kohya_name(KOHYA_PREFIX[component], path)
    return kohya_sgm_name(name) if component == "unet" else name


def write_sgm(path: Path, factors: Factors) -> Path:
    state = {}
    for (component, name), (down, up, alpha) in factors.items():
        key = sgm_name(component, name)
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                      f"{key}.alpha": torch.tensor(alpha)})
    save_file(state, str(path))
    return path


def test_sgm_names_patch_the_same_bits_as_diffusers_names_for_every_module_kind(pipe, tmp_path):
    factors = every_layer_factors(pipe)
    names = {sgm_name(component, path) for component, path in factors}
    for kind in ("attn1_to_q", "attn2_to_out_0", "in_layers_2", "out_layers_3", "skip_connection", "emb_layers_1",
                 "input_blocks_3_0_op", "output_blocks_2_2_conv", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2",
                 "time_embed_0", "label_emb_0_2", "input_blocks_0_0", "out_2", "lora_te1_", "lora_te2_", "mlp_fc1",
                 "mlp_fc2", "self_attn_out_proj", "lora_te2_text_projection"):
        assert any(kind in name for name in names), kind
    files = {"sgm": write_sgm(tmp_path / "sgm.safetensors", factors),
             "kohya": write_kohya(tmp_path / "kohya.safetensors", factors),
             "diffusers": write_diffusers(tmp_path / "diffusers.safetensors", factors)}
    reference = snapshot(pipe)
    patched = {}
    for form, path in files.items():
        lora = load_lora(path, sha256=form, unet_config=pipe.unet.config)
        assert lora.module_count == len(factors), form
        with LoraPatcher(pipe).applied([ScaledLora(lora, 0.8, form, te_scale=0.5)]):
            patched[form] = snapshot(pipe)
    for form in ("sgm", "kohya"):
        differing = [key for key in reference if not torch.equal(patched[form][key], patched["diffusers"][key])]
        assert not differing, (form, differing[:3])
    changed = {key for key in reference if not torch.equal(reference[key], patched["sgm"][key])}
    assert {f"{component}.{name}.weight" for component, name in factors} <= changed


@pytest.mark.skipif(ARCH_DIR is None, reason="the full-size SDXL configs (../shared/sdxl-arch) are not here")
def test_every_module_of_the_full_size_sdxl_maps_from_its_kohya_names():
    config = UNet2DConditionModel.load_config(ARCH_DIR / "unet")
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel.from_config(config),
                   "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(ARCH_DIR / "text_encoder")),
                   "text_encoder_2": CLIPTextModelWithProjection(
                       CLIPTextConfig.from_pretrained(ARCH_DIR / "text_encoder_2"))}
    checked = 0
    for component, module in modules.items():
        for path in layers(module):
            for name in {sgm_name(component, path), kohya_name(KOHYA_PREFIX[component], path)}:
                assert kohya_module(name, config) == (component, path), name
                checked += 1
    assert checked > 1800  # the full-size layers were listed: over 1,800 names


def test_a_key_no_adapter_reads_refuses_the_file_naming_it(pipe, tmp_path):
    factors = every_layer_factors(pipe)
    state = load_file(str(write_sgm(tmp_path / "a.safetensors", factors)))
    del state["lora_unet_input_blocks_3_0_op.lora_down.weight"], state["lora_unet_input_blocks_3_0_op.lora_up.weight"]
    save_file(state, str(tmp_path / "orphan.safetensors"))
    with pytest.raises(LoraError, match=r"1 key\(s\) would not be applied, so the file is refused: "
                                        r"'unet\.down_blocks\.0\.downsamplers\.0\.conv\.alpha' \(an alpha of a "
                                        r"module without lora_down/lora_up factors\)"):
        load_lora(tmp_path / "orphan.safetensors", "x", pipe.unet.config)


@pytest.mark.parametrize("key, fragment", [
    ("lora_unet_input_blocks_x_1_proj_in", "has no SGM block number"),
    ("lora_unet_middle_block_3_proj_in", "the middle block has layers 0..2"),
    ("lora_unet_input_blocks_1_0_in_layers_1", "is no layer of an SGM resnet block"),
])
def test_a_kohya_name_of_no_sdxl_module_refuses_the_file_naming_the_key(tmp_path, key, fragment):
    save_file({f"{key}.lora_down.weight": torch.randn(2, 8), f"{key}.lora_up.weight": torch.randn(8, 2)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError, match=f"key '{key}.lora_down.weight' names no module.*{fragment}"):
        load_lora(tmp_path / "bad.safetensors", "x")
