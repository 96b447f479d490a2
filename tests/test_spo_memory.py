"""The SPO memory planner: choices per card, explicit options win, the no-fit error, agreement with the simulation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pycore.spo.config import from_preset
from pycore.spo.memory import GiB, MemoryError_, estimate, fits, plan

#: What `--memory auto` chooses for the official settings (without bitsandbytes, as on this machine and most installs).
LEAN = ["gradient checkpointing", "SPM in half precision", "VAE slicing", "SPM and VAE on the CPU while training"]
EXPECTED = {
    # 12 GiB: the SPM and VAE leave the card while training (10.3 GiB, rollout-bound; 11.9 with context + 5% margin)
    ("sdxl", 1024): {80: [], 24: ["gradient checkpointing"], 16: LEAN[:3], 12: [*LEAN, "micro-batch 1 × accumulation 4"]},
    # VAE tiling is skipped: at 512² (the tile size) it would not lower the peak
    ("sd15", 512): {80: [], 24: ["gradient checkpointing"], 16: LEAN, 12: [*LEAN, "micro-batch 1 × accumulation 10"]},
}  # fmt: skip


@pytest.mark.parametrize(("family", "res"), list(EXPECTED))
@pytest.mark.parametrize("card", [80, 24, 16, 12])
def test_choices_per_card(family, res, card):
    cfg = from_preset(family, resolution=res)
    if EXPECTED[(family, res)][card] is None:
        with pytest.raises(MemoryError_, match=f"does not fit a {card} GiB card"):
            plan(cfg, card, bitsandbytes=False)
        return
    p = plan(cfg, card, bitsandbytes=False)
    assert p.steps == EXPECTED[(family, res)][card]
    assert p.fits and fits(p.estimate.peak, card)
    assert p.config.mixed_precision == "fp16" and p.config.vae_dtype == "float16"  # CUDA defaults: the official precision
    if p.steps:  # the fastest set that fits: the rung before did not
        before = plan(cfg, 1e6, bitsandbytes=False)
        assert before.estimate.peak > p.estimate.peak


def test_12_gib_sdxl_plan_offloads_the_scorer_only_while_training():
    p = plan(from_preset("sdxl"), 12, bitsandbytes=False)
    e = p.estimate
    assert p.config.offload_scorer and "--set offload_scorer=true" in p.flags
    assert e.peak / GiB <= 12 and fits(e.peak, 12) and e.peak_phase == "rollout"
    scorer = e.components["spm"] + e.components["vae"]
    kept = estimate(p.config.replace(offload_scorer=False))
    assert kept.phases["training micro-step"] - e.phases["training micro-step"] == scorer  # only the training phase drops them
    assert kept.phases["rollout"] == e.phases["rollout"] and kept.phases["decode + score"] == e.phases["decode + score"]
    assert not fits(kept.peak, 12)
    with pytest.raises(MemoryError_, match="does not fit a 12 GiB card"):
        plan(from_preset("sdxl"), 12, explicit={"offload_scorer"}, bitsandbytes=False)


def test_explicit_options_win_and_the_effective_batch_is_kept():
    cfg = from_preset("sdxl")
    p = plan(cfg, 16, explicit={"spm_dtype"}, bitsandbytes=True)
    assert p.config.spm_dtype == "float32" and "SPM in half precision" in p.kept
    micro = plan(from_preset("sd15"), 12, bitsandbytes=True)
    c = micro.config
    assert c.train_batch_size == 1 and c.gradient_accumulation_steps == 10  # SD1.5: 10 × 1 → 1 × 10


def test_nothing_fits_names_the_smallest_peak_and_the_flags():
    with pytest.raises(MemoryError_) as e:
        plan(from_preset("sdxl"), 6, bitsandbytes=False)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit a 6 GiB card: the smallest peak hw reaches is" in msg
    assert "--gradient-checkpointing --spm-dtype float16 --vae-slicing --set offload_scorer=true --set train_batch_size=1" in msg
    assert "bitsandbytes" in msg


def test_estimate_components_are_the_parameter_counts():
    e = estimate(from_preset("sdxl").for_device("cuda", vae_fp16_safe=True))
    # SDXL UNet 2.567 B parameters in fp16; the rank-64 LoRA with gradients and AdamW in fp32 (16 bytes per parameter)
    assert 4.7 < e.components["unet"] / GiB < 4.9 and e.components["text_encoders"] == 0  # cached prompt embeddings
    assert e.components["optimizer"] == 2 * e.components["lora_params"]
    assert set(e.phases) == {"rollout", "decode + score", "training micro-step"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_model_within_5_percent_of_the_simulation_at_three_resolutions(family):
    """The closed form against bench/spo_memory_calibrate.py's meta-device simulation (not the fit points:
    fits at 768²/1280² SDXL and 256²/768² SD1.5; checked at 832², 1024², 1216² and 384², 512², 640²), for the
    phase variants the 24 and 12 GiB plans use. A tiled decode at or below the 512² tile is not tiled: the model
    then uses the untiled figures (fitted separately, above the tile)."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import spo_memory_calibrate as cal

    from pycore.spo.memory import activation, calibration, decode_key, effective_key, sample_key, spm_key, train_key

    keys = {sample_key("float16"), train_key("float16", True), decode_key("float16", "batched"), decode_key("float16", "sliced_tiled"),
            spm_key("float32"), spm_key("float16")}  # fmt: skip
    models = cal.Models(family)
    coef = calibration()[family]["activations"]
    for key, kind, var, fig in cal.variants(family):
        if key not in keys:
            continue
        n = cal.preset_n(models.cfg, kind)
        for res in cal.CHECK_RES[family]:
            sim = cal.simulate(models, kind, var, n, res)[fig]
            model = activation(coef[effective_key(key, res)], n, (res // 8) ** 2)
            # 5 %, or 32 MiB for the SPM's ~60 MiB of activations (images resized to 224²: almost no resolution term)
            assert abs(model - sim) < max(0.05 * sim, 32 * 2**20), (key, res, sim / GiB, model / GiB)


def test_a_cuda_run_takes_the_plan_and_says_so():
    """run.train's planning step on a (declared) 24 GiB CUDA card: the config it trains with and the line it prints."""
    from pycore.spo.run import TrainRequest, _plan_memory

    cfg = from_preset("sdxl")
    said: list[str] = []
    req = TrainRequest(base="b", spm="s", prompts="p.txt", out="o", config=cfg, gpu_memory=24)
    p = _plan_memory(req, cfg, "cuda", said.append)
    assert p.config.gradient_checkpointing and p.config.mixed_precision == "fp16"
    assert said and said[0].startswith("memory (auto): gradient checkpointing; estimated peak 17.2 GiB of 24.0 GiB")
    assert p.to_dict()["flags"] == "--gradient-checkpointing"
    assert _plan_memory(req, cfg, "cpu", said.append) is None
    off = _plan_memory(TrainRequest(base="b", spm="s", prompts="p.txt", out="o", config=cfg, gpu_memory=24, memory="off"), cfg, "cuda",
                       said.append)  # fmt: skip
    assert not off.config.gradient_checkpointing and not off.fits
