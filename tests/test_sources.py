"""Images where they are stored: tar shards and Parquet byte tables scan row-for-row like the
same images as loose files; references open the same bytes; broken members are rows."""

from __future__ import annotations

import tarfile
from pathlib import Path

import polars as pl
import pytest

from conftest import assert_one_line_error
from pycore.curation.scan import scan_folder
from pycore.curation.scan_sources import SourceOptions, scan_shards, scan_source, scan_tables, split_member
from pycore.curation.shards import expand_braces, expand_inputs
from pycore.sources import open_image, parse_ref, read_bytes
from tests.kit.shards import samples, write_loose, write_shards, write_table

COLS = ["status", "format", "width", "height", "orientation", "file_size", "content_hash"]


def by_name(frame: pl.DataFrame) -> dict[str, dict]:
    out = {}
    for r in frame.iter_rows(named=True):
        name = r["path"].rpartition("::")[2] if "::" in r["path"] else r["path"].rpartition("/")[2]
        out[name] = {c: r[c] for c in COLS}
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    items = samples()
    loose = scan_folder(str(write_loose(root / "loose", items))).frame
    return root, items, loose


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_shards_match_loose_files(data, fmt):
    root, items, loose = data
    shards = write_shards(root / f"shards{fmt}", items, per_shard=4, fmt=fmt)
    res = scan_shards([str(s) for s in shards])
    assert res.frame.height == len(items) == loose.height
    assert by_name(res.frame) == by_name(loose)
    assert set(res.frame["status"]) >= {"ok", "not_image", "empty", "truncated"}
    ok = res.frame.filter(pl.col("status") == "ok")
    assert ok["member_offset"].null_count() == 0
    # the reference opens exactly the member's bytes, with and without the recorded offset
    for r in ok.iter_rows(named=True):
        name = r["path"].rpartition("::")[2]
        want = (root / "loose" / name).read_bytes()
        assert read_bytes(r["path"]) == want
        assert read_bytes(r["path"], r["member_offset"], r["file_size"]) == want
        with open_image(r["path"]) as im:
            im.load()


def test_sidecars_carried_and_skipped_counted(data):
    root, items, _ = data
    shards = write_shards(root / "side", items, per_shard=6)
    res = scan_shards([str(s) for s in shards], sidecars=True)
    caps = dict(zip(res.frame["path"].str.split("::").list.last(), res.frame["source_caption"], strict=True))
    assert caps["000000003.gif"] == "a picture number 3"
    assert caps[f"{len(items) - 4:09d}.jpg"] is None  # the empty member had no .txt
    assert res.frame["source_json"].drop_nulls().str.contains('"key"').all()
    plain = scan_shards([str(s) for s in shards])
    assert plain.skipped == {"txt": len(items) - 1, "json": len(items)}
    assert "source_caption" not in plain.frame.columns


def test_truncated_and_damaged_shards_are_rows(data, tmp_path):
    root, items, _ = data
    (s,) = write_shards(tmp_path / "t", items[:3], per_shard=3)
    raw = s.read_bytes()
    cut = tmp_path / "cut.tar"
    # cut inside the data of the last image member (after its header)
    last = max(m.offset_data for m in tarfile.open(s).getmembers() if m.name == items[2][0])
    cut.write_bytes(raw[: last + 10])
    res = scan_shards([str(cut)])
    st = dict(zip(res.frame["path"], res.frame["status"], strict=True))
    assert st[f"{cut}::{items[0][0]}"] == "ok"
    assert st[f"{cut}::{items[2][0]}"] == "truncated"
    assert len(st) == 3 and res.problems
    # a damaged header part-way: the members before it are rows, plus one row for the shard
    bad = tmp_path / "bad.tar"
    second = [m for m in tarfile.open(s).getmembers()][3].offset  # header of the 2nd image's member
    damaged = bytearray(raw)
    damaged[second + 5] ^= 0x41
    bad.write_bytes(bytes(damaged))
    res = scan_shards([str(bad), str(tmp_path / "missing.tar")])
    rows = dict(zip(res.frame["path"], res.frame["status"], strict=True))
    assert rows[f"{bad}::{items[0][0]}"] == "ok"
    assert rows[f"{bad}::"] == "corrupt"
    assert rows[f"{tmp_path / 'missing.tar'}::"] == "not_found"


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_bytes_match_loose_files(data, struct):
    root, items, loose = data
    t = write_table(root / f"t{struct}.parquet", items, struct=struct, null_rows=(3,))
    res = scan_tables([str(t)], "image", caption_column="text")
    assert res.frame.height == len(items)
    got, want = by_name(res.frame), by_name(loose)
    for i, (name, _, _) in enumerate(items):
        g = got[f"image/{i}"]
        if i == 3:
            assert g["status"] == "empty"
            continue
        assert g == want[name], name
    assert res.frame["source_caption"][1] == items[1][2]
    ref = res.frame["path"][5]
    assert parse_ref(ref).row == 5 and read_bytes(ref) == items[5][1]


