"""Issue 13, the spm lines: a user's mistakes with `hw spm-score` / `hw spm-train` end in one line,
the right exit code, before any work, with every input byte-identical afterwards."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import polars as pl  # noqa: E402

from tests.conftest import assert_one_line_error, tree_digest  # noqa: E402


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A manifest (with a text and an integer column), a pairs CSV and a local models/ folder; any hub
    access would go to a closed port (so an error naming the hub means the hub was contacted)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    pl.DataFrame({"path": ["a.png", "b.png"], "status": ["ok", "ok"], "width": [64, 32], "caption": ["a cat", "a dog"]},
                 schema_overrides={"width": pl.Int32}).write_parquet(tmp_path / "m.parquet")  # fmt: skip
    (tmp_path / "pairs.csv").write_text("prompt,image_a,image_b,preferred\na cat,a.png,b.png,a\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "existing.txt").write_text("keep me")
    return tmp_path


SCORE = ["spm-score", "m.parquet", "--out", "o.parquet"]
TRAIN = ["spm-train", "pairs.csv", "--base-model", "models/base", "--out", "runs/spm"]

CASES = {
    # --model: a typo of a local folder is a local error at once, not minutes of hub retries
    "model typo of a local folder": (SCORE + ["--prompt", "p", "--model", "models/nope"], 1, "no such file or folder"),
    "model ./path missing": (SCORE + ["--prompt", "p", "--model", "./nope.bin"], 1, "no such file or folder"),
    # the prompt column must be text
    "prompt column is an integer": (SCORE + ["--prompt-column", "width"], 1, "must be text"),
    "prompt column missing": (SCORE + ["--prompt-column", "nope"], 1, "no column 'nope'"),
    "no prompt at all": (SCORE, 1, "exactly one of --prompt-column and --prompt"),
    # devices and dtypes
    "device tpu": (SCORE + ["--prompt", "p", "--device", "tpu"], 1, "--device must be auto, cpu"),
    "device cuda:x": (SCORE + ["--prompt", "p", "--device", "cuda:x"], 1, "--device must be"),
    "dtype fp8": (SCORE + ["--prompt", "p", "--dtype", "fp8"], 1, "--dtype must be one of"),
    # numbers: 0, negative, huge
    "timestep negative": (SCORE + ["--prompt", "p", "--timestep", "-1"], 1, "--timestep must be between 0 and 999"),
    "timestep 1000": (SCORE + ["--prompt", "p", "--timestep", "1000"], 1, "--timestep must be between 0 and 999"),
    "batch size 0": (SCORE + ["--prompt", "p", "--batch-size", "0"], 1, "--batch-size must be between 1"),
    "batch size huge": (SCORE + ["--prompt", "p", "--batch-size", "99999999999999999999"], 1, "--batch-size must be between 1"),
    "score out is the manifest": (["spm-score", "m.parquet", "--out", "m.parquet", "--prompt", "p", "--overwrite"], 1, "also an input"),
    "score out is a folder": (["spm-score", "m.parquet", "--out", "models", "--prompt", "p"], 1, "is a folder"),
    # spm-train: outputs and numbers are checked before anything loads or trains
    "train out is an existing file": (["spm-train", "pairs.csv", "--base-model", "models/base", "--out", "existing.txt"], 1, "is a file"),
    "train out is the pairs file": (["spm-train", "pairs.csv", "--base-model", "models/base", "--out", "pairs.csv"], 1, "is a file"),
    "train max steps 0": (TRAIN + ["--max-steps", "0"], 1, "--max-steps must be between 1"),
    "train batch size huge": (TRAIN + ["--batch-size", "10000000"], 1, "--batch-size must be between 1"),
    "train lr nan": (TRAIN + ["--lr", "nan"], 1, "--lr must be a finite number"),
    "train lr negative": (TRAIN + ["--lr", "-1"], 1, "--lr must be a finite number"),
    "train resolution huge": (TRAIN + ["--resolution", "65536"], 1, "--resolution must be between 8 and 4,096"),
    "train resolution odd": (TRAIN + ["--resolution", "100"], 1, "multiple of 8"),
    "train eval timestep 1000": (TRAIN + ["--eval-timesteps", "0,1000"], 1, "--eval-timesteps must be between 0 and 999"),
    "train eval timesteps words": (TRAIN + ["--eval-timesteps", "zero"], 1, "comma-separated integers"),
    "train model type": (TRAIN + ["--model-type", "sd3"], 1, "--model-type must be one of"),
    "train base model typo": (TRAIN + ["--max-steps", "1"], 1, "no such file or folder"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_spm_mistakes_are_one_line_errors(hw, inputs, name):
    args, code, contains = CASES[name]
    before = tree_digest(inputs)
    r = hw(*args)
    assert_one_line_error(r, code, contains)
    assert tree_digest(inputs) == before  # nothing written, nothing changed
    assert not (inputs / "runs").exists() and not (inputs / "o.parquet").exists()


def test_released_alias_offline_says_not_cached_and_how_to_download(hw, inputs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree_digest(inputs)
    line = assert_one_line_error(hw(*SCORE, "--prompt", "p", "--model", "spo-sdxl"), 1, "not in the Hugging Face cache")
    assert "hf download SPO-Diffusion-Models/Step-Aware_Preference_Models" in line
    assert "sdxl_step-aware_preference_model.bin" in line
    line = assert_one_line_error(hw(*SCORE, "--prompt", "p", "--model", "someone/some-clip"), 1, "not in the Hugging Face cache")
    assert "hf download someone/some-clip" in line
    assert tree_digest(inputs) == before


def test_cuda_without_a_gpu_is_one_line(hw, inputs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(hw(*SCORE, "--prompt", "p", "--device", "cuda"), 1, "use --device cpu")
