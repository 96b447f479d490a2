"""`hw dedup` under a user's mistakes (issue 13): one line, the right exit code, inputs untouched;
and Ctrl-C while hashing stops cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from skimage import data as skdata

from pycore.manifest import read_manifest, write_manifest
from tests.conftest import assert_interrupted, assert_one_line_error, interrupt_after_progress, tree_digest


@pytest.fixture
def dup_set(tmp_path, hw) -> tuple[Path, Path]:
    d = tmp_path / "imgs"
    d.mkdir()
    im = Image.fromarray(skdata.chelsea())
    im.save(d / "a.jpg", quality=90)
    im.resize((300, 200)).save(d / "a_small.png")
    Image.fromarray(skdata.rocket()).save(d / "b.png")
    m = tmp_path / "m.parquet"
    assert hw("bucket", d, "--out", m).code == 0
    return d, m


CASES = [
    # (extra arguments, exit code, text in the one error line)
    (["--review-max-groups", "99999999999999999999"], 1, "--review-max-groups"),
    (["--review-max-groups", "0"], 1, "--review-max-groups"),
    (["--review-max-groups", "-5"], 1, "--review-max-groups"),
    (["--review-gallery", "-1"], 1, "--review-gallery"),
    (["--threshold", "33"], 1, "--threshold"),
    (["--threshold", "-1"], 1, "--threshold"),
    (["--threshold", "99999999999999999999"], 1, "--threshold"),
    (["--max-group-size", "1"], 1, "--max-group-size"),
    (["--batch-size", "0"], 1, "--batch-size"),
    (["--clip-threshold", "1.5"], 1, "--clip-threshold"),
    (["--clip-threshold", "nan"], 1, "--clip-threshold"),
    (["--quality", "--quality-z", "0"], 1, "--quality-z"),
    (["--quality", "--flag-threshold", "shiny=3"], 1, "unknown quality flag"),
    (["--quality", "--flag-threshold", "blurry"], 1, "REASON=NUMBER"),
    (["--quality", "--no-stats"], 1, "--no-stats"),
    (["--hash-mode", "quick"], 1, "--hash-mode"),
    (["--method", "sift"], 1, "--method"),
    (["--keep-by", "path"], 1, "not numeric"),
    (["--keep-by", "nope"], 1, "not in the manifest"),
    (["--dry-run"], 1, "--dry-run"),
    (["--apply", "delete:x"], 1, "--apply"),
]


@pytest.mark.parametrize(("args", "code", "text"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_options_are_one_line(hw, dup_set, tmp_path, args, code, text):
    d, m = dup_set
    before = tree_digest(d, m)
    out = tmp_path / "out.parquet"
    r = hw("dedup", m, "--out", out, *args)
    assert_one_line_error(r, code, text)
    assert not out.exists()
    assert tree_digest(d, m) == before


@pytest.mark.parametrize("args", [["--review-max-groups", "many"], ["--threshold", "1.5"], ["--threads", "-2"]])
def test_wrong_type_is_a_usage_error_without_traceback(hw, dup_set, tmp_path, args):
    """Typer's parser rejects a value of the wrong type (and the shared --threads option's
    negative values) with its usage message, exit 2."""
    _, m = dup_set
    r = hw("dedup", m, "--out", tmp_path / "o.parquet", *args)
    assert r.code == 2 and "Traceback" not in r.err and args[0] in r.err


def test_manifest_with_only_path_and_status(hw, dup_set, tmp_path):
    d, m = dup_set
    small = tmp_path / "small.parquet"
    write_manifest(read_manifest(m).select("path", "status"), small)
    out = tmp_path / "o.parquet"
    r = hw("dedup", small, "--out", out, "--review", tmp_path / "r.html")
    assert r.code == 0, r.err
    f = read_manifest(out)
    assert f.height == 3 and f["keep"].to_list().count(False) == 1


def test_apply_into_a_file_is_refused_before_any_work(hw, dup_set, tmp_path):
    d, m = dup_set
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    before = tree_digest(d, m, blocker)
    out = tmp_path / "o.parquet"
    r = hw("dedup", m, "--out", out, "--apply", f"move:{blocker}/dups")
    assert_one_line_error(r, 1, "is a file")
    assert not out.exists() and tree_digest(d, m, blocker) == before


# --apply move:DIR into an unwritable folder: tests/test_mistakes_permissions.py (runs under root too).


def test_apply_that_moves_nothing_exits_3(hw, dup_set, tmp_path):
    d, m = dup_set
    target = tmp_path / "dups"
    target.mkdir()
    (target / "group-000000").write_text("a file where the group folder would go")
    before = tree_digest(d)
    r = hw("dedup", m, "--out", tmp_path / "o.parquet", "--apply", f"move:{target}")
    line = assert_one_line_error(r, 3, "none of 1 file")
    assert "manifest was written" in line
    assert tree_digest(d) == before


@pytest.mark.slow
def test_ctrl_c_while_hashing_stops_cleanly(tmp_path):
    """SIGINT during the Rust hashing: the workers stop between files, Python sees
    KeyboardInterrupt, one line `hw: interrupted`, exit 130, no PanicException or traceback, no
    output written. The signal goes out once the bar shows the first 2,048 of 8,192 decodes
    (one thread), so it lands while the Rust workers hash the rest."""
    d = tmp_path / "many"
    d.mkdir()
    Image.fromarray(skdata.astronaut()).resize((256, 256)).save(d / "0.png", compress_level=1)
    for i in range(1, 8192):  # hard links: 8,192 full decodes, one file's disk
        os.link(d / "0.png", d / f"{i}.png")
    rows = [str(d / f"{i}.png") for i in range(8192)]
    m = tmp_path / "m.parquet"
    write_manifest(pl.DataFrame({"path": rows, "status": ["ok"] * 8192}), m)
    out = tmp_path / "out" / "o.parquet"
    out.parent.mkdir()
    r = interrupt_after_progress(["dedup", str(m), "--out", str(out)], env={"HW_THREADS": "1"})
    assert_interrupted(r)
    assert r.progress == (2048, 8192)
    assert list(out.parent.iterdir()) == []
