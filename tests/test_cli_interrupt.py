"""Ctrl-C (issue 13): a real SIGINT while a command works prints exactly `hw: interrupted`, exits
130 and leaves no output, complete or partial (outputs are written atomically). The signal is sent
once the progress bar has advanced, with several more progress steps of work still to do."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pycore.manifest import write_manifest
from tests.conftest import assert_interrupted, interrupt_after_progress, tree_digest


def _linked_copies(folder: Path, data: bytes, n: int, suffix: str) -> list[Path]:
    """``n`` names for one file (hard links): many files to work on, one file's disk."""
    folder.mkdir()
    first = folder / f"0{suffix}"
    first.write_bytes(data)
    for i in range(1, n):
        os.link(first, folder / f"{i}{suffix}")
    return [folder / f"{i}{suffix}" for i in range(n)]


def _noise_png(side: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=0)
    return buf.getvalue()


@pytest.mark.slow
def test_ctrl_c_during_the_rust_scan_of_hw_bucket(tmp_path):
    """The Rust scan (headers + content hash) checks for the interrupt between files. 4 × 8,192
    files of 2 MB (hashed in full, one thread): the bar shows the first 8,192 long before the rest."""
    src = tmp_path / "imgs"
    _linked_copies(src, _noise_png(820), 4 * 8192, ".png")
    out = tmp_path / "out" / "m.parquet"
    out.parent.mkdir()
    r = interrupt_after_progress(["bucket", str(src), "--out", str(out), "--export-kohya", str(out.parent / "k.json")],
                                 env={"HW_THREADS": "1"})  # fmt: skip
    assert_interrupted(r)
    assert r.progress[1] == 4 * 8192
    assert list(out.parent.iterdir()) == []  # no manifest, no kohya JSON, no temporary file


@pytest.mark.slow
def test_ctrl_c_during_hw_spm_score(tmp_path, kit_spm):
    """A torch command: interrupted between batches of the tiny SPM's forward passes."""
    imgs = _linked_copies(tmp_path / "imgs", _noise_png(64), 3000, ".png")
    m = tmp_path / "m.parquet"
    write_manifest(pl.DataFrame({"path": [str(p) for p in imgs], "status": ["ok"] * len(imgs),
                                 "caption": ["a photo of noise"] * len(imgs)}), m)  # fmt: skip
    before = tree_digest(m, kit_spm)
    out = tmp_path / "out" / "scored.parquet"
    out.parent.mkdir()
    r = interrupt_after_progress(["spm-score", str(m), "--out", str(out), "--model", str(kit_spm), "--prompt-column",
                                  "caption", "--device", "cpu", "--batch-size", "4"],
                                 env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert_interrupted(r)
    assert r.progress[1] == 3000
    assert list(out.parent.iterdir()) == [] and tree_digest(m, kit_spm) == before
