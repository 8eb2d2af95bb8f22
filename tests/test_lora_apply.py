"""Applying LoRAs on the embedded tiny SDXL: formats agree, diffusers agrees, restoration is bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from sdxl_worker.errors import LoraError
from sdxl_worker.weights.adapters.lora import LoraAdapter
from sdxl_worker.weights.load import ParsedLora, cast_factors, fold_alphas, load_lora
from sdxl_worker.weights.patcher import LoraPatcher, ScaledLora, fused_weight
from sdxl_worker.weights.ram_cache import LoraRamCache
from tests.support.lora_forms import (canonical_factors, write_diffusers, write_kohya, write_old_diffusers,
                                      write_peft_folder, write_sd15_shaped)
from tests.support.lycoris_files import write_lycoris
from tests.support.weights import assert_bit_identical, snapshot

ALL = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture
def pipe(tiny_model_dir):
    """A fresh float32 tiny pipeline per test (tests here change weights on purpose)."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipe, seed: int = 5, **kwargs) -> np.ndarray:
    return pipe("a harbour at night", height=64, width=64, num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images[0]


def parse(path, unet_config=None) -> ParsedLora:
    return load_lora(path, sha256=path.name, unet_config=unet_config)


def test_kohya_diffusers_old_diffusers_and_peft_forms_patch_the_same_bits(pipe, tmp_path):
    factors = canonical_factors(pipe, ("unet",), rank=4, seed=1, alpha=2.0)
    forms = [write_kohya(tmp_path / "k.safetensors", factors), write_diffusers(tmp_path / "d.safetensors", factors),
             write_old_diffusers(tmp_path / "o.safetensors", factors), write_peft_folder(tmp_path / "peft", factors)]
    patcher = LoraPatcher(pipe)
    images, weights = [], []
    for path in forms:
        with patcher.applied([ScaledLora(parse(path, pipe.unet.config), 0.7, path.name)]) as reports:
            assert reports[0].modules_patched == {"unet": len(factors)}
            weights.append(snapshot(pipe))
            images.append(render(pipe))
    for other_weights, other_image in zip(weights[1:], images[1:]):
        assert all(torch.equal(weights[0][key], other_weights[key]) for key in weights[0])
        assert np.array_equal(images[0], other_image)


def test_text_encoder_forms_agree(pipe, tmp_path):
    factors = canonical_factors(pipe, ALL, rank=3, seed=2, alpha=1.5)
    kohya = parse(write_kohya(tmp_path / "k.safetensors", factors), pipe.unet.config)
    diffusers_form = parse(write_diffusers(tmp_path / "d.safetensors", factors), pipe.unet.config)
    old = parse(write_old_diffusers(tmp_path / "o.safetensors", factors), pipe.unet.config)
    patcher = LoraPatcher(pipe)
    results = []
    for lora in (kohya, diffusers_form, old):
        with patcher.applied([ScaledLora(lora, 1.0, "form")]) as reports:
            counts = reports[0].modules_patched
            results.append(snapshot(pipe))
        assert counts == {c: sum(1 for comp, _ in factors if comp == c) for c in ALL}
    for other in results[1:]:
        assert all(torch.equal(results[0][key], other[key]) for key in results[0])


def test_two_loras_match_diffusers_unfused_set_adapters_within_one_level(pipe, tiny_model_dir, tmp_path):
    first = write_kohya(tmp_path / "a.safetensors", canonical_factors(pipe, ALL, rank=4, seed=3, up_std=0.2))
    second = write_kohya(tmp_path / "b.safetensors", canonical_factors(pipe, ("unet",), rank=8, seed=4, up_std=0.2))
    with LoraPatcher(pipe).applied([ScaledLora(parse(first, pipe.unet.config), 0.8, "a"),
                                    ScaledLora(parse(second, pipe.unet.config), 1.2, "b")]):
        ours = render(pipe)
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(first), adapter_name="a")
    reference.load_lora_weights(str(second), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.8, 1.2])
    theirs = render(reference)
    baseline = render(pipe)
    assert np.abs(ours - baseline).max() > 0.05, "the LoRAs must visibly change the image"
    assert np.abs(ours - theirs).max() <= 1 / 255


