"""Later commands open images by the manifest's reference: dedup and caption give the same
results on tar shards and Parquet byte tables as on the same images as loose files."""

from __future__ import annotations

import polars as pl
import pytest

from conftest import assert_one_line_error
from tests.kit.fake_openai import FakeOpenAI
from tests.kit.shards import bucketed_sets, samples


def key(path: str) -> str:
    if ".parquet::" in path:
        return "row" + path.rpartition("/")[2]
    return path.rpartition("::")[2] if "::" in path else path.rpartition("/")[2]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    return root, samples(10), bucketed_sets(root, 10)


def by_item(frame: pl.DataFrame, items, cols: list[str]) -> dict[str, tuple]:
    names = [n for n, _, _ in items]
    rows = {}
    for r in frame.iter_rows(named=True):
        k = key(r["path"])
        k = names[int(k[3:])] if k.startswith("row") else k
        rows[k] = tuple(r[c] for c in cols)
    return rows


def test_dedup_same_on_shards_tables_and_files(hw, manifests, tmp_path):
    root, items, ms = manifests
    cols = ["status", "phash", "dhash", "dup_exact", "keep"]
    got = {}
    for name, m in ms.items():
        r = hw("dedup", m, "--out", tmp_path / f"d-{name}.parquet", "--json")
        assert r.code == 0, r.err
        got[name] = by_item(pl.read_parquet(tmp_path / f"d-{name}.parquet"), items, cols)
    assert got["shards"] == got["loose"] == got["table"]
    ok = [v for v in got["loose"].values() if v[0] == "ok"]
    assert len(ok) >= 10 and all(v[1] for v in ok)
    assert sum(1 for v in ok if v[3]) == 2  # the two byte-identical members
    # moving duplicates out of a shard is refused with one line, nothing written
    r = hw("dedup", ms["shards"], "--out", tmp_path / "mv.parquet", "--apply", f"move:{tmp_path / 'dups'}")
    assert_one_line_error(r, 1, "inside tar shards")
    assert not (tmp_path / "mv.parquet").exists()


def test_caption_same_on_shards_and_files(hw, manifests, tmp_path):
    root, items, ms = manifests
    got = {}
    for name in ("loose", "shards", "table"):
        out = tmp_path / f"c-{name}.parquet"
        with FakeOpenAI() as srv:
            r = hw("caption", ms[name], "--out", out, "--base-url", srv.base_url, "--model", "fake-vision", "--json")
            assert r.code == 0, r.err
        f = pl.read_parquet(out)
        got[name] = by_item(f, items, ["caption_status", "caption"])
    assert got["shards"] == got["loose"] == got["table"]
    assert sum(1 for s, _ in got["loose"].values() if s == "ok") >= 10


def test_caption_hashes_shard_rows_of_a_no_hash_manifest(hw, manifests, tmp_path):
    root, items, _ = manifests
    m = tmp_path / "nohash.parquet"
    assert hw("bucket", root / "shards", "--out", m, "--no-hash").code == 0
    out = tmp_path / "c.parquet"
    with FakeOpenAI() as srv:
        r = hw("caption", m, "--out", out, "--base-url", srv.base_url, "--model", "fake-vision", "--json")
        assert r.code == 0, r.err
    f = pl.read_parquet(out)
    ok = f.filter(pl.col("status") == "ok")
    assert (ok["caption_status"] == "ok").all() and ok.height >= 10
