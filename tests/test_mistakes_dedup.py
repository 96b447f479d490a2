"""`hw dedup` under a user's mistakes (issue 13): one line, the right exit code, inputs untouched;
and Ctrl-C while hashing stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from skimage import data as skdata

from pycore.manifest import read_manifest, write_manifest
from tests.conftest import REPO, assert_one_line_error, tree_digest


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_apply_into_unwritable_folder_is_refused(hw, dup_set, tmp_path):
    d, m = dup_set
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = hw("dedup", m, "--out", tmp_path / "o.parquet", "--apply", f"move:{ro}/dups")
        assert_one_line_error(r, 1, "cannot write")
    finally:
        ro.chmod(0o700)


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


def test_ctrl_c_while_hashing_stops_cleanly(tmp_path):
    """SIGINT during the Rust hashing: the workers stop between files, Python sees
    KeyboardInterrupt (Typer exits 130), no PanicException or traceback, no output written, and
    the run ends long before the ~1,500 decodes it was asked for (≈100 s on one thread)."""
    d = tmp_path / "many"
    d.mkdir()
    im = Image.fromarray(skdata.astronaut()).resize((1400, 1400))
    im.save(d / "0.png", compress_level=1)
    for i in range(1, 1500):  # hard links: 1,500 full decodes of a 2 MP PNG, one file's disk
        os.link(d / "0.png", d / f"{i}.png")
    rows = [str(d / f"{i}.png") for i in range(1500)]
    m = tmp_path / "m.parquet"
    write_manifest(pl.DataFrame({"path": rows, "status": ["ok"] * 1500}), m)
    out = tmp_path / "o.parquet"
    env = dict(os.environ, HW_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "cli.app", "dedup", str(m), "--out", str(out)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    time.sleep(4.0)  # imports and the start of hashing (generous: the machine is shared)
    assert p.poll() is None, p.communicate()[1].decode()[-2000:]
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    text = err.decode()
    assert p.returncode == 130, text[-2000:]
    assert "PanicException" not in text and "Traceback" not in text
    assert time.monotonic() - t0 < 60
    assert not out.exists()
