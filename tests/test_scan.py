"""Scanning: every format, EXIF orientations 1–8, and every kind of bad input becomes a row."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image, ImageOps, features

from conftest import exif_orientation, image_bytes, png_header
from pycore.manifest import fs_paths
from pycore.curation.scan import scan_folder


def scan(tmp_path: Path, **kw) -> pl.DataFrame:
    return scan_folder(str(tmp_path), **kw).frame


def row(frame: pl.DataFrame, name: str) -> dict:
    rows = [r for r in frame.iter_rows(named=True) if r["path"].endswith("/" + name)]
    assert len(rows) == 1, (name, frame["path"].to_list())
    return rows[0]


FORMATS = [
    ("JPEG", "jpg", "jpeg", {}),
    ("JPEG", "jpeg", "jpeg", {"progressive": True}),
    ("PNG", "png", "png", {}),
    ("WEBP", "webp", "webp", {"quality": 80}),
    ("WEBP", "lossless.webp", "webp", {"lossless": True}),
    ("GIF", "gif", "gif", {}),
    ("BMP", "bmp", "bmp", {}),
    ("TIFF", "tif", "tiff", {}),
    ("TIFF", "big.tiff", "tiff", {"compression": "tiff_lzw"}),
]


@pytest.mark.parametrize("fmt,ext,name,kw", FORMATS, ids=[f[1] for f in FORMATS])
@pytest.mark.parametrize("size", [(64, 48), (1, 3000), (4097, 5)])
def test_formats_sizes_match_pillow(tmp_path, fmt, ext, name, kw, size):
    data = image_bytes(fmt, size=size, **kw)
    (tmp_path / f"img.{ext}").write_bytes(data)
    r = row(scan(tmp_path), f"img.{ext}")
    assert r["status"] == "ok", r
    assert (r["width"], r["height"]) == size
    assert r["format"] == name
    assert r["file_size"] == len(data)


def _has(feature: str) -> bool:
    try:
        return bool(features.check(feature))
    except Exception:
        return False


def test_webp_with_alpha_is_vp8x(tmp_path):
    img = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    img.save(tmp_path / "a.webp", "WEBP", quality=50)
    r = row(scan(tmp_path), "a.webp")
    assert (r["status"], r["width"], r["height"]) == ("ok", 300, 200)


@pytest.mark.skipif(not _has("avif"), reason="this Pillow build cannot write AVIF")
def test_avif(tmp_path):
    Image.new("RGB", (120, 80)).save(tmp_path / "a.avif", "AVIF")
    r = row(scan(tmp_path), "a.avif")
    assert (r["status"], r["format"], r["width"], r["height"]) == ("ok", "avif", 120, 80)


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, fmt, ext, orientation):
    path = tmp_path / f"o{orientation}.{ext}"
    path.write_bytes(image_bytes(fmt, size=(160, 90), exif=exif_orientation(orientation)))
    with Image.open(path) as im:
        expected = ImageOps.exif_transpose(im).size
    r = row(scan(tmp_path), path.name)
    assert r["status"] == "ok"
    assert (r["width"], r["height"]) == expected
    assert r["orientation"] == orientation


def test_content_hash_is_xxh3_of_bytes_and_optional(tmp_path):
    a = image_bytes("PNG")
    (tmp_path / "a.png").write_bytes(a)
    (tmp_path / "b.png").write_bytes(a)
    (tmp_path / "c.png").write_bytes(image_bytes("PNG", size=(10, 10)))
    f = scan(tmp_path)
    h = f["content_hash"].to_list()
    assert h[0] == h[1] != h[2] and len(h[0]) == 32
    assert scan(tmp_path, hash=False)["content_hash"].null_count() == 3


def test_bad_inputs_each_get_a_row(tmp_path):
    good = image_bytes("JPEG", size=(64, 48))
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(good[:30])
    (tmp_path / "truncated.png").write_bytes(image_bytes("PNG")[:19])
    (tmp_path / "text.jpg").write_text("just some text, not a JPEG\n")
    (tmp_path / "fake.png").write_bytes(b"\x00" * 1000)
    (tmp_path / "huge.png").write_bytes(png_header(100_000, 100_000))
    (tmp_path / "garbage_orient.jpg").write_bytes(image_bytes("JPEG", exif=exif_orientation(57)))
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "broken.jpg")
    os.symlink("loop_b.jpg", tmp_path / "loop_a.jpg")
    os.symlink("loop_a.jpg", tmp_path / "loop_b.jpg")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "dir.jpg" / "inner.png").write_bytes(image_bytes("PNG"))
    (tmp_path / "caption.txt").write_text("a caption")
    (tmp_path / "cache.npz").write_bytes(b"PK")
    res = scan_folder(str(tmp_path))
    f = res.frame
    expect = {
        "zero.jpg": "empty",
        "truncated.jpg": "truncated",
        "truncated.png": "truncated",
        "text.jpg": "not_image",
        "fake.png": "not_image",
        "huge.png": "too_large",
        "broken.jpg": "broken_symlink",
        "loop_a.jpg": "symlink_loop",
        "loop_b.jpg": "symlink_loop",
        "inner.png": "ok",
        "garbage_orient.jpg": "ok",
    }
    assert len(f) == len(expect)
    for name, status in expect.items():
        r = row(f, name)
        assert r["status"] == status, r
        if status != "ok":
            assert r["error"], r
    huge = row(f, "huge.png")
    assert (huge["width"], huge["height"]) == (100_000, 100_000)
    g = row(f, "garbage_orient.jpg")
    assert g["orientation"] is None and "57" in g["warning"] and (g["width"], g["height"]) == (64, 48)
    assert res.skipped == {"txt": 1, "npz": 1}


def test_unreadable_file_is_a_row(tmp_path):
    p = tmp_path / "secret.jpg"
    p.write_bytes(image_bytes("JPEG"))
    p.chmod(0)
    code = (
        "import sys, json; from pycore.curation.scan import scan_folder;"
        "f = scan_folder(sys.argv[1]).frame; print(json.dumps(f.select('status','error').row(0)))"
    )
    cmd = [sys.executable, "-c", code, str(tmp_path)]
    if os.geteuid() == 0:
        # root reads everything; drop the capabilities that bypass file permissions.
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    status, error = __import__("json").loads(out.stdout)
    assert status == "permission_denied" and "ermission" in error


def test_non_utf8_names_are_kept_losslessly(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write(image_bytes("PNG"))
    f = scan(tmp_path)
    assert f["status"].to_list() == ["ok"]
    assert f["path"][0].endswith("caf\ufffd.png")
    assert f["path_bytes"][0] == raw
    assert os.fsencode(fs_paths(f)[0]) == raw


def test_extension_in_any_case_and_format_from_bytes(tmp_path):
    (tmp_path / "UPPER.JPG").write_bytes(image_bytes("JPEG"))
    (tmp_path / "png_named.jpg").write_bytes(image_bytes("PNG", size=(7, 9)))
    f = scan(tmp_path)
    assert row(f, "UPPER.JPG")["format"] == "jpeg"
    r = row(f, "png_named.jpg")
    assert (r["format"], r["width"], r["height"]) == ("png", 7, 9)


# Small files written by Pillow's AVIF plugin, pillow-heif and libjxl's cjxl (tests/data/formats).
FIXTURES = Path(__file__).parent / "data" / "formats"


@pytest.mark.parametrize(
    "name,fmt,size,orientation",
    [
        ("plain.avif", "avif", (40, 24), None),
        ("rot6.avif", "avif", (24, 40), 6),  # EXIF 6 stored as irot/imir: displayed portrait
        ("plain.heic", "heic", (40, 24), None),
        ("rot8.heic", "heic", (24, 40), 8),
        ("plain.jxl", "jxl", (40, 24), None),
        ("lossless.jxl", "jxl", (40, 24), None),
    ],
)
def test_avif_heic_jxl_fixtures(tmp_path, name, fmt, size, orientation):
    shutil.copy(FIXTURES / name, tmp_path / name)
    r = row(scan(tmp_path), name)
    assert (r["status"], r["format"], (r["width"], r["height"])) == ("ok", fmt, size), r
    if orientation is not None:
        assert r["orientation"] == orientation