def test_scale_zero_gives_the_baseline_image(pipe, tmp_path):
    lora = parse(write_kohya(tmp_path / "a.safetensors", canonical_factors(pipe, ALL, rank=4, seed=5)),
                 pipe.unet.config)
    baseline = render(pipe)
    with LoraPatcher(pipe).applied([ScaledLora(lora, 0.0, "zero")]) as reports:
        assert reports[0].skipped_zero_scale
        assert np.array_equal(render(pipe), baseline)


def test_the_unet_and_the_text_encoders_take_their_own_scales(pipe, tmp_path):
    factors = canonical_factors(pipe, ALL, rank=4, seed=6)
    both = parse(write_kohya(tmp_path / "both.safetensors", factors), pipe.unet.config)
    split = {part: {key: value for key, value in factors.items() if (key[0] == "unet") == (part == "unet")}
             for part in ("unet", "te")}
    parts = {part: parse(write_kohya(tmp_path / f"{part}.safetensors", chosen), pipe.unet.config)
             for part, chosen in split.items()}
    reference = snapshot(pipe)
    with LoraPatcher(pipe).applied([ScaledLora(parts["unet"], 0.7, "u"), ScaledLora(parts["te"], -0.4, "t")]):
        expected = snapshot(pipe)
    with LoraPatcher(pipe).applied([ScaledLora(both, 0.7, "both", te_scale=-0.4)]) as reports:
        assert_bit_identical(pipe, expected)
        assert set(reports[0].modules_patched) == set(ALL)
    with LoraPatcher(pipe).applied([ScaledLora(both, 0.7, "unet only", te_scale=0.0)]) as reports:
        unet_only = snapshot(pipe)
        assert set(reports[0].modules_patched) == {"unet"} and not reports[0].skipped_zero_scale
    changed = {key.split(".", 1)[0] for key in reference if not torch.equal(reference[key], unet_only[key])}
    assert changed == {"unet"}
    with LoraPatcher(pipe).applied([ScaledLora(both, 0.0, "te only", te_scale=0.5)]) as reports:
        te_only = snapshot(pipe)
        assert set(reports[0].modules_patched) == {"text_encoder", "text_encoder_2"}
    changed = {key.split(".", 1)[0] for key in reference if not torch.equal(reference[key], te_only[key])}
    assert changed == {"text_encoder", "text_encoder_2"}
    with LoraPatcher(pipe).applied([ScaledLora(both, 0.0, "off", te_scale=0.0)]) as reports:
        assert reports[0].skipped_zero_scale
        assert_bit_identical(pipe, reference)
    assert_bit_identical(pipe, reference)


def test_kept_fused_weights_are_not_reused_for_another_text_encoder_scale(pipe, tmp_path):
    lora = parse(write_kohya(tmp_path / "a.safetensors", canonical_factors(pipe, ALL, rank=4, seed=7)),
                 pipe.unet.config)
    patcher = LoraPatcher(pipe)
    with patcher.applied([ScaledLora(lora, 0.6, "a", te_scale=0.6)]):
        pass
    with patcher.applied([ScaledLora(lora, 0.6, "a", te_scale=0.1)]) as reports:
        assert not reports[0].reused_fused
        fresh = snapshot(pipe)
    with LoraPatcher(pipe, reuse_fused=False).applied([ScaledLora(lora, 0.6, "a", te_scale=0.1)]):
        assert_bit_identical(pipe, fresh)


def poisoned(lora: ParsedLora) -> ParsedLora:
    """The same LoRA with its last UNet module's factors on the meta device: applying fails midway, for real."""
    components = {name: dict(modules) for name, modules in lora.components.items()}
    last = sorted(components["unet"])[-1]
    components["unet"][last] = components["unet"][last].to("meta", torch.float32)
    return ParsedLora(sha256=lora.sha256 + "-poisoned", components=components)


