"""Manifests as a folder of parts: written atomically, read as one table by hw, Polars, DuckDB and
pyarrow; every command reads a folder and can write one."""

from __future__ import annotations

import polars as pl
import pytest

from pycore.manifest import Manifest, read_manifest, read_metadata, write_manifest
from pycore.manifest_parts import iter_parts, write_parts
from tests.kit.shards import samples, write_loose, write_shards


def frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"path": [f"/x/{i:05d}.jpg" for i in range(n)], "status": ["ok"] * n,
                         "width": list(range(n)), "height": [7] * n}).with_columns(pl.col("width", "height").cast(pl.Int32))  # fmt: skip


def test_parts_read_as_one_table_everywhere(tmp_path):
    import duckdb
    import pyarrow.parquet as pq

    f = frame(25)
    folder = tmp_path / "m"
    write_manifest(f, folder, metadata={"root": "/x"})
    assert [p.name for p in folder.iterdir()] == ["part-00000.parquet"]
    write_manifest(f, folder, metadata={"root": "/x"}, overwrite=True, part_rows=10)
    parts = sorted(p.name for p in folder.iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert read_manifest(folder).equals(f)
    assert read_metadata(folder)["root"] == "/x"
    assert pl.read_parquet(folder / "*.parquet").equals(f)
    assert pl.scan_parquet(folder).collect().equals(f)
    assert pq.read_table(folder).to_pydict()["path"] == f["path"].to_list()
    con = duckdb.connect()
    got = con.execute(f"select path from read_parquet('{folder}/*.parquet') order by path").fetchall()
    assert [g[0] for g in got] == f["path"].to_list()
    assert sum(p.height for _, p in iter_parts(folder)) == 25
    # an existing folder is never replaced without overwrite; a file is never replaced by a folder
    with pytest.raises(Exception, match="exists"):
        write_manifest(f, folder)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(Exception, match="is a file"):
        write_parts(f, tmp_path / "file", {}, overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"


def test_commands_read_and_write_folders(hw, tmp_path):
    items = samples(6)
    write_loose(tmp_path / "img", items)
    write_shards(tmp_path / "s", items, per_shard=3)
    r = hw("bucket", tmp_path / "s", "--out", tmp_path / "bucketed", "--json")
    assert r.code == 0, r.err
    assert (tmp_path / "bucketed" / "part-00000.parquet").is_file()
    m = Manifest.read(tmp_path / "bucketed")
    assert m.frame.height == len(items) and m.history == ["bucket"]
    r = hw("bucket", tmp_path / "bucketed", "--out", tmp_path / "rebucketed.parquet", "--table", "sdxl", "--json")
    assert r.code == 0, r.err
    assert pl.read_parquet(tmp_path / "rebucketed.parquet").height == len(items)
    r = hw("dedup", tmp_path / "bucketed", "--out", tmp_path / "deduped", "--json")
    assert r.code == 0, r.err
    d = read_manifest(tmp_path / "deduped")
    assert d.height == len(items) and "phash" in d.columns


def test_rebucket_streams_part_by_part_with_the_same_rows(hw, tmp_path, monkeypatch):
    """A folder re-bucketed into a folder is read one part at a time (never the whole table) and
    gives the rows, report and metadata the whole-table run gives."""
    from pycore import manifest as manifest_mod
    from pycore.curation.bucket import BucketRequest, bucket

    items = samples(9)
    write_shards(tmp_path / "s", items, per_shard=3)
    whole = bucket(BucketRequest(tmp_path / "s", tmp_path / "whole.parquet"))
    one = Manifest.read(tmp_path / "whole.parquet")
    write_manifest(one.frame, tmp_path / "parts", metadata=one.meta, part_rows=4)
    assert len(list((tmp_path / "parts").iterdir())) == 4

    def no_whole_read(*a, **k):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(manifest_mod, "read_parts", no_whole_read, raising=False)
    monkeypatch.setattr("pycore.manifest_parts.read_parts", no_whole_read)
    got = bucket(BucketRequest(tmp_path / "parts", tmp_path / "again", table="sdxl"))
    ref = bucket(BucketRequest(tmp_path / "whole.parquet", tmp_path / "again.parquet", table="sdxl"))
    monkeypatch.undo()
    assert got._frame is None and not got.rescanned
    assert read_manifest(tmp_path / "again").equals(read_manifest(tmp_path / "again.parquet"))
    assert got.report.to_dict() == ref.report.to_dict()
    assert len(list((tmp_path / "again").iterdir())) == 4
    meta = read_metadata(tmp_path / "again")
    assert meta["history"] == '["bucket", "bucket"]' and meta["table"] == "sdxl"
    assert whole.report.total_rows == got.report.total_rows


def test_spm_score_streams_a_folder_of_parts(tmp_path, kit_spm, monkeypatch):
    """spm-score over a folder of parts into a folder: part by part (never the whole table), the
    same scores, rows and metadata as over the one-file manifest."""
    from pycore.curation.bucket import BucketRequest, bucket
    from pycore.spm.score import ScoreRequest, score_manifest

    items = samples(7)
    write_shards(tmp_path / "s", items, per_shard=3)
    bucket(BucketRequest(tmp_path / "s", tmp_path / "one.parquet", table="sdxl"))
    one = Manifest.read(tmp_path / "one.parquet")
    write_manifest(one.frame, tmp_path / "parts", metadata=one.meta, part_rows=5)

    def no_whole_read(*a, **k):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr("pycore.manifest_parts.read_parts", no_whole_read)
    common = {"prompt": "a photo", "model": str(kit_spm), "device": "cpu"}
    got = score_manifest(ScoreRequest(tmp_path / "parts", tmp_path / "scored", **common))
    monkeypatch.undo()
    ref = score_manifest(ScoreRequest(tmp_path / "one.parquet", tmp_path / "scored.parquet", **common))
    assert len(list((tmp_path / "scored").iterdir())) == 3
    a, b = read_manifest(tmp_path / "scored"), read_manifest(tmp_path / "scored.parquet")
    assert a.drop("spm_score").equals(b.drop("spm_score"))
    assert all(x == y or abs(x - y) < 1e-5 for x, y in zip(a["spm_score"].fill_null(0), b["spm_score"].fill_null(0), strict=True))
    assert (got.rows, got.scored, got.not_scored_reasons) == (ref.rows, ref.scored, ref.not_scored_reasons)
    assert Manifest.read(tmp_path / "scored").history == ["bucket", "spm-score"]


def test_caption_reads_and_writes_a_folder(hw, tmp_path):
    from tests.kit.fake_openai import FakeOpenAI

    items = samples(5)
    write_shards(tmp_path / "s", items, per_shard=3)
    assert hw("bucket", tmp_path / "s", "--out", tmp_path / "m").code == 0
    with FakeOpenAI() as srv:
        r = hw("caption", tmp_path / "m", "--out", tmp_path / "c", "--base-url", srv.base_url, "--model", "fake-vision")
        assert r.code == 0, r.err
    c = Manifest.read(tmp_path / "c")
    assert c.frame.height == len(items) and c.history == ["bucket", "caption"]
    assert (c.frame.filter(pl.col("status") == "ok")["caption_status"] == "ok").all()


def test_scan_of_shards_into_a_folder_streams_whole_shards_per_part(tmp_path, monkeypatch):
    """Shards bucketed into a folder are written part by part as they are read (each part whole
    shards, at least PART_ROWS rows), with the rows and report of the one-file run."""
    from pycore import manifest_parts
    from pycore.curation.bucket import BucketRequest, bucket

    items = samples(9)  # 14 members: 9 images + 5 broken ones
    write_shards(tmp_path / "s", items, per_shard=3)
    one = bucket(BucketRequest(tmp_path / "s", tmp_path / "one.parquet", table="sdxl"))
    monkeypatch.setattr(manifest_parts, "PART_ROWS", 4)
    got = bucket(BucketRequest(tmp_path / "s", tmp_path / "parts", table="sdxl"))
    sizes = [pl.read_parquet(p).height for p in sorted((tmp_path / "parts").iterdir())]
    assert sizes[:-1] == [6] * (len(sizes) - 1) and sum(sizes) == len(items)  # two whole shards per part
    assert read_manifest(tmp_path / "parts").equals(read_manifest(tmp_path / "one.parquet"))
    assert got._frame is None and got.report.to_dict() == one.report.to_dict()
    assert Manifest.read(tmp_path / "parts").history == ["bucket"]
