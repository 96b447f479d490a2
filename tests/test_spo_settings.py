"""Resolving the SPO configuration: preset → config file → options → --set, with one-line errors."""

from __future__ import annotations

import json

import pytest

from pycore.spo.config import SPOConfigError
from pycore.spo.settings import options_table, parse_sets, resolve_config


def test_precedence_preset_file_options_sets(tmp_path):
    f = tmp_path / "spo.json"
    f.write_text(json.dumps({"preset": "sd15", "threshold": 0.2, "lora_rank": 8, "num_epochs": 3}))
    cfg, name = resolve_config(config_file=f, options={"lora_rank": 16, "seed": None}, sets=["num_epochs=5", "logprob_reduction=sum"])
    assert name == "sd15" and cfg.model_family == "sd15" and cfg.num_candidates == 4  # from the preset
    assert cfg.threshold == 0.2 and cfg.lora_rank == 16 and cfg.num_epochs == 5 and cfg.logprob_reduction == "sum"
    assert cfg.seed == 42  # None options leave the value alone


def test_toml_and_spo_table(tmp_path):
    f = tmp_path / "spo.toml"
    f.write_text('[spo]\nlearning_rate = 2e-5\nlora_targets = ["to_q", "to_v"]\nmax_grad_norm = 0.5\n')
    cfg, name = resolve_config(family="sdxl", config_file=f)
    assert name == "sdxl" and cfg.learning_rate == 2e-5 and cfg.lora_targets == ["to_q", "to_v"] and cfg.max_grad_norm == 0.5


def test_set_values_are_json_or_strings():
    assert parse_sets(["beta=5", "max_grad_norm=null", "vae_slicing=true", "negative_prompt=blurry, ugly", "lora-init=default"]) == {
        "beta": 5, "max_grad_norm": None, "vae_slicing": True, "negative_prompt": "blurry, ugly", "lora_init": "default"}
    cfg, _ = resolve_config(sets=["beta=5", "max_grad_norm=null"])
    assert cfg.beta == 5.0 and isinstance(cfg.beta, float) and cfg.max_grad_norm is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "sd3"}, "unknown preset 'sd3'"),
        ({"sets": ["lora_rank=0"]}, "LoRA rank must be at least 1"),
        ({"sets": ["lora_rank=abc"]}, "lora_rank must be int"),
        ({"sets": ["treshold=0.3"]}, "unknown SPO option 'treshold'"),
        ({"sets": ["threshold"]}, "--set expects KEY=VALUE"),
        ({"sets": ["gradient_checkpointing=1"]}, "gradient_checkpointing must be bool"),
        ({"family": "sd15", "preset": "sdxl"}, "the base model is sd15 but the configuration is for sdxl"),
        ({"options": {"mixed_precision": "fp8"}}, "mixed_precision must be"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(SPOConfigError, match=message) as e:
        resolve_config(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(SPOConfigError, match="not found"):
        resolve_config(config_file=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SPOConfigError, match="not valid JSON"):
        resolve_config(config_file=bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(SPOConfigError, match="must hold an object"):
        resolve_config(config_file=arr)


def test_options_table_lists_every_field():
    rows = options_table()
    names = [r[0] for r in rows]
    assert "threshold" in names and "logprob_reduction" in names and all(r[2] for r in rows)
