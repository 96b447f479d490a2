"""Issue 13's SPO reproductions (and their neighbours): exit code, one line without a traceback, inputs unchanged."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.kit.clip import save_tiny_spm
from tests.kit.diffusion import save_tiny_pipeline  # noqa: E402
from tests.conftest import assert_one_line_error, tree_digest  # noqa: E402

FAST = ["--resolution", "8", "--lora-rank", "2", "--lr", "1e-3", "--batch-size", "2", "--num-samples", "0", "--epochs", "1",
        "--vae", "base", "--no-tensorboard"]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spo_mistakes")
    save_tiny_pipeline(root / "sdxl", sdxl=True)
    save_tiny_spm(root / "spm")
    (root / "prompts.txt").write_text("a cat\na dog\n", encoding="utf-8")
    return root


def _train_args(models, out, *extra):
    return ["spo-train", "--base", models / "sdxl", "--spm", models / "spm", "--prompts", models / "prompts.txt", "--out", out,
            *FAST, *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "contains"),
    [
        (["--resolution", "65536"], "8..4096"),
        (["--resolution", "0"], "8..4096"),
        (["--resolution", "-8"], "8..4096"),
        (["--resolution", "12"], "multiple of 8"),
        (["--set", "resolution=1e9"], "must be int"),
        (["--mixed-precision", "fp8"], "mixed_precision must be"),
        (["--memory", "maybe"], "--memory must be auto or off"),
    ],
)
def test_spo_train_bad_numbers_are_one_line(hw, models, tmp_path, extra, contains):
    before = tree_digest(models)
    r = hw(*_train_args(models, tmp_path / "o", *extra))
    assert_one_line_error(r, 1, contains)
    assert tree_digest(models) == before and not (tmp_path / "o").exists()


def test_spo_train_with_no_pair_kept_says_so_and_exits_3(hw, models, tmp_path):
    """threshold 0.999: the tiny SPM never separates two candidates that much — nothing is trained."""
    before = tree_digest(models)
    r = hw(*_train_args(models, tmp_path / "o", "--set", "threshold=0.999"))
    line = assert_one_line_error(r, 3, "no pair passed the threshold 0.999")
    assert "no LoRA was written" in line and "samples → None" not in r.out
    assert not (tmp_path / "o" / "spo_lora_diffusers.safetensors").exists()
    assert tree_digest(models) == before


def test_spo_train_missing_required_options_name_them(hw, models, tmp_path):
    r = hw("spo-train", "--base", models / "sdxl", "--out", tmp_path / "o")
    assert_one_line_error(r, 2, "--spm, --prompts: required, not given")
    h = hw("spo-train", "--help")
    assert h.code == 0 and "Required" in h.out and "Memory and precision" in h.out and "Example: hw spo-train" in h.out


@pytest.mark.parametrize(
    ("extra", "contains"),
    [
        (["--resolution", "12"], "multiple of 8"),
        (["--resolution", "65536"], "between 8 and 4,096"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    ]
    + ([(["--device", "cuda"], "no CUDA")] if not torch.cuda.is_available() else []),
)
def test_spo_sample_mistakes_are_one_line(hw, models, tmp_path, extra, contains):
    before = tree_digest(models)
    r = hw("spo-sample", "--base", models / "sdxl", "--prompts", models / "prompts.txt", "--out", tmp_path / "s", *extra)
    assert_one_line_error(r, 1, contains)
    assert tree_digest(models) == before and not (tmp_path / "s").exists()


def test_plan_answers_without_weights_and_names_the_choice(hw):
    r = hw("spo-train", "--plan", "--preset", "sdxl", "--gpu-memory", "24", "--json")
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["fits"] and plan["card_gib"] == 24 and plan["peak_gib"] * 1.05 + 1 <= 24
    assert set(plan["phases_gib"]) == {"rollout", "decode + score", "training micro-step"}
    assert {"unet", "text_encoders", "vae", "spm", "lora_params", "optimizer"} <= set(plan["components_gib"])
    r = hw("spo-train", "--plan", "--preset", "sdxl", "--gpu-memory", "4")
    assert_one_line_error(r, 1, "does not fit a 4 GiB card: the smallest peak hw reaches is")
