"""The LyCORIS adapter types, on files written by the trainer (``lycoris-lora``): each fused image equals the image of
the tiny model with ``lycoris.functional``'s reference delta merged in float32, within one level per pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from sdxl_worker.errors import LoraError
from sdxl_worker.weights.load import load_lora
from sdxl_worker.weights.patcher import LoraPatcher, ScaledLora
from tests.support.lycoris_files import merge_reference, reference_weight, restore, write_lycoris
from tests.support.weights import assert_bit_identical, snapshot

CASES = {  # algo, options, factor std (a visible change), the types reported
    "locon-tucker": ("lora", {"use_tucker": True}, 0.3, {"lora", "locon-tucker"}),
    "loha": ("loha", {}, 0.4, {"loha"}),
    "loha-tucker": ("loha", {"use_tucker": True}, 0.4, {"loha"}),
    "lokr": ("lokr", {}, 0.3, {"lokr"}),
    "lokr-factored": ("lokr", {"factor": 4}, 0.3, {"lokr"}),
    "full": ("full", {}, 0.05, {"full"}),
    "full-and-norm": ("full", {"train_norm": True}, 0.05, {"full", "norm"}),
    "dora": ("lora", {"dora_wd": True}, 0.3, {"locon+dora"}),
    "dora-input-axis": ("loha", {"dora_wd": True, "wd_on_output": False}, 0.4, {"loha+dora"}),
    "lokr-dora": ("lokr", {"factor": 4, "dora_wd": True}, 0.3, {"lokr+dora"}),
}


def fresh(tiny_model_dir) -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """One float32 tiny pipeline for the module; every test leaves its weights as they were (and checks it)."""
    return fresh(tiny_model_dir)


def render(pipe, seed: int = 5) -> np.ndarray:
    return pipe("a harbour at night", height=64, width=64, num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def report_types(report) -> set[str]:
    kinds = report.type if isinstance(report.type, dict) else {"all": report.type}
    return {kind for value in kinds.values() for kind in ([value] if isinstance(value, str) else value)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_type_matches_the_trainers_reference_merge_within_one_level(pipe, tmp_path, case):
    algo, options, std, types = CASES[case]
    path = write_lycoris(pipe, tmp_path / f"{case}.safetensors", algo, seed=len(case), std=std, **options)
    lora = load_lora(path, sha256=case, unet_config=pipe.unet.config)  # refuses the file if any key is left unread
    assert lora.module_count > 0
    weights = snapshot(pipe)
    baseline = render(pipe)
    with LoraPatcher(pipe).applied([ScaledLora(lora, 0.8, case)]) as reports:
        ours = render(pipe)
    assert_bit_identical(pipe, weights)
    assert report_types(reports[0]) == types
    assert reports[0].as_dict()["type"] == reports[0].type
    replaced = merge_reference(pipe, path, 0.8)
    try:
        assert len({id(param) for param in replaced}) >= lora.module_count
        theirs = render(pipe)
    finally:
        restore(replaced)
    assert np.abs(ours - baseline).max() > 0.05, "the adapter must visibly change the image"
    assert np.abs(ours - theirs).max() <= 1 / 255


def test_reference_deltas_agree_with_a_hand_computation():
    """The oracle checked once by hand per type: LoHa, LoKr (both alpha rules), Tucker LoCon, DoRA on both axes."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4)
    a, b, c, d = torch.randn(6, 2), torch.randn(2, 4), torch.randn(6, 2), torch.randn(2, 4)
    loha = {"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": c, "hada_w2_b": d, "alpha": torch.tensor(1.0)}
    torch.testing.assert_close(reference_weight(weight, loha, 0.5), weight + 0.5 * 0.5 * (a @ b) * (c @ d))
    w1, w2 = torch.randn(2, 2), torch.randn(3, 2)
    whole = {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}
    torch.testing.assert_close(reference_weight(weight, whole, 1.0), weight + torch.kron(w1, w2))
    w2a, w2b = torch.randn(3, 2), torch.randn(2, 2)
    factored = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)}
    torch.testing.assert_close(reference_weight(weight, factored, 1.0), weight + 0.5 * torch.kron(w1, w2a @ w2b))
    conv = torch.randn(5, 3, 3, 3)
    down, up, mid = torch.randn(2, 3), torch.randn(5, 2), torch.randn(2, 2, 3, 3)
    tucker = {"lora_down.weight": down.reshape(2, 3, 1, 1), "lora_up.weight": up.reshape(5, 2, 1, 1),
              "lora_mid.weight": mid, "alpha": torch.tensor(2.0)}
    by_hand = torch.einsum("ab,bckl,cd->adkl", up, mid, down)
    torch.testing.assert_close(reference_weight(conv, tucker, 1.0), conv + by_hand)
    for magnitude, norm in ((torch.rand(6, 1) + 1, lambda w: w.norm(dim=1, keepdim=True)),
                            (torch.rand(1, 4) + 1, lambda w: w.norm(dim=0, keepdim=True))):
        dora = {"lora_down.weight": b, "lora_up.weight": a, "alpha": torch.tensor(2.0), "dora_scale": magnitude}
        merged = weight + a @ b
        for strength in (1.0, 0.4):
            expected = merged * (strength * (magnitude / norm(merged) - 1) + 1)
            torch.testing.assert_close(reference_weight(weight, dora, strength), expected)


