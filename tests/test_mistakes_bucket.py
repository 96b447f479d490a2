"""Issue 13, `hw bucket` and CLI-wide: a user's mistakes end in one line (or a warning), a bounded
run, the right exit code, and untouched inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from conftest import assert_one_line_error, image_bytes, tree_digest
from pycore.limits import max_threads


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i, size in enumerate([(64, 48), (48, 64), (50, 50)]):
        (d / f"img{i}.png").write_bytes(image_bytes("PNG", size=size))
    return d


BAD_NUMBERS = [
    (["--max-area", "1180591620717411303424"], "--max-area must be"),
    (["--max-area", "0"], "--max-area must be"),
    (["--max-area", "-5"], "--max-area must be"),
    (["--step", "0"], "--step must be"),
    (["--step", "99999999"], "--step must be"),
    (["--min-side", "-1"], "--min-side must be"),
    (["--max-side", "100000"], "--max-side must be"),
    (["--snap", "1000000000000"], "--snap must be"),
    (["--seed", "18446744073709551616"], "--seed must be"),
    (["--max-pixels", "0"], "--max-pixels must be"),
    (["--max-pixels", "99999999999999999999999"], "--max-pixels must be"),
    (["--max-crop", "1.5"], "--max-crop must be"),
    (["--max-crop", "nan"], "--max-crop must be"),
    (["--max-crop", "-0.1"], "--max-crop must be"),
    (["--reject-small"], "--reject-small only applies"),
    (["--flag-crop"], "--flag-crop needs --max-crop"),
    (["--table", "nope"], "bucket table 'nope'"),
]


@pytest.mark.parametrize(("args", "msg"), BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_bad_options_are_one_line_and_touch_nothing(hw, photos, tmp_path, args, msg):
    before = tree_digest(photos)
    r = hw("bucket", photos, "--out", tmp_path / "m.parquet", *args)
    assert_one_line_error(r, 1, msg)
    assert tree_digest(photos) == before
    assert not (tmp_path / "m.parquet").exists()


def test_wrong_type_is_a_usage_error(hw, photos, tmp_path):
    r = hw("bucket", photos, "--out", tmp_path / "m.parquet", "--max-area", "big")
    assert r.code == 2 and "Traceback" not in r.err


def test_threads_far_too_many_is_capped_with_a_warning(hw, photos, tmp_path):
    r = hw("bucket", photos, "--out", tmp_path / "m.parquet", "--threads", "100000", "--json")
    assert r.code == 0, r.err
    assert f"using {max_threads()}" in r.err and "warning:" in r.err
    assert r.json()["ok"] == 3


def test_empty_folder_says_so_and_exits_3(hw, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    r = hw("bucket", empty, "--out", tmp_path / "m.parquet")
    assert_one_line_error(r, 3, "no image files")
    assert "1 non-image" in r.err
    assert not (tmp_path / "m.parquet").exists()


def test_non_utf8_out_name_is_one_line(hw, photos, tmp_path):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/m\xff.parquet")
    r = hw("bucket", photos, "--out", bad)
    assert_one_line_error(r, 1, "not valid UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_output_that_is_the_input_manifest_is_refused(hw, photos, tmp_path):
    m = tmp_path / "m.parquet"
    assert hw("bucket", photos, "--out", m).code == 0
    before = tree_digest(m)
    r = hw("bucket", m, "--out", m, "--overwrite")
    assert_one_line_error(r, 1, "is also an input")
    assert tree_digest(m) == before


def test_non_utf8_file_name_keeps_kohya_json_valid(hw, tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    raw = os.fsencode(str(d)) + b"/caf\xe9.png"  # Latin-1 "café": not UTF-8
    Path(os.fsdecode(raw)).write_bytes(image_bytes("PNG", size=(64, 48)))
    (d / "ok.png").write_bytes(image_bytes("PNG", size=(48, 64)))
    kohya = tmp_path / "meta.json"
    r = hw("bucket", d, "--out", tmp_path / "m.parquet", "--export-kohya", kohya)
    assert r.code == 0, r.err
    assert "not valid UTF-8" in r.err
    data = kohya.read_bytes()
    data.decode("utf-8")  # strict: valid UTF-8 for every reader
    meta = json.loads(data)
    assert len(meta) == 2
    # Lossless: the key opens the exact file.
    key = next(k for k in meta if "caf" in k)
    assert os.fsencode(key) == raw and Path(key).is_file()


def test_off_grid_warning_once_per_manifest(hw, photos, tmp_path):
    m, n = tmp_path / "m.parquet", tmp_path / "n.parquet"
    r = hw("bucket", photos, "--out", m)
    assert r.code == 0 and r.err.count("not multiples of 32") == 1
    r = hw("bucket", m, "--out", n)  # re-bucketing the same manifest with the same table: quiet
    assert r.code == 0 and "not multiples of 32" not in r.err
    r = hw("bucket", photos, "--out", tmp_path / "s.parquet", "--snap", "32")
    assert r.code == 0 and "not multiples of 32" not in r.err


def test_rebucket_keeps_earlier_columns_and_metadata(hw, photos, tmp_path):
    from pycore.manifest import Manifest

    m, n = tmp_path / "m.parquet", tmp_path / "n.parquet"
    assert hw("bucket", photos, "--out", m).code == 0
    first = Manifest.read(m)
    extra = first.derive(first.frame.with_columns(pl.lit("x").alias("note")), "test", {"mine": 1})
    extra.write(m, overwrite=True)
    r = hw("bucket", m, "--out", n, "--table", "sdxl")
    assert r.code == 0, r.err
    second = Manifest.read(n)
    assert "note" in second.frame.columns and second.get("mine") == 1
    assert second.get("root") == first.get("root") and second.get("table") == "sdxl"
    assert second.history == ["bucket", "test", "bucket"]


def test_help_usage_and_version(hw):
    r = hw("bucket", "--help")
    assert r.code == 0
    assert "hw bucket [OPTIONS] SRC" in r.out and "{SRC}" not in r.out
    assert "<bool>" not in r.out and "Example: hw bucket" in r.out
    for panel in ("Bucket table", "Fitting images to buckets", "Outputs"):
        assert panel in r.out
    r = hw("--version")
    assert r.code == 0 and r.out.startswith("hw ")


def test_help_imports_no_heavy_modules():
    code = ("import sys\nfrom cli.app import main\nfor argv in (['--help'], ['bucket', '--help']):\n"
            "    assert main(argv) == 0\n"
            "print(sorted(m for m in ('polars', 'numpy', 'torch', 'pyarrow') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_bucket_api_without_typer(photos, tmp_path):
    from pycore.curation.bucket import BucketRequest, bucket

    res = bucket(BucketRequest(photos, tmp_path / "m.parquet", table="sdxl", hash=False))
    assert res.report.ok == 3 and res.rescanned and res.out.is_file()
    assert res.frame is not None and res.frame["content_hash"].null_count() == 3
