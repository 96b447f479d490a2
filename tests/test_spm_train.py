"""`hw spm-train` / `hw spm-score`: pairs files, the loss, the noising, training and resuming, scoring."""

from __future__ import annotations

import io
import json
import math
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from PIL import Image  # noqa: E402

from pycore.diffusion.schedule import pred_original_sample  # noqa: E402
from pycore.spm.data import PairDataset, PairsError, collate_pairs, read_pairs  # noqa: E402
from pycore.spm.losses import margin_labels, pair_correct, pair_loss  # noqa: E402
from pycore.spm.model import StepAwarePreferenceModel  # noqa: E402
from tests.kit.clip import save_tiny_clip  # noqa: E402
from tests.kit.diffusion import save_tiny_sd15_denoiser  # noqa: E402

RES = 16  # VAE resolution of the tiny base model


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # tiny tensors: one thread is many times faster than two on a shared CPU (no spin-wait contention)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny SD1.5-shaped diffusers pipeline (UNet, VAE, CLIP text encoder, tokenizer, DDIM) on disk."""
    return save_tiny_sd15_denoiser(tmp_path_factory.mktemp("tiny_sd"), resolution=RES)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny plain CLIP in HF format with its tokenizer: the --init of training (PickScore's stand-in)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=2)


def _png(color, size=RES, seed=0, square=None) -> bytes:
    """A textured image of ``color``; ``square=(x, y, rgb)`` paints a 6×6 square there."""
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size))
    im.putdata([tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in color) for _ in range(size * size)])
    if square is not None:
        x, y, rgb = square
        im.paste(rgb, (x, y, x + 6, y + 6))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def brightness_pairs(n: int, seed: int = 0):
    """n pairs, 3 per prompt, on the same background: the preferred image has a bright square where
    the other has a dark one (visible through the base model's VAE); which side wins is random."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        bg = [rng.randint(90, 160) for _ in range(3)]
        x, y = rng.randint(1, RES - 7), rng.randint(1, RES - 7)
        bright = _png(bg, seed=i, square=(x, y, (250, 250, 250)))
        dark = _png(bg, seed=i, square=(x, y, (5, 5, 5)))
        first_wins = rng.random() < 0.5
        rows.append({"caption": f"picture number {i // 3}", "jpg_0": bright if first_wins else dark,
                     "jpg_1": dark if first_wins else bright, "label_0": 1.0 if first_wins else 0.0})  # fmt: skip
    return pl.DataFrame(rows, schema={"caption": pl.String, "jpg_0": pl.Binary, "jpg_1": pl.Binary, "label_0": pl.Float64})


# --------------------------------------------------------------------------------------- pure parts


def test_pair_loss_with_ties_and_known_values():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    lab = torch.tensor([1.0, 0.5, 0.0])
    expect = [math.log1p(math.exp(-2.0)), 0.0, math.log1p(math.exp(-2.0))]
    assert math.isclose(float(pair_loss(s0, s1, lab)), sum(expect) / 3, rel_tol=1e-6)
    # a tie is minimal (zero) at equal scores and positive otherwise
    assert float(pair_loss(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.5]))) == pytest.approx(0.0, abs=1e-7)
    assert float(pair_loss(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5]))) > 0.1


def test_accuracy_ignores_ties_and_margin_labels():
    dec, cor = pair_correct(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.5, 0.0]))
    assert dec.tolist() == [True, False, True] and cor.tolist() == [True, False, False]
    lab = margin_labels(torch.tensor([5.0, 0.0, 0.05]), torch.tensor([0.0, 5.0, 0.0]), 0.1)
    assert lab.tolist() == [1.0, 0.0, 0.5]


def test_pred_original_sample_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    s.set_timesteps(1000)
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in (0, 251, 951):
        ref = s.step(eps, t, x).pred_original_sample
        got = pred_original_sample(eps, x, torch.tensor([t]), s.alphas_cumprod)
        assert torch.allclose(got, ref, atol=1e-5), t


# -------------------------------------------------------------------------------------- pairs files


def test_pickapic_pairs_bad_rows_are_counted(tmp_path):
    df = brightness_pairs(4)
    extra = pl.DataFrame({"caption": ["x", None, "y"], "jpg_0": [df["jpg_0"][0]] * 3, "jpg_1": [df["jpg_1"][0], df["jpg_1"][0], None],
                          "label_0": [2.0, 1.0, 1.0]}, schema=df.schema)  # fmt: skip
    (pl.concat([df, extra])).write_parquet(tmp_path / "p.parquet")
    ps = read_pairs(tmp_path / "p.parquet")
    assert ps.kind == "pickapic" and len(ps) == 4 and ps.total_rows == 7
    assert ps.skipped == {"label out of range": 1, "empty prompt": 1, "missing image bytes": 1}


def test_missing_columns_is_a_clear_error(tmp_path):
    brightness_pairs(2).drop("label_0").write_parquet(tmp_path / "p.parquet")
    with pytest.raises(PairsError, match="missing column.*label_0"):
        read_pairs(tmp_path / "p.parquet")
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "q.parquet")
    with pytest.raises(PairsError, match="not a pairs table"):
        read_pairs(tmp_path / "q.parquet")


def test_manifest_form_pairs(tmp_path):
    (tmp_path / "img").mkdir()
    for name, c in (("a.png", (200, 200, 200)), ("b.png", (20, 20, 20))):
        (tmp_path / "img" / name).write_bytes(_png(c))
    rows = [("p1", "img/a.png", "img/b.png", "a"), ("p2", "img/b.png", "img/a.png", "b"), ("p3", "img/a.png", "img/b.png", "tie"),
            ("p4", "img/a.png", "img/missing.png", "a"), ("p5", "img/a.png", "img/b.png", "maybe")]  # fmt: skip
    pl.DataFrame(rows, schema=["prompt", "image_a", "image_b", "preferred"], orient="row").write_csv(tmp_path / "pairs.csv")
    ps = read_pairs(tmp_path / "pairs.csv")
    assert ps.kind == "manifest" and ps.label_0 == [1.0, 0.0, 0.5]
    assert ps.skipped == {"image file not found": 1, "label out of range": 1}


def test_undecodable_image_is_skipped_and_reported(tmp_path):
    df = brightness_pairs(3)
    df = df.with_columns(pl.Series("jpg_1", [b"not an image", df["jpg_1"][1], df["jpg_1"][2]], dtype=pl.Binary))
    df.write_parquet(tmp_path / "p.parquet")
    ds = PairDataset(read_pairs(tmp_path / "p.parquet"), RES)
    batch = collate_pairs([ds[i] for i in range(3)])
    assert batch["pixels_0"].shape == (3, 3, RES, RES) and batch["skipped_rows"] == [0]


# ------------------------------------------------------------------------------------------ training


def _train_args(pairs, out, tiny_sd, tiny_clip, *extra):
    return ["spm-train", pairs, "--base-model", tiny_sd, "--out", out, "--init", tiny_clip, "--resolution", RES,
            "--batch-size", 8, "--lr", 2e-3, "--weight-decay", 0.0, "--warmup-steps", 0, "--val-fraction", 0.25,
            "--cfg-scale", 5.0, "--log-every", 5, *extra]  # fmt: skip


@pytest.mark.slow
def test_spm_train_learns_brightness_and_reports_per_timestep(hw, tmp_path, tiny_sd, tiny_clip):
    df = brightness_pairs(96)
    df = pl.concat([df, pl.DataFrame({"caption": ["broken"], "jpg_0": [b"\x89PNG garbage"], "jpg_1": [df["jpg_1"][0]],
                                      "label_0": [1.0]}, schema=df.schema)])  # fmt: skip
    df.write_parquet(tmp_path / "pairs.parquet")
    out = tmp_path / "spm"
    r = hw(*_train_args(tmp_path / "pairs.parquet", out, tiny_sd, tiny_clip, "--max-steps", 40, "--eval-every", 20,
                        "--checkpoint-every", 20, "--json"))  # fmt: skip
    assert r.code == 0, r.err
    rep = r.json()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["final"] == rep["final"] and rep["steps"] == 40
    acc = rep["final"]["accuracy"]
    assert set(acc) == {"0", "251", "501", "701", "951"}
    assert all(rep["final"]["pairs"][t] > 0 for t in acc)
    assert acc["0"] >= 0.85 and acc["251"] >= 0.8, acc  # chance is 0.5
    assert sum(acc.values()) / len(acc) >= 0.7, acc
    assert len(rep["evaluations"]) == 2  # step 20 and the final one
    assert rep["undecodable_rows"] in ([], [96]) and rep["train_pairs"] + rep["val_pairs"] == 97
    # the saved model loads and scores the brighter image higher at t=0
    spm = StepAwarePreferenceModel.from_pretrained(out)
    bright = torch.full((1, 3, RES, RES), 0.6)
    dark = torch.full((1, 3, RES, RES), -0.4)
    with torch.no_grad():
        s = spm.score(torch.cat([bright, dark]), "picture number 99", 0)
    assert float(s[0]) > float(s[1])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-40"]


def test_spm_train_resumes_from_checkpoint(hw, tmp_path, tiny_sd, tiny_clip):
    brightness_pairs(24).write_parquet(tmp_path / "pairs.parquet")
    out = tmp_path / "spm"
    args = _train_args(tmp_path / "pairs.parquet", out, tiny_sd, tiny_clip, "--eval-timesteps", "0,501",
                       "--checkpoint-every", 2, "--eval-every", 100, "--json")  # fmt: skip
    r = hw(*args, "--max-steps", 2)
    assert r.code == 0, r.err
    again = hw(*args, "--max-steps", 2)
    assert again.code == 1 and "--resume" in again.err
    r2 = hw(*args, "--max-steps", 4, "--resume")
    assert r2.code == 0, r2.err
    rep = r2.json()
    assert rep["steps"] == 4 and [e["step"] for e in rep["losses"]] == [2, 4]  # step 2's line came from the checkpoint
    # the resumed run ends where an uninterrupted 4-step run ends
    straight = _train_args(tmp_path / "pairs.parquet", tmp_path / "straight", tiny_sd, tiny_clip, "--eval-timesteps", "0,501",
                           "--checkpoint-every", 2, "--eval-every", 100, "--max-steps", 4)  # fmt: skip
    assert hw(*straight).code == 0
    a = StepAwarePreferenceModel.from_pretrained(out).state_dict()
    b = StepAwarePreferenceModel.from_pretrained(tmp_path / "straight").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    st = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert st["state"]["step"] == 4 and st["config"]["max_steps"] == 4
    assert set(rep["final"]["accuracy"]) == {"0", "501"}


def test_spm_train_bad_pairs_file_fails_before_training(hw, tmp_path, tiny_sd, tiny_clip):
    brightness_pairs(4).drop("jpg_1").write_parquet(tmp_path / "pairs.parquet")
    r = hw(*_train_args(tmp_path / "pairs.parquet", tmp_path / "o", tiny_sd, tiny_clip, "--max-steps", 1))
    assert r.code == 1 and "missing column(s) jpg_1" in r.err and r.err.count("\n") == 1
    df = brightness_pairs(4).with_columns(pl.lit(3.0).alias("label_0"))
    df.write_parquet(tmp_path / "bad_labels.parquet")
    r = hw(*_train_args(tmp_path / "bad_labels.parquet", tmp_path / "o", tiny_sd, tiny_clip, "--max-steps", 1))
    assert r.code == 1 and "no usable pairs" in r.err and "label out of range: 4" in r.err
    r = hw(*_train_args(tmp_path / "pairs.parquet", tmp_path / "o", tiny_sd, tiny_clip, "--max-steps", 1, "--mixed-precision", "fp8"))
    assert r.code == 1 and "--mixed-precision" in r.err


# ------------------------------------------------------------------------------------------- scoring


def test_spm_score_adds_a_score_column(hw, tmp_path, tiny_clip):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "bright.png").write_bytes(_png((220, 220, 220)))
    (imgs / "dark.png").write_bytes(_png((20, 20, 20)))
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    r = hw("bucket", imgs, "--out", tmp_path / "m.parquet", "--table", "generated", "--min-side", 8)
    assert r.code == 0, r.err
    m = pl.read_parquet(tmp_path / "m.parquet")
    m = m.with_columns(pl.Series("caption", ["a photo"] * (m.height - 1) + [None]))
    m.write_parquet(tmp_path / "cap.parquet")
    spm = StepAwarePreferenceModel.from_pretrained(tiny_clip)
    spm.save_pretrained(tmp_path / "model")
    out = tmp_path / "scored.parquet"
    r = hw("spm-score", tmp_path / "cap.parquet", "--prompt-column", "caption", "--model", tmp_path / "model", "--out", out, "--json")
    assert r.code == 0, r.err
    got = pl.read_parquet(out)
    assert got.height == m.height and "spm_score" in got.columns and "spm_score_error" in got.columns
    by_name = {p.rsplit("/", 1)[-1]: (s, e, c) for p, s, e, c in
               zip(got["path"], got["spm_score"], got["spm_score_error"], got["caption"], strict=True)}  # fmt: skip
    for name, (s, e, c) in by_name.items():
        if c is None:
            assert s is None and e == "no prompt"
        elif name == "broken.png":
            assert s is None and e
        else:
            assert s is not None and math.isfinite(s) and e is None
    # the scores are the model's scores on the files
    with torch.no_grad():
        for name in ("bright.png", "dark.png"):
            s, _, c = by_name[name]
            if c is None:
                continue
            arr = np.asarray(Image.open(imgs / name).convert("RGB"), dtype=np.float32)
            x = torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1
            assert s == pytest.approx(float(spm.score(x, c, 0)[0]), abs=1e-4)
    assert r.json()["scored"] == sum(v is not None for v in got["spm_score"])
    again = hw("spm-score", tmp_path / "cap.parquet", "--prompt-column", "caption", "--model", tmp_path / "model", "--out", out)
    assert again.code == 1 and "--overwrite" in again.err
    bad = hw("spm-score", tmp_path / "cap.parquet", "--prompt-column", "nope", "--model", tmp_path / "model", "--out", tmp_path / "x.parquet")
    assert bad.code == 1 and "no column 'nope'" in bad.err
    one = hw("spm-score", tmp_path / "m.parquet", "--prompt", "a photo", "--model", tmp_path / "model",
             "--out", tmp_path / "y.parquet", "--timestep", 500, "--dtype", "bf16")  # fmt: skip
    assert one.code == 0, one.err


def test_spm_score_released_alias_offline_is_a_clear_error(hw, tmp_path):
    m = tmp_path / "m.parquet"
    pl.DataFrame({"path": ["x.png"], "status": ["ok"]}).write_parquet(m)
    r = hw("spm-score", m, "--prompt", "p", "--model", "spo-sdxl", "--out", tmp_path / "o.parquet")
    assert r.code == 1 and "sdxl_step-aware_preference_model.bin" in r.err and r.err.count("\n") == 1


def test_spm_train_with_labels_from_a_plain_scorer(hw, tmp_path, tiny_sd, tiny_clip):
    # the data's labels are all "tie"; a frozen plain scorer relabels the clean pairs with a margin
    df = brightness_pairs(12).with_columns(pl.lit(0.5).alias("label_0"))
    df.write_parquet(tmp_path / "pairs.parquet")
    r = hw(*_train_args(tmp_path / "pairs.parquet", tmp_path / "o", tiny_sd, tiny_clip, "--max-steps", 1, "--eval-timesteps", "0",
                        "--label-scorer", tiny_clip, "--label-margin", 0.0, "--json"))  # fmt: skip
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["config"]["label_scorer"] == str(tiny_clip)
    # with margin 0 every pair the scorer does not score exactly equal is decided, so accuracy is measured
    assert rep["final"]["pairs"]["0"] > 0