def test_a_file_mixing_types_reports_the_type_per_component(pipe, tmp_path):
    loha = load_file(str(write_lycoris(pipe, tmp_path / "loha.safetensors", "loha", seed=1)))
    lokr = load_file(str(write_lycoris(pipe, tmp_path / "lokr.safetensors", "lokr", seed=2, factor=4)))
    mixed = {key: value for key, value in loha.items() if key.startswith("lora_unet_")}
    mixed.update({key: value for key, value in lokr.items() if key.startswith("lora_te")})
    mixed.update({key: value for key, value in lokr.items() if key.startswith("lora_unet_mid_block")})
    for key in [key for key in mixed if key.startswith("lora_unet_mid_block") and "hada_" in key]:
        del mixed[key]
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    lora = load_lora(tmp_path / "mixed.safetensors", sha256="mixed", unet_config=pipe.unet.config)
    with LoraPatcher(pipe).applied([ScaledLora(lora, 1.0, "mixed")]) as reports:
        ours = render(pipe)
    unet_types = reports[0].type["unet"]
    assert set(unet_types) == {"loha", "lokr"} and unet_types["lokr"] > 0
    assert reports[0].type["text_encoder"] == "lokr" and reports[0].type["text_encoder_2"] == "lokr"
    replaced = merge_reference(pipe, tmp_path / "mixed.safetensors", 1.0)
    try:
        theirs = render(pipe)
    finally:
        restore(replaced)
    assert np.abs(ours - theirs).max() <= 1 / 255


def test_a_misfit_is_counted_per_type_before_any_weight_changes(pipe, tmp_path):
    state = load_file(str(write_lycoris(pipe, tmp_path / "loha.safetensors", "loha", seed=3)))
    key = next(key for key in state if key.endswith("attn1_to_q.hada_w1_a"))
    state[key] = torch.randn(state[key].shape[0] + 1, state[key].shape[1])
    state["lora_unet_conv_in.diff"] = torch.randn(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    lora = load_lora(tmp_path / "bad.safetensors", sha256="bad", unet_config=pipe.unet.config)
    reference = snapshot(pipe)
    with pytest.raises(LoraError, match=r"do not fit the weight's shape.*per type full 0/1, loha \d+/\d+"):
        LoraPatcher(pipe).apply([ScaledLora(lora, 1.0, "bad")])
    assert_bit_identical(pipe, reference)
