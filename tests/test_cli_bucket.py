"""`hw bucket` end to end: the sample folder, reports, exports, re-bucketing, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from conftest import REPO, SAMPLE, image_bytes
from pycore.manifest import COLUMNS, read_manifest, read_metadata

REQUIRED = ["path", "status", "error", "format", "width", "height", "file_size", "content_hash",
            "bucket_width", "bucket_height", "crop_left", "crop_top", "scale", "crop_fraction", "upscaled"]  # fmt: skip


def test_sample_end_to_end(hw, tmp_path):
    out = tmp_path / "m.parquet"
    r = hw("bucket", SAMPLE, "--out", out, "--plot", tmp_path / "h.png", "--export-kohya", tmp_path / "k.json")
    assert r.code == 0, r.err
    assert "1360x768" in r.err and "--snap 32" in r.err  # the off-grid warning
    f = read_manifest(out)
    for c in REQUIRED:
        assert c in f.columns
    n_files = sum(1 for p in SAMPLE.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".webp", ".gif", ".bmp", ".tif"))
    assert len(f) == n_files  # one row per image file, bad ones included
    bad = dict(f.filter(pl.col("status") != "ok").select("path", "status").iter_rows())
    assert sorted(bad.values()) == ["empty", "not_image", "truncated"]
    ok = f.filter(pl.col("status") == "ok")
    assert ok["bucket_width"].null_count() == 0
    assert (ok["crop_left"] + ok["bucket_width"] <= ok["scaled_width"]).all()
    # The rotated phone photos are portrait.
    phone = ok.filter(pl.col("path").str.contains("/phone/"))
    assert sorted(zip(phone["orientation"], phone["width"], phone["height"]))[4:] == [
        (5, 120, 160), (6, 120, 160), (7, 120, 160), (8, 120, 160)]  # fmt: skip
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kohya = json.loads((tmp_path / "k.json").read_text())
    assert len(kohya) == len(ok)
    first = ok.row(0, named=True)
    assert kohya[first["path"]] == {"image_size": [first["width"], first["height"]],
                                    "train_resolution": [first["bucket_width"], first["bucket_height"]]}  # fmt: skip
    meta = read_metadata(out)
    assert meta["table"] == "helloworld" and meta["content_hash"] == "xxh3-128"
    assert "skipped 2 non-image" in r.err


def test_json_report(hw, tmp_path):
    r = hw("bucket", SAMPLE, "-o", tmp_path / "m.parquet", "--json", "--snap", "32")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["ok"] + sum(rep["rejected"].values()) == rep["total_rows"]
    assert rep["off_grid"] == []
    assert sum(b["count"] for b in rep["buckets"]) == rep["ok"]
    assert abs(sum(b["share"] for b in rep["buckets"]) - 1) < 1e-9
    assert {"width": 1344, "height": 768} .items() <= next(b for b in rep["buckets"] if b["width"] == 1344).items()


def test_rebucket_from_manifest_without_rescanning(hw, tmp_path):
    first = tmp_path / "a.parquet"
    assert hw("bucket", SAMPLE, "-o", first).code == 0
    # Re-bucketing reads no image: point the paths somewhere that does not exist.
    f = read_manifest(first).with_columns(pl.lit("/nonexistent/x.jpg").alias("path"))
    f.write_parquet(tmp_path / "moved.parquet")
    r = hw("bucket", tmp_path / "moved.parquet", "-o", tmp_path / "b.parquet", "--table", "sdxl", "--min-side", "100", "--json")
    assert r.code == 0, r.err
    g = read_manifest(tmp_path / "b.parquet")
    assert len(g) == len(f)
    sdxl = {tuple(s) for s in json.loads(read_metadata(tmp_path / "b.parquet")["table_sizes"])}
    assert len(sdxl) == 26
    ok = g.filter(pl.col("status") == "ok")
    assert set(zip(ok["bucket_width"], ok["bucket_height"])) <= sdxl
    assert "too_small" in r.json()["rejected"]
    # Rows rejected by bucketing are re-evaluated; file problems stay.
    h = tmp_path / "c.parquet"
    assert hw("bucket", tmp_path / "b.parquet", "-o", h).code == 0
    assert "too_small" not in set(read_manifest(h)["status"])
    assert {"empty", "not_image", "truncated"} <= set(read_manifest(h)["status"])


def test_generated_table_no_upscale_and_max_crop(hw, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "small.png").write_bytes(image_bytes("PNG", size=(300, 200)))
    (d / "wide.png").write_bytes(image_bytes("PNG", size=(8000, 1000)))
    (d / "big.png").write_bytes(image_bytes("PNG", size=(2000, 1500)))
    out = tmp_path / "m.parquet"
    r = hw("bucket", d, "-o", out, "--table", "generated", "--max-area", 262144, "--step", 32, "--no-upscale", "--max-crop", "0.3", "--json")
    assert r.code == 0, r.err
    f = read_manifest(out)
    small = f.filter(pl.col("path").str.ends_with("small.png")).row(0, named=True)
    assert (small["bucket_width"], small["bucket_height"], small["upscaled"]) == (288, 192, False)
    wide = f.filter(pl.col("path").str.ends_with("wide.png")).row(0, named=True)
    assert wide["status"] == "crop_too_large" and wide["bucket_width"] is None
    r = hw("bucket", d, "-o", tmp_path / "n.parquet", "--no-upscale", "--reject-small", "--max-crop", "0.3", "--flag-crop", "--json")
    f = read_manifest(tmp_path / "n.parquet")
    assert dict(f.select("path", "status").iter_rows())[str(d / "small.png")] == "needs_upscale"
    assert f.filter(pl.col("path").str.ends_with("wide.png"))["crop_flagged"].to_list() == [True]


def test_existing_output_needs_overwrite(hw, tmp_path):
    out = tmp_path / "m.parquet"
    out.write_bytes(b"precious")
    r = hw("bucket", SAMPLE, "-o", out)
    assert r.code == 1 and "--overwrite" in r.err and out.read_bytes() == b"precious"
    assert hw("bucket", SAMPLE, "-o", out, "--overwrite").code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary files left


@pytest.mark.parametrize(
    "args,msg",
    [
        (["/definitely/missing"], "does not exist"),
        ([str(SAMPLE), "--table", "nosuch"], "neither a bundled table"),
        ([str(SAMPLE / "photos" / "astronaut_0.txt")], "not a manifest"),
        ([str(SAMPLE), "--reject-small"], "only applies with --no-upscale"),
    ],
)
def test_one_line_errors(hw, tmp_path, args, msg):
    r = hw("bucket", *args, "-o", tmp_path / "m.parquet")
    assert r.code == 1
    assert msg in r.err and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err


def test_malformed_table_and_manifest(hw, tmp_path):
    (tmp_path / "t.csv").write_text("width,height\n1024,x\n")
    r = hw("bucket", SAMPLE, "-o", tmp_path / "m.parquet", "--table", tmp_path / "t.csv")
    assert r.code == 1 and "row 1" in r.err
    pl.DataFrame({"path": ["a"]}).write_parquet(tmp_path / "bad.parquet")
    r = hw("bucket", tmp_path / "bad.parquet", "-o", tmp_path / "m.parquet")
    assert r.code == 1 and "missing required column(s): status, width, height" in r.err
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    r = hw("bucket", tmp_path / "junk.parquet", "-o", tmp_path / "m.parquet")
    assert r.code == 1 and "cannot read manifest" in r.err and len(r.err.strip().splitlines()) == 1


def test_schema_doc_lists_every_column():
    doc = (REPO / "data_manifests" / "manifest_schema.md").read_text()
    for c in COLUMNS:
        assert f"`{c}`" in doc, c


def test_installed_command_and_help(tmp_path):
    out = subprocess.run([Path(sys.executable).parent / "hw", "--help"], capture_output=True, text=True, check=True).stdout
    assert "bucket" in out
    r = subprocess.run([Path(sys.executable).parent / "hw", "bucket", "/nope", "-o", tmp_path / "x.parquet"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "hw: error: /nope does not exist"


def test_outputs_get_normal_permissions(hw, tmp_path):
    import os

    out = tmp_path / "m.parquet"
    assert hw("bucket", SAMPLE, "-o", out).code == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_dir_replaces_only_on_success(tmp_path):
    import pytest as _pytest

    from pycore.errors import HwError
    from pycore.io import atomic_dir

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with _pytest.raises(HwError, match="--overwrite"):
        with atomic_dir(out, overwrite=False):
            pass
    with _pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old"  # a failed write keeps the old output
    with atomic_dir(out) as d:
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left behind