def test_fifty_random_jobs_with_failures_leave_every_weight_bit_identical(pipe, tmp_path):
    reference = snapshot(pipe)
    baseline = render(pipe)
    config = pipe.unet.config
    loras = [
        parse(write_kohya(tmp_path / "unet.safetensors", canonical_factors(pipe, ("unet",), 4, seed=10)), config),
        parse(write_kohya(tmp_path / "all.safetensors", canonical_factors(pipe, ALL, 8, seed=11, alpha=4)), config),
        parse(write_kohya(tmp_path / "conv.safetensors",
                          canonical_factors(pipe, ("unet",), 2, seed=12, convs=True)), config),
        parse(write_diffusers(tmp_path / "te.safetensors", canonical_factors(pipe, ALL[1:], 4, seed=13)), config),
        *(parse(write_lycoris(pipe, tmp_path / f"{algo}-{i}.safetensors", algo, seed=20 + i, **options), config)
          for i, (algo, options) in enumerate([("lora", {"use_tucker": True}), ("loha", {"use_tucker": True}),
                                               ("lokr", {"factor": 4}), ("full", {"std": 0.02}),
                                               ("lora", {"dora_wd": True}),
                                               ("loha", {"dora_wd": True, "wd_on_output": False})])),
    ]
    assert any(f.down.dim() == 4 for f in loras[2].components["unet"].values())
    patcher = LoraPatcher(pipe)
    rng = random.Random(2026)
    failures = {"generation": 0, "apply": 0}
    for _ in range(50):
        chosen = [ScaledLora(lora, rng.choice([-1.5, -0.3, 0.0, 0.5, 1.0, 2.0]), f"l{i}")
                  for i, lora in enumerate(rng.sample(loras, rng.randint(1, len(loras))))]
        mode = rng.choice(["ok", "ok", "generation", "apply"])
        if mode == "apply":
            chosen.append(ScaledLora(poisoned(loras[0]), 1.0, "poisoned"))
        try:
            with patcher.applied(chosen):
                pipe.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 64),
                          added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)})
                if mode == "generation":
                    raise RuntimeError("injected failure during generation")
        except (RuntimeError, NotImplementedError):
            failures[mode] += 1
    assert failures["generation"] > 0 and failures["apply"] > 0
    assert_bit_identical(pipe, reference)
    assert np.array_equal(render(pipe), baseline)


def test_sd15_lora_is_rejected_with_counts_before_any_weight_changes(pipe, tmp_path):
    reference = snapshot(pipe)
    lora = parse(write_sd15_shaped(tmp_path / "sd15.safetensors"), pipe.unet.config)
    good = parse(write_kohya(tmp_path / "g.safetensors", canonical_factors(pipe, ("unet",), 2, seed=6)),
                 pipe.unet.config)
    with pytest.raises(LoraError, match=r"sd15: only 0/3 LoRA modules match this SDXL model"):
        LoraPatcher(pipe).apply([ScaledLora(good, 1.0, "good"), ScaledLora(lora, 1.0, "sd15")])
    assert_bit_identical(pipe, reference)


def test_shape_mismatch_is_reported(pipe, tmp_path):
    factors = canonical_factors(pipe, ("unet",), 2, seed=7)
    (component, name), (down, up, alpha) = next(iter(factors.items()))
    factors[(component, name)] = (torch.randn(2, down.shape[1] + 1), up, alpha)
    lora = parse(write_kohya(tmp_path / "bad.safetensors", factors), pipe.unet.config)
    with pytest.raises(LoraError, match=r"do not fit the weight's shape"):
        LoraPatcher(pipe).apply([ScaledLora(lora, 1.0, "bad")])


@pytest.mark.parametrize("marker, kind", [("oft_blocks", "OFT"), ("on_input", "IA3"), ("a1.weight", "GLoRA"),
                                          ("lora_magnitude_vector", "DoRA")])