def test_brace_patterns_and_lists(tmp_path, data):
    root, items, loose = data
    shards = write_shards(tmp_path / "b", items, per_shard=4)
    assert expand_braces("x/{00000..00002}.tar") == ["x/00000.tar", "x/00001.tar", "x/00002.tar"]
    pat = str(tmp_path / "b" / "{00000..00003}.tar")
    lst = tmp_path / "list.lst"
    lst.write_text("# shards\n" + "\n".join(f"b/{p.name}" for p in shards) + "\n")
    txt = tmp_path / "list.txt"  # a .txt is a list only with @ (a bare .txt may be a caption)
    txt.write_text(lst.read_text())
    for src in (pat, str(tmp_path / "b"), str(lst), "@" + str(lst), "@" + str(txt)):
        assert expand_inputs(src, (".tar",)) == [str(p) for p in shards], src
        res = scan_source(src, SourceOptions())
        assert res is not None and by_name(res.frame) == by_name(loose)
    assert split_member("a/b.seg.png") == ("a/b", "seg.png")


def test_cli_bucket_on_shards_and_tables(hw, tmp_path, data):
    root, items, loose = data
    write_shards(tmp_path / "s", items, per_shard=5)
    out = tmp_path / "m.parquet"
    r = hw("bucket", str(tmp_path / "s" / "{00000..00002}.tar"), "--out", out, "--sidecars", "--json")
    assert r.code == 0, r.err
    m = pl.read_parquet(out)
    assert m.height == len(items) and m["source_caption"].null_count() == 1
    ref = hw("bucket", str(root / "loose"), "--out", tmp_path / "l.parquet", "--json")
    a, b = by_name(m), by_name(pl.read_parquet(tmp_path / "l.parquet"))
    assert a == b
    assert pl.read_parquet(out)["bucket_width"].to_list() is not None and ref.code == 0
    t = write_table(tmp_path / "img.parquet", items)
    r = hw("bucket", t, "--out", tmp_path / "x.parquet")
    assert_one_line_error(r, 1, "--image-column image")
    r = hw("bucket", t, "--out", tmp_path / "x.parquet", "--image-column", "nope")
    assert_one_line_error(r, 1, "no column 'nope'")
    r = hw("bucket", t, "--out", tmp_path / "x.parquet", "--image-column", "image", "--caption-column", "text")
    assert r.code == 0, r.err
    assert pl.read_parquet(tmp_path / "x.parquet").height == len(items)
    r = hw("bucket", str(tmp_path / "s" / "{00000..00009}.tar"), "--out", tmp_path / "y.parquet")
    assert r.code == 0  # missing shards are rows, not a crash
    y = pl.read_parquet(tmp_path / "y.parquet")
    assert (y["status"] == "not_found").sum() == 7


def test_user_mistakes_are_one_line_errors(hw, tmp_path, data):
    from conftest import tree_digest

    root, items, _ = data
    shards = write_shards(tmp_path / "s", items[:4], per_shard=2)
    before = tree_digest(tmp_path / "s", root / "loose")
    out = tmp_path / "m.parquet"
    assert_one_line_error(hw("bucket", tmp_path / "s", "--out", out, "--caption-column", "text"), 1, "--image-column")
    assert_one_line_error(hw("bucket", root / "loose", "--out", out, "--sidecars"), 1, "tar shards")
    assert_one_line_error(hw("bucket", str(tmp_path / "none" / "{0..3}.tar"), "--out", out), 1, "none of the 4 shard")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert_one_line_error(hw("bucket", "@" + str(tmp_path / "empty.txt"), "--out", out), 1, "names no files")
    (tmp_path / "twice.lst").write_text(f"{shards[0]}\n{shards[0]}\n")
    assert_one_line_error(hw("bucket", tmp_path / "twice.lst", "--out", out), 1, "named twice")
    t = write_table(tmp_path / "t.parquet", items[:3])
    assert_one_line_error(hw("bucket", t, "--out", out, "--image-column", "text"), 1, "not image bytes")
    assert_one_line_error(hw("bucket", tmp_path / "s", "--out", out, "--ray", "--json"), 1, "--ray local")
    assert not out.exists()
    assert tree_digest(tmp_path / "s", root / "loose") == before


def test_ray_is_never_imported_without_ray(tmp_path, data):
    """Shards, tables and manifest folders run without Ray: a fresh process never imports it."""
    import subprocess
    import sys

    root, items, _ = data
    write_shards(tmp_path / "s", items, per_shard=4)
    code = (
        "import sys\n"
        "from cli.app import main\n"
        f"assert main(['bucket', {str(tmp_path / 's')!r}, '--out', {str(tmp_path / 'm')!r}, '--sidecars']) == 0\n"
        f"assert main(['dedup', {str(tmp_path / 'm')!r}, '--out', {str(tmp_path / 'd.parquet')!r}]) == 0\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_photo_folder_holding_a_tar_is_still_a_folder_of_images(tmp_path, data):
    root, items, loose = data
    photos = write_loose(tmp_path / "photos", items)
    write_shards(tmp_path / "photos" / "backup", items[:3], per_shard=3)  # shards one level down
    (tmp_path / "photos" / "old.tar").write_bytes(b"")  # and an archive beside the photos
    assert scan_source(str(photos), SourceOptions()) is None  # the caller scans it as a folder
    shards_only = tmp_path / "photos" / "backup"
    got = scan_source(str(shards_only), SourceOptions())
    assert got is not None and got.frame.height == 3
