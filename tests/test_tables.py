from pathlib import Path

import pytest

from pycore.curation import tables as bt
from pycore.errors import TableError


def test_bundled_tables():
    hw = bt.load_table("helloworld")
    assert len(hw.sizes) == 15 and hw.sizes[0] == (832, 1248)
    assert all(0.984 * 1024**2 <= w * h <= 1024**2 for w, h in hw.sizes)
    sdxl = bt.load_table("sdxl")
    assert len(sdxl.sizes) == 26 and all(w % 64 == 0 and h % 64 == 0 for w, h in sdxl.sizes)


def test_off_grid_and_snap():
    hw = bt.load_table("helloworld")
    assert sorted(bt.off_grid(hw)) == [(768, 1360), (1360, 768)]
    snapped = bt.snap(hw, 32)
    assert (1344, 768) in snapped.sizes and (768, 1344) in snapped.sizes
    assert bt.off_grid(snapped) == []
    assert bt.snap_side(1360, 32) == 1344 and bt.snap_side(1370, 32) == 1376 and bt.snap_side(5, 32) == 32


def test_user_csv_and_toml(tmp_path: Path):
    (tmp_path / "t.csv").write_text("# mine\nwidth,height\n512,768\n768,512\n")
    assert bt.load_table(str(tmp_path / "t.csv")).sizes == ((512, 768), (768, 512))
    (tmp_path / "n.csv").write_text("512,512\n")
    assert bt.load_table(str(tmp_path / "n.csv")).sizes == ((512, 512),)
    (tmp_path / "t.toml").write_text("buckets = [[512, 768], [640, 640]]\n")
    assert bt.load_table(str(tmp_path / "t.toml")).sizes == ((512, 768), (640, 640))
    (tmp_path / "u.toml").write_text("[[buckets]]\nwidth = 1024\nheight = 1024\n")
    assert bt.load_table(str(tmp_path / "u.toml")).sizes == ((1024, 1024),)


@pytest.mark.parametrize(
    "name,text,msg",
    [
        ("a.csv", "width,height\n512,abc\n", "not 'width,height' integers"),
        ("b.csv", "# nothing\n", "empty"),
        ("c.csv", "512,512\n512,512\n", "more than once"),
        ("d.csv", "0,512\n", "out of range"),
        ("e.toml", "buckets = [[1,2,3]]", "not a width/height pair"),
        ("f.toml", "buckets = [", "not valid TOML"),
        ("g.toml", "sizes = []", "expected `buckets"),
        ("h.json", "{}", "use a .csv"),
    ],
)
def test_malformed_tables(tmp_path: Path, name, text, msg):
    (tmp_path / name).write_text(text)
    with pytest.raises(TableError, match=msg):
        bt.load_table(str(tmp_path / name))


def test_unknown_table_name():
    with pytest.raises(TableError, match="neither a bundled table"):
        bt.load_table("nope")


def test_generated_table_matches_kohya_rules():
    t = bt.generate_table(1024 * 1024, 64, 256, 2048)
    assert (1024, 1024) in t.sizes
    for w, h in t.sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and 256 <= min(w, h) and max(w, h) <= 2048
        assert (h, w) in t.sizes
    with pytest.raises(TableError):
        bt.generate_table(1024, 64, 4096, 2048)