def test_lycoris_and_dora_files_get_an_error_naming_the_type(tmp_path, marker, kind):
    path = tmp_path / f"{kind}.safetensors"
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.{marker}": torch.randn(4, 4), f"{key}.lora_down.weight": torch.randn(2, 64),
               f"{key}.lora_up.weight": torch.randn(64, 2)}, str(path))
    with pytest.raises(LoraError, match=kind):
        parse(path)


def test_a_checkpoint_without_lora_weights_is_rejected(tmp_path):
    path = tmp_path / "not-a-lora.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)}, str(path))
    with pytest.raises(LoraError, match="no LoRA weights"):
        parse(path)


def test_a_factor_without_its_pair_refuses_the_file_naming_the_key(pipe, tmp_path):
    factors = canonical_factors(pipe, ("unet",), 2, seed=14)
    state = load_file(str(write_diffusers(tmp_path / "d.safetensors", factors)))
    module = next(key for key in state if key.endswith(".lora_A.weight"))[: -len(".lora_A.weight")]
    state[f"{module}_lone.lora_A.weight"] = torch.randn(2, 8)
    save_file(state, str(tmp_path / "lone.safetensors"))
    with pytest.raises(LoraError, match=rf"'{module}_lone\.lora_A\.weight' \(a factor without the rest of its "
                                        r"adapter\)"):
        parse(tmp_path / "lone.safetensors", pipe.unet.config)
    lora = parse(write_diffusers(tmp_path / "d.safetensors", factors), pipe.unet.config)
    assert lora.module_count == len(factors)
    assert all(isinstance(adapter, LoraAdapter) and adapter.rank == 2 for adapter in lora.components["unet"].values())


def test_peft_dora_folder_is_refused(pipe, tmp_path):
    folder = write_peft_folder(tmp_path / "dora", canonical_factors(pipe, ("unet",), 2, seed=8))
    config = (folder / "adapter_config.json").read_text().replace('"peft_type"', '"use_dora": true, "peft_type"')
    (folder / "adapter_config.json").write_text(config)
    with pytest.raises(LoraError, match="DoRA"):
        parse(folder)


def test_ram_cache_returns_the_same_object_and_evicts_least_recently_used(pipe, tmp_path):
    parsed = {seed: parse(write_kohya(tmp_path / f"{seed}.safetensors",
                                      canonical_factors(pipe, ("unet",), 4, seed=seed)), pipe.unet.config)
              for seed in (1, 2, 3)}
    cache = LoraRamCache(budget_bytes=int(parsed[1].nbytes * 2.5))
    loads = []

    def loader(seed):
        loads.append(seed)
        return parsed[seed]

    first, hit = cache.get_or_load("1", lambda: loader(1))
    again, hit_again = cache.get_or_load("1", lambda: loader(1))
    assert first is again and not hit and hit_again and loads == [1]
    cache.get_or_load("2", lambda: loader(2))
    cache.get_or_load("1", lambda: loader(1))      # 1 is now the most recently used
    cache.get_or_load("3", lambda: loader(3))      # over budget: 2 goes
    assert cache.nbytes <= cache.budget_bytes
    cache.get_or_load("1", lambda: loader(1))
    cache.get_or_load("2", lambda: loader(2))
    assert loads == [1, 2, 3, 2]


def test_same_set_as_last_job_reuses_the_fused_weights_with_identical_results(pipe, tmp_path):
    reference = snapshot(pipe)
    lora = parse(write_kohya(tmp_path / "a.safetensors", canonical_factors(pipe, ALL, rank=4, seed=9)),
                 pipe.unet.config)
    reusing, recomputing = LoraPatcher(pipe), LoraPatcher(pipe, reuse_fused=False)
    with recomputing.applied([ScaledLora(lora, 0.6, "a")]) as reports:
        expected = render(pipe)
        assert not reports[0].reused_fused
    outcomes = []
    for scale in (0.6, 0.6, 0.9, 0.6):
        with reusing.applied([ScaledLora(lora, scale, "a")]) as reports:
            outcomes.append((reports[0].reused_fused, render(pipe)))
        assert_bit_identical(pipe, reference)
    assert [reused for reused, _ in outcomes] == [False, True, False, False]
    assert np.array_equal(outcomes[0][1], expected) and np.array_equal(outcomes[1][1], expected)
    assert not np.array_equal(outcomes[2][1], expected)


