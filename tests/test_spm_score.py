"""`hw spm-score` as a Python function (pycore.spm.score), without Typer: the typed request and result,
the manifest carried forward (rows, columns, metadata, history), and nothing-done runs."""

from __future__ import annotations

import io
import json
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import polars as pl  # noqa: E402
from PIL import Image  # noqa: E402

from pycore.errors import HwError, NothingDone  # noqa: E402
from pycore.manifest import Manifest, new_manifest, read_metadata  # noqa: E402
from pycore.spm.score import ScoreRequest, ScoreResult, score_manifest  # noqa: E402


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spm_dir(kit_spm):
    return kit_spm


def _png(seed: int) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (40, 24))
    im.putdata([tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(40 * 24)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def manifest(tmp_path):
    """A manifest as bucket → dedup → caption leave it: their columns and metadata keys."""
    root = tmp_path / "imgs"
    root.mkdir()
    paths = []
    for i in range(4):
        (root / f"{i}.png").write_bytes(_png(i))
        paths.append(str(root / f"{i}.png"))
    paths.append(str(root / "gone.png"))
    frame = pl.DataFrame({"path": paths, "status": ["ok"] * 4 + ["not_found"], "width": [40] * 4 + [None],
                          "phash": ["00ff"] * 5, "caption": ["a red thing", "a blue thing", None, "noise", "x"]},
                         schema_overrides={"width": pl.Int32})  # fmt: skip
    m = new_manifest(frame, "bucket", {"root": str(root), "table": "helloworld"})
    m = m.derive(frame, "dedup", {"dedup_hash_mode": "exact"})
    m = m.derive(frame, "caption", {"caption_model": "fake"})
    out = tmp_path / "m.parquet"
    m.write(out)
    return out


def test_score_manifest_keeps_rows_columns_and_metadata(manifest, spm_dir, tmp_path):
    before = Manifest.read(manifest)
    out = tmp_path / "scored.parquet"
    res = score_manifest(ScoreRequest(manifest, out, prompt_column="caption", model=str(spm_dir), device="cpu"))
    assert isinstance(res, ScoreResult) and (res.rows, res.scored, res.not_scored) == (5, 3, 2)
    assert res.not_scored_reasons == {"no prompt": 1, "status not_found": 1}
    after = Manifest.read(out)
    assert after.frame.height == before.frame.height
    assert all(after.frame[c].equals(before.frame[c]) for c in before.frame.columns)  # every earlier column kept as is
    for k in ("root", "table", "dedup_hash_mode", "caption_model"):  # what a later hw caption --sidecar needs
        assert after.get(k) == before.get(k), k
    assert after.history == ["bucket", "dedup", "caption", "spm-score"]
    assert after.get("spm_score")["model"] == str(spm_dir)
    scores = after.frame["spm_score"].to_list()
    assert [s is not None for s in scores] == [True, True, False, True, False]
    assert res.mean == pytest.approx(sum(s for s in scores if s is not None) / 3, rel=1e-5)
    assert json.loads(json.dumps(res.to_dict()))["not_scored"] == 2
    assert "hw.spm_score" in {f"hw.{k}" for k in read_metadata(out)}


def test_request_is_validated_before_any_work(manifest, tmp_path):
    cases = [
        (dict(), "exactly one of --prompt-column and --prompt"),
        (dict(prompt="a", prompt_column="caption"), "exactly one"),
        (dict(prompt="a", timestep=1000), "--timestep must be between 0 and 999"),
        (dict(prompt="a", batch_size=0), "--batch-size must be between 1"),
        (dict(prompt="a", dtype="fp8"), "--dtype must be one of"),
        (dict(prompt="a", device="tpu"), "--device must be auto, cpu"),
        (dict(prompt="a", out=manifest), "also an input"),
        (dict(prompt="a", out=tmp_path / "no" / "o.parquet"), "does not exist"),
    ]
    for kw, msg in cases:
        kw = {"out": tmp_path / "o.parquet", **kw}
        with pytest.raises(HwError, match=msg):
            ScoreRequest(manifest, **kw)
    assert not (tmp_path / "o.parquet").exists()


def test_nothing_scored_is_nothing_done(manifest, spm_dir, tmp_path):
    m = Manifest.read(manifest)
    frame = m.frame.with_columns(pl.lit("corrupt").alias("status"))
    m.derive(frame, "edit").write(tmp_path / "bad.parquet")
    out = tmp_path / "o.parquet"
    with pytest.raises(NothingDone, match="none of the 5 images could be scored"):
        score_manifest(ScoreRequest(tmp_path / "bad.parquet", out, prompt="a photo", model=str(spm_dir), device="cpu"))
    assert Manifest.read(out).frame["spm_score_error"].to_list() == ["status corrupt"] * 5  # the reasons are kept
    empty = tmp_path / "empty.parquet"
    m.frame.head(0).write_parquet(empty)
    with pytest.raises(NothingDone, match="no rows"):
        score_manifest(ScoreRequest(empty, tmp_path / "e.parquet", prompt="a", model=str(spm_dir), device="cpu"))
