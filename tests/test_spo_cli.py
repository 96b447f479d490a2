"""`hw spo-train` and `hw spo-sample` end to end on a tiny SDXL pipeline folder and a tiny SPM folder (CPU)."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.lora.convert import load_lora  # noqa: E402
from tests.kit.clip import save_tiny_spm  # noqa: E402
from tests.kit.diffusion import save_tiny_pipeline  # noqa: E402

# Resolution 8: the tiny VAE has one level, so the latents are 4×8×8. Threshold 0 keeps every pair.
FAST = ["--resolution", "8", "--lora-rank", "2", "--lr", "1e-3", "--batch-size", "2", "--set", "threshold=0.0",
        "--num-samples", "2", "--epochs", "2", "--vae", "base"]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spo_models")
    save_tiny_pipeline(root / "sdxl", sdxl=True, full_layout=True)  # SDXL's layout: kohya names map 1:1
    save_tiny_spm(root / "spm")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na dog on a beach\n\na red car\n", encoding="utf-8")
    return {"base": root / "sdxl", "spm": root / "spm", "prompts": prompts, "root": root}


def train(hw, models, out, *extra):
    return hw("spo-train", "--base", models["base"], "--spm", models["spm"], "--prompts", models["prompts"], "--out", out, *FAST, *extra)


def lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.slow
def test_train_writes_lora_config_checkpoints_samples_and_logs(hw, models, tmp_path):
    out = tmp_path / "run"
    r = train(hw, models, out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["finished"] and rep["epochs_done"] == 2 and rep["prompts"] == 3 and rep["pairs_kept"] > 0
    assert set(rep["reward_final_by_epoch"]) == {"1", "2"}
    names = {p.name for p in out.iterdir()}
    assert {"spo_lora_diffusers.safetensors", "spo_lora_kohya.safetensors", "spo_config.json", "checkpoints", "samples", "logs",
            "train_log.jsonl"} <= names  # fmt: skip
    cfg = json.loads((out / "spo_config.json").read_text())
    assert cfg["lora_rank"] == 2 and cfg["resolution"] == 8 and cfg["threshold"] == 0.0 and cfg["num_candidates"] == 2  # sdxl preset
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0000", "epoch_0001", "epoch_0002"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and "reward/final" in log[0] and "train/implicit_accuracy" in log[0]
    lora = load_lora(out / "spo_lora_diffusers.safetensors")
    assert lora.layers and all(layer.alpha == 2.0 for layer in lora.layers.values())
    kohya = lora_tensors(out / "spo_lora_kohya.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya)

    # before/after with diffusers' own load_lora_weights, scored by the SPM
    s = hw("spo-sample", "--base", models["base"], "--lora", out / "spo_lora_diffusers.safetensors", "--prompts", models["prompts"],
           "--out", tmp_path / "samples", "--compare", "--spm", models["spm"], "--resolution", "8", "--steps", "4",
           "--images-per-prompt", "2", "--json")  # fmt: skip
    assert s.code == 0, s.err
    summ = s.json()
    assert summ["images"] == 12 and summ["variants"] == ["base", "lora"] and summ["score_gain"]["n"] == 6
    rows = [json.loads(x) for x in (tmp_path / "samples" / "images.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in rows} == {"base", "lora"} and all((tmp_path / "samples" / r["file"]).is_file() for r in rows)
    assert (tmp_path / "samples" / "grid.png").is_file()
    # the kohya file loads in diffusers too; same seeds → same images as the diffusers file
    k = hw("spo-sample", "--base", models["base"], "--lora", out / "spo_lora_kohya.safetensors", "--prompts", models["prompts"],
           "--out", tmp_path / "samples_kohya", "--resolution", "8", "--steps", "4", "--images-per-prompt", "2", "--json")  # fmt: skip
    assert k.code == 0, k.err
    from PIL import Image
    import numpy as np

    a = np.asarray(Image.open(tmp_path / "samples" / "lora" / "00000_0.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "samples_kohya" / "lora" / "00000_0.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_stop_and_resume_equals_one_run(hw, models, tmp_path):
    full = train(hw, models, tmp_path / "full", "--no-tensorboard", "--num-samples", "0")
    assert full.code == 0, full.err
    part = train(hw, models, tmp_path / "part", "--no-tensorboard", "--num-samples", "0", "--stop-after-epochs", "1")
    assert part.code == 0 and "continue with the same command and --resume" in part.err
    again = train(hw, models, tmp_path / "part", "--no-tensorboard", "--num-samples", "0")
    assert again.code == 1 and "pass --resume to continue it" in again.err
    done = train(hw, models, tmp_path / "part", "--no-tensorboard", "--num-samples", "0", "--resume")
    assert done.code == 0, done.err
    a = lora_tensors(tmp_path / "full" / "spo_lora_diffusers.safetensors")
    b = lora_tensors(tmp_path / "part" / "spo_lora_diffusers.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    finished = train(hw, models, tmp_path / "part", "--resume")
    assert finished.code == 1 and "already finished" in finished.err


def test_prompts_from_jsonl_and_manifest_column(hw, models, tmp_path):
    import polars as pl

    pl.DataFrame({"path": ["a.png", "b.png"], "caption": ["a tree", "a house"]}).write_parquet(tmp_path / "m.parquet")
    r = hw("spo-train", "--base", models["base"], "--spm", models["spm"], "--prompts", tmp_path / "m.parquet", "--prompt-column",
           "caption", "--out", tmp_path / "o", *FAST, "--epochs", "1", "--num-samples", "0", "--no-tensorboard", "--json")  # fmt: skip
    assert r.code == 0, r.err
    assert r.json()["prompts"] == 2


@pytest.mark.parametrize(
    ("override", "extra", "message"),
    [
        ({}, ["--preset", "sd3"], "unknown preset 'sd3'"),
        ({}, ["--lora-rank", "0"], "LoRA rank must be at least 1"),
        ({"--spm": "no_such_spm.bin"}, [], "no_such_spm.bin"),
        ({"--prompts": "empty.txt"}, [], "no prompts in"),
        ({"--prompts": "missing.txt"}, [], "not found"),
        ({"--base": "no_such_model"}, [], "no_such_model"),
        ({}, ["--preset", "sd15"], "the base model is sdxl but the configuration is for sd15"),
        ({}, ["--set", "num_candidates=1"], "num_candidates (k) must be ≥ 2"),
        ({}, ["--resume"], "nothing to resume"),
    ],
)
def test_bad_input_is_one_line(hw, models, tmp_path, override, extra, message):
    (models["root"] / "empty.txt").write_text("\n  \n")
    args = {"--base": models["base"], "--spm": models["spm"], "--prompts": models["prompts"], "--out": tmp_path / "o"}
    args.update({k: models["root"] / v for k, v in override.items()})
    r = hw("spo-train", *[x for kv in args.items() for x in kv], *FAST, *extra)
    assert r.code == 1, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hw: error:") and message in lines[0], r.err
    assert not (tmp_path / "o" / "spo_lora_diffusers.safetensors").exists()


def test_print_config_and_list_options(hw):
    r = hw("spo-train", "--print-config", "--preset", "sd15", "--set", "threshold=0.25")
    assert r.code == 0
    cfg = json.loads(r.out)
    assert cfg["num_candidates"] == 4 and cfg["lora_rank"] == 4 and cfg["threshold"] == 0.25 and cfg["learning_rate"] == 6e-5
    r = hw("spo-train", "--list-options")
    assert r.code == 0 and "logprob_reduction" in r.err


def test_spo_sample_errors(hw, models, tmp_path):
    r = hw("spo-sample", "--base", models["base"], "--prompts", models["prompts"], "--out", tmp_path / "s", "--compare")
    assert r.code == 1 and "--compare needs --lora" in r.err
    r = hw("spo-sample", "--base", models["base"], "--prompts", models["prompts"], "--out", tmp_path / "s", "--lora", tmp_path / "x.safetensors")
    assert r.code == 1 and "not found" in r.err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    r = hw("spo-sample", "--base", models["base"], "--prompts", models["prompts"], "--out", tmp_path / "s", "--lora", bad,
           "--resolution", "8", "--steps", "2")  # fmt: skip
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
