"""`hw bucket DIR` writes its manifest from Rust (pycore._rust.BucketRows) without Polars: the file
must be the one the Polars path writes (scan_folder → assign → report → Manifest.write), read
back with Polars: same frame (columns, order, types, values, nulls), same hw metadata, same report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import exif_orientation, image_bytes, png_header
from pycore import _rust
from pycore.curation.assign import assign, report
from pycore.curation.bucket import SDXL_MULTIPLE, BucketRequest, bucket
from pycore.curation.scan import scan_folder
from pycore.curation.tables import off_grid
from pycore.manifest import COLUMNS, Manifest, new_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    sizes = [(640, 480), (480, 640), (1024, 1024), (1920, 800), (96, 96), (3000, 1000), (500, 2000)]
    for i, size in enumerate(sizes):
        (root / f"p{i}.jpg").write_bytes(image_bytes("JPEG", size, exif=exif_orientation(6 if i % 3 == 0 else 1)))
    (root / "sub" / "a.png").write_bytes(image_bytes("PNG", (800, 600)))
    (root / "sub" / "b.webp").write_bytes(image_bytes("WEBP", (300, 900)))
    (root / "sub" / "header_only.png").write_bytes(png_header(2048, 1536))  # size known, pixels missing
    (root / "empty.jpg").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "notes.txt").write_text("not an image")
    (root / os.fsdecode(b"caf\xe9.jpg")).write_bytes(image_bytes("JPEG", (1200, 900)))  # not UTF-8
    (root / "ünï.jpg").write_bytes(image_bytes("JPEG", (900, 1200)))
    return root


def _polars_path(req: BucketRequest, out: Path) -> tuple[pl.DataFrame, dict]:
    """The folder path as it was before the fast path, from the same public pieces."""
    table, opts = req.bucket_table(), req.options()
    res = scan_folder(str(req.source), hash=req.hash, max_pixels=req.max_pixels, threads=opts.threads)
    frame = assign(res.frame, table, opts)
    rep = report(frame, table, skipped=res.skipped, problems=res.problems, off_grid=off_grid(table, SDXL_MULTIPLE))
    meta = {"table": table.name, "table_sizes": [list(s) for s in table.sizes],
            "options": {k: v for k, v in vars(opts).items() if k != "threads"}, "source": str(req.source),
            "root": res.root, "content_hash": "xxh3-128" if req.hash else "none"}  # fmt: skip
    new_manifest(frame, "bucket", meta).write(out)
    return frame, rep.to_dict()


OPTIONS = [
    {},
    {"hash": False, "table": "sdxl"},
    {"no_upscale": True, "min_side": 200},
    {"no_upscale": True, "reject_small": True, "max_crop": 0.2},
    {"max_crop": 0.1, "flag_crop": True, "random_crop": True, "seed": 7},
    {"table": "generated", "max_area": 512 * 512, "step": 32, "snap": 64},
]


@pytest.mark.parametrize("kw", OPTIONS, ids=[",".join(k) or "defaults" for k in OPTIONS])
def test_rust_manifest_equals_polars_manifest(folder, tmp_path, kw):
    fast_out, slow_out = tmp_path / "fast.parquet", tmp_path / "slow.parquet"
    with pytest.warns() if kw.get("table", "helloworld") == "helloworld" else _nothing():
        res = bucket(BucketRequest(folder, fast_out, **kw))
    slow_frame, slow_report = _polars_path(BucketRequest(folder, slow_out, **kw), slow_out)
    fast = Manifest.read(fast_out)
    slow = Manifest.read(slow_out)
    assert_frame_equal(fast.frame, slow.frame)
    assert_frame_equal(pl.read_parquet(fast_out), pl.read_parquet(slow_out))  # as stored, before validation casts
    assert fast.meta == slow.meta and fast.history == ["bucket"]
    assert fast.get("root") == str(folder) and fast.get("table_sizes")
    rep = res.to_dict()
    for d in (rep, slow_report):
        for k in ("out", "seconds", "plot", "kohya", "kohya_images"):
            d.pop(k, None)
    assert rep == slow_report
    assert res.rescanned and len(res.frame) == len(slow_frame) == 14
    statuses = set(fast.frame["status"])
    assert {"ok", "empty", "corrupt"} <= statuses


class _nothing:
    def __enter__(self) -> None: ...
    def __exit__(self, *a: object) -> None: ...


def test_rust_columns_are_the_manifest_columns():
    # every column of a scanned and bucketed folder, in the schema's order; only the columns of
    # images inside tar shards / Parquet tables (never in a folder's manifest) are left out
    container = ["member_offset", "source_caption", "source_json"]
    upto = list(COLUMNS)[: list(COLUMNS).index("phash")]  # hw dedup's columns come next
    assert _rust.MANIFEST_COLUMNS == [c for c in upto if c not in container]


def test_rebucketing_the_rust_manifest_keeps_everything(folder, tmp_path):
    first = tmp_path / "m.parquet"
    with pytest.warns():
        bucket(BucketRequest(folder, first, min_side=300))
    again = bucket(BucketRequest(first, tmp_path / "n.parquet", table="sdxl"))
    m = Manifest.read(tmp_path / "n.parquet")
    assert m.history == ["bucket", "bucket"] and m.get("root") == str(folder)
    assert m.frame["path"].to_list() == Manifest.read(first).frame["path"].to_list()
    # rows rejected by the first bucketing (too small for 300) are re-evaluated without --min-side
    assert again.report.ok == (m.frame["status"] == "ok").sum() and "too_small" not in again.report.rejected


def test_bucket_folder_imports_neither_polars_nor_numpy(folder, tmp_path):
    code = ("import sys, warnings\nwarnings.simplefilter('ignore')\nfrom cli.app import main\n"
            f"rc = main(['bucket', {str(folder)!r}, '--out', {str(tmp_path / 'm.parquet')!r}, '--json', '--no-hash'])\n"
            "print(rc, sorted(m for m in ('polars', 'numpy', 'pydantic', 'pyarrow', 'torch') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    assert pl.read_parquet(tmp_path / "m.parquet").height == 14