def test_another_set_is_fused_into_the_kept_tensors_with_the_bits_of_a_fresh_fuse(pipe, tmp_path):
    reference = snapshot(pipe)
    config = pipe.unet.config
    first = parse(write_kohya(tmp_path / "a.safetensors", canonical_factors(pipe, ALL, rank=4, seed=9)), config)
    second = parse(write_kohya(tmp_path / "b.safetensors", canonical_factors(pipe, ALL, rank=8, seed=10)), config)
    unet_only = parse(write_kohya(tmp_path / "c.safetensors", canonical_factors(pipe, ("unet",), 2, seed=11)), config)
    jobs = [[ScaledLora(second, 0.7, "b")], [ScaledLora(second, -0.4, "b"), ScaledLora(unet_only, 1.3, "c")],
            [ScaledLora(unet_only, 0.5, "c")]]
    expected = []
    for job in jobs:
        with LoraPatcher(pipe, reuse_fused=False).applied(job):
            expected.append(snapshot(pipe))
    patcher = LoraPatcher(pipe)
    with patcher.applied([ScaledLora(first, 0.6, "a")]):
        pass
    for job, fresh in zip(jobs, expected):
        kept = {id(weight): tensor.data_ptr() for weight, tensor in patcher._kept.items()}
        with patcher.applied(job):
            assert snapshot(pipe).keys() == fresh.keys()
            changed = [key for key in fresh if not torch.equal(snapshot(pipe)[key], fresh[key])]
            assert not changed, f"{len(changed)} tensors differ from a fresh fuse, e.g. {changed[:3]}"
            written = [weight.data.data_ptr() for weight in patcher._originals if id(weight) in kept]
            assert written and all(pointer in kept.values() for pointer in written)  # no new memory where it fit
        assert_bit_identical(pipe, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(320, 640), (64, 32, 3, 3)])
def test_one_lora_fuses_in_the_weight_dtype_within_one_rounding_of_float32(dtype, shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator).to(dtype)
    down = torch.randn(8, *shape[1:], generator=generator).to(dtype)
    up = (torch.randn(shape[0], 8, *([1, 1] if len(shape) == 4 else []), generator=generator) * 1e-2).to(dtype)
    rounded_once = torch.addmm(weight.reshape(shape[0], -1).float(), up.flatten(1).float(), down.flatten(1).float(),
                               alpha=0.8).to(dtype).view(shape).float()
    fused = fused_weight(weight, [(LoraAdapter(down=down, up=up), 0.8)])
    assert fused.dtype == dtype and fused.shape == weight.shape
    # Only the float32 summation order may differ: at most one step (ulp) of the weight's dtype.
    info = torch.finfo(dtype)
    assert ((fused.float() - rounded_once).abs() <= rounded_once.abs() * info.eps + info.tiny).all()
    assert (fused.float() != rounded_once).float().mean() < 0.01
    buffer = torch.empty_like(weight)
    assert fused_weight(weight, [(LoraAdapter(down=down, up=up), 0.8)], out=buffer) is buffer
    assert torch.equal(buffer, fused)


def test_alpha_folding_scales_each_up_factor_once_even_when_keys_share_a_tensor():
    down, up = torch.randn(4, 16), torch.randn(16, 4)
    original_up = up.clone()
    state = {"a.lora_down.weight": down, "a.lora_up.weight": up, "a.alpha": torch.tensor(2.0),
             "b.lora_down.weight": down.clone(), "b.lora_up.weight": up, "b.alpha": torch.tensor(2.0)}
    cast = cast_factors(state, "cpu", torch.float32)
    assert cast["a.lora_down.weight"] is down  # already on the device in the dtype: kept, not copied
    folded = fold_alphas(cast)
    for module in ("a", "b"):
        assert torch.equal(folded[f"{module}.lora_up.weight"], original_up * 0.5)
    assert "a.alpha" not in folded
