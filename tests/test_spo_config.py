"""SPOConfig: official presets, validation with one-line errors, derived values."""

from __future__ import annotations

import dataclasses

import pytest

from pycore.errors import HwError
from pycore.spo.config import PRESETS, SPOConfig, SPOConfigError, from_preset


def test_sdxl_preset_is_the_official_configuration():
    c = from_preset("sdxl")
    assert (c.num_candidates, c.num_inner_step, c.threshold, c.divert_start_step) == (2, 3, 0.4, 4)
    assert (c.lora_rank, c.alpha, c.learning_rate) == (64, 64.0, 1e-5)
    assert (c.sample_batch_size, c.train_batch_size, c.gradient_accumulation_steps, c.num_epochs) == (2, 2, 2, 10)
    assert (c.guidance_scale, c.beta, c.clip_range, c.num_inference_steps, c.eta) == (5.0, 10.0, 0.1, 20, 1.0)
    assert c.logprob_reduction == "mean" and c.force_zeros_for_empty_prompt is True and c.resolution == 1024
    assert c.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"] and c.lora_init == "gaussian"
    assert c.branch_steps() == [4, 8, 12, 16]


def test_sd15_preset_is_the_official_configuration():
    c = from_preset("sd15")
    assert (c.num_candidates, c.num_inner_step, c.threshold, c.lora_rank, c.alpha, c.learning_rate) == (4, 0, 0.3, 4, 4.0, 6e-5)
    assert (c.sample_batch_size, c.gradient_accumulation_steps, c.resolution, c.model_family) == (10, 1, 512, "sd15")
    assert c.branch_steps() == list(range(4, 20))
    assert c.step_ratio == 50


def test_every_option_has_help_text():
    helps = SPOConfig.help()
    assert set(helps) == {f.name for f in dataclasses.fields(SPOConfig)}
    assert all(len(h) > 5 for h in helps.values())


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(lora_rank=0), "LoRA rank must be at least 1"),
        (dict(num_candidates=1), "num_candidates"),
        (dict(threshold=1.0), "threshold"),
        (dict(logprob_reduction="max"), "logprob_reduction"),
        (dict(eta=0.0), "eta"),
        (dict(divert_start_step=17), "divert_start_step"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(clip_range=1.5), "clip_range"),
    ],
)
def test_bad_values_are_one_line_errors(changes, needle):
    with pytest.raises(SPOConfigError) as e:
        from_preset("sdxl", **changes)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, HwError)


def test_unknown_preset_and_option():
    with pytest.raises(HwError, match="unknown preset 'sd3'.*sd15, sdxl"):
        from_preset("sd3")
    with pytest.raises(HwError, match="unknown SPO config option.*lora_rnk"):
        from_preset("sdxl", lora_rnk=4)


def test_from_dict_round_trip_and_preset_key():
    c = from_preset("sd15", lora_rank=8, logprob_reduction="sum")
    assert SPOConfig.from_dict(c.to_dict()) == c
    d = SPOConfig.from_dict({"preset": "sd15", "threshold": 0.2})
    assert d.threshold == 0.2 and d.num_candidates == 4 and set(PRESETS) == {"sdxl", "sd15"}
