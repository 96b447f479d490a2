"""Quality statistics of `hw dedup` (Rust, same decode as the hash) against NumPy reference
formulas, their responses to constructed images, flags, outliers, keep rules and galleries.

Tolerances: sharpness relative 1e-3 (the Rust working image and Laplacian run in f32, the
reference in f64); means, spreads and colourfulness absolute 1e-3 (float32 columns); shares
absolute 1e-6; grayscale and JPEG quality exact.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from skimage import data as skdata

from pycore import _rust
from pycore.curation import dedup as dd
from pycore.curation.dedup import quality as q
from pycore.manifest import read_manifest, read_metadata
from tests.conftest import tree_digest

FLOAT_COLS = ("q_luma_mean", "q_luma_std", "q_colorfulness")


def rust_stats(paths, fast=None) -> list[dict]:
    r = _rust.perceptual_hashes([str(p) for p in paths], fast_min_side=fast, stats=True)
    out = []
    for i in range(len(paths)):
        if not r["ok"][i]:
            out.append({})
            continue
        d = {col: r[key][i].item() for key, col in q.RUST_KEYS.items()}
        d["q_jpeg_quality"] = None if d["q_jpeg_quality"] < 0 else d["q_jpeg_quality"]
        out.append(d)
    return out


def ref_stats(path: Path) -> dict:
    with Image.open(path) as im:
        gray = im.mode in ("L", "LA", "I;16", "I")
        arr = np.asarray(im.convert("L") if gray else im.convert("RGB"))
    return q.image_stats(arr)


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got["q_sharpness"] == pytest.approx(want["q_sharpness"], rel=1e-3, abs=1e-6), what
    for c in FLOAT_COLS:
        assert got[c] == pytest.approx(want[c], abs=1e-3), (what, c)
    for c in ("q_clip_low", "q_clip_high"):
        assert got[c] == pytest.approx(want[c], abs=1e-6), (what, c)
    assert got["q_grayscale"] == want["q_grayscale"], what


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("qphotos")
    files = []
    for name in ("astronaut", "coffee", "chelsea", "camera", "hubble_deep_field"):
        im = Image.fromarray(getattr(skdata, name)())
        im = im.crop((0, 0, min(im.width, 600), min(im.height, 450)))
        for k, (fmt, mode, kw) in enumerate([("PNG", "RGB", {}), ("PNG", "L", {}), ("PNG", "P", {}),
                                             ("PNG", "RGBA", {}), ("JPEG", "RGB", {"quality": 90}),
                                             ("JPEG", "L", {"quality": 80}), ("JPEG", "CMYK", {"quality": 95})]):  # fmt: skip
            p = d / f"{name}_{k}.{fmt.lower()}"
            im.convert(mode).save(p, fmt, **kw)
            files.append(p)
        small = im.resize((100, 70))  # below the working size: used as it is
        small.save(d / f"{name}_small.png")
        files.append(d / f"{name}_small.png")
    return files


def test_rust_statistics_match_numpy_reference(photos):
    for p, got in zip(photos, rust_stats(photos), strict=True):
        assert got, p
        assert_close(got, ref_stats(p), p.name)


def test_numpy_reference_by_hand():
    # 2×2 image: the working image is itself; no interior → sharpness 0
    rgb = np.array([[[255, 0, 0], [0, 0, 0]], [[255, 255, 255], [10, 10, 10]]], np.uint8)
    s = q.image_stats(rgb)
    assert s["q_sharpness"] == 0.0
    assert s["q_clip_high"] == 0.25 and s["q_clip_low"] == 0.25  # white ≥ 250; black ≤ 5 (10 is not)
    assert not s["q_grayscale"]  # mean spread 255/4 > 2
    # Laplacian of a single bright pixel in a 3×3 zero image: one interior value, variance 0
    x = np.zeros((3, 3), np.uint8)
    x[1, 1] = 100
    assert q.sharpness(x) == 0.0
    # area weights of the working image sum to one
    assert np.allclose(q._area_matrix(300, 128).sum(axis=1), 1.0)
    assert q.work_size(1200, 800) == (192, 128) and q.work_size(90, 60) == (90, 60)


def test_blur_lowers_sharpness_monotonically(tmp_path):
    base = Image.fromarray(skdata.astronaut()).resize((768, 768))
    sigmas = [0, 0.5, 1, 2, 4, 8]
    paths = []
    for s in sigmas:
        p = tmp_path / f"blur_{s}.png"
        (base.filter(ImageFilter.GaussianBlur(s)) if s else base).save(p)
        paths.append(p)
    sharp = [d["q_sharpness"] for d in rust_stats(paths)]
    assert all(a > b for a, b in zip(sharp, sharp[1:], strict=False)), sharp
    assert sharp[0] > 10 * sharp[-1]
    # the working size makes it comparable across resolutions: the same image at half size
    half = tmp_path / "half.png"
    base.resize((384, 384), Image.Resampling.BOX).save(half)
    h = rust_stats([half])[0]["q_sharpness"]
    assert 0.5 < h / sharp[0] < 2.0


def test_brightness_ramp_moves_mean_and_clipping_monotonically(tmp_path):
    base = Image.fromarray(skdata.coffee())
    factors = [0.2, 0.5, 0.8, 1.0, 1.3, 1.7, 2.5]
    paths = []
    for f in factors:
        p = tmp_path / f"b{f}.png"
        ImageEnhance.Brightness(base).enhance(f).save(p)
        paths.append(p)
    st = rust_stats(paths)
    mean = [d["q_luma_mean"] for d in st]
    high = [d["q_clip_high"] for d in st]
    low = [d["q_clip_low"] for d in st]
    assert all(a < b for a, b in zip(mean, mean[1:], strict=False)), mean
    assert all(a <= b for a, b in zip(high, high[1:], strict=False)) and high[-1] > 0.1, high
    assert all(a >= b for a, b in zip(low, low[1:], strict=False)) and low[0] > low[3], low


def test_jpeg_quality_estimate_recovers_the_saved_quality(tmp_path):
    im = Image.fromarray(skdata.chelsea())
    qualities = list(range(20, 96, 5))
    paths = []
    for k in qualities:
        p = tmp_path / f"q{k}.jpg"
        im.save(p, quality=k)
        paths.append(p)
    got = [d["q_jpeg_quality"] for d in rust_stats(paths)]
    assert got == qualities
    # the NumPy estimate (used for the Pillow fallback) agrees, from Pillow's own tables
    with Image.open(paths[3]) as j:
        assert q.estimate_jpeg_quality(np.array(j.quantization[0])) == qualities[3]
    png = tmp_path / "x.png"
    im.save(png)
    assert rust_stats([png])[0]["q_jpeg_quality"] is None


def test_colour_and_grayscale(tmp_path):
    im = Image.fromarray(skdata.astronaut())
    im.convert("L").convert("RGB").save(tmp_path / "gray_rgb.jpg", quality=90)
    im.save(tmp_path / "colour.jpg", quality=90)
    ImageEnhance.Color(im).enhance(0.3).save(tmp_path / "muted.jpg", quality=90)
    g, c, m = rust_stats([tmp_path / "gray_rgb.jpg", tmp_path / "colour.jpg", tmp_path / "muted.jpg"])
    assert g["q_grayscale"] and not c["q_grayscale"] and not m["q_grayscale"]
    assert g["q_colorfulness"] < m["q_colorfulness"] < c["q_colorfulness"]


def _manifest(hw, folder: Path, tmp_path: Path) -> Path:
    m = tmp_path / "m.parquet"
    r = hw("bucket", folder, "--out", m)
    assert r.code == 0, r.err
    return m


@pytest.fixture
def quality_set(tmp_path) -> Path:
    """16 distinct sharp, well-exposed crops, plus one blurred, one dark and one bright image and
    a broken file."""
    d = tmp_path / "set"
    d.mkdir()
    rng = np.random.default_rng(0)
    src = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    for i in range(16):
        a = src[i % 4]
        y, x = rng.integers(0, a.shape[0] - 200), rng.integers(0, a.shape[1] - 200)
        Image.fromarray(a[y : y + 200, x : x + 200]).resize((320, 320)).save(d / f"ok{i:02d}.jpg", quality=92)
    base = Image.fromarray(skdata.astronaut()[100:400, 100:400])
    base.filter(ImageFilter.GaussianBlur(6)).save(d / "blurry.jpg", quality=92)
    ImageEnhance.Brightness(Image.fromarray(skdata.coffee()[:300, :300])).enhance(0.12).save(d / "dark.jpg", quality=92)
    washed = np.clip(skdata.coffee()[:300, :300].astype(int) + 130, 0, 255).astype(np.uint8)
    Image.fromarray(washed).save(d / "bright.jpg", quality=92)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def test_flags_thresholds_from_the_set_and_nothing_moved(hw, quality_set, tmp_path):
    m = _manifest(hw, quality_set, tmp_path)
    before = tree_digest(quality_set, m)
    out = tmp_path / "q.parquet"
    r = hw("dedup", m, "--out", out, "--quality", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    f = read_manifest(out)
    by = {Path(p).name: row for p, row in zip(f["path"], f.iter_rows(named=True), strict=True)}
    assert "blurry" in by["blurry.jpg"]["q_flags"]
    assert {"underexposed", "crushed_shadows"} & set(by["dark.jpg"]["q_flags"])
    assert {"overexposed", "blown_highlights"} & set(by["bright.jpg"]["q_flags"])
    assert sum(1 for k, v in by.items() if k.startswith("ok") and v["q_flags"]) <= 2
    # a file that cannot be decoded has a status and no numbers
    assert by["broken.jpg"]["status"] != "ok" and by["broken.jpg"]["q_sharpness"] is None
    assert by["broken.jpg"]["q_flags"] is None
    # thresholds are reported and stored
    th = rep["quality"]["thresholds"]
    assert th["blurry"]["column"] == "q_sharpness" and "robust" in th["blurry"]["source"]
    assert "dedup_quality_thresholds" in read_metadata(out)
    assert tree_digest(quality_set, m) == before
    # a fixed threshold replaces the chosen one
    r = hw("dedup", m, "--out", tmp_path / "q2.parquet", "--quality", "--flag-threshold", "blurry=0", "--json")
    assert r.code == 0 and r.json()["quality"]["counts"]["blurry"] == 0


def test_outlier_rank_and_plot(hw, quality_set, tmp_path):
    m = _manifest(hw, quality_set, tmp_path)
    out, plot = tmp_path / "o.parquet", tmp_path / "h.svg"
    r = hw("dedup", m, "--out", out, "--plot", plot)
    assert r.code == 0, r.err
    f = read_manifest(out).filter(pl.col("status") == "ok").sort("q_outlier_rank")
    top5 = {Path(p).name for p in f["path"][:5]}
    assert len(top5 & {"blurry.jpg", "dark.jpg", "bright.jpg"}) >= 2, top5
    assert sorted(f["q_outlier_rank"].to_list()) == list(range(1, f.height + 1))
    svg = ET.parse(plot).getroot()
    assert svg.tag.endswith("svg") and len(list(svg.iter("{http://www.w3.org/2000/svg}rect"))) > 20


def test_keep_prefers_resolution_then_original_encoding(hw, tmp_path):
    d = tmp_path / "k"
    d.mkdir()
    im = Image.fromarray(skdata.chelsea())
    im.save(d / "b_original.jpg", quality=90)
    ImageEnhance.Brightness(im).enhance(1.2).save(d / "a_brighter.png")  # bigger file, same size
    m = _manifest(hw, d, tmp_path)
    out = tmp_path / "k.parquet"
    r = hw("dedup", m, "--out", out)
    assert r.code == 0, r.err
    assert "least processed encoding" in r.err
    f = read_manifest(out)
    by = {Path(p).name: row for p, row in zip(f["path"], f.iter_rows(named=True), strict=True)}
    assert by["b_original.jpg"]["dup_group"] == by["a_brighter.png"]["dup_group"] is not None
    assert by["b_original.jpg"]["keep"] and not by["a_brighter.png"]["keep"]


def test_keep_by_sharpness(hw, tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    im = Image.fromarray(skdata.astronaut())
    im.resize((400, 400)).save(d / "sharp_small.png")
    im.filter(ImageFilter.GaussianBlur(2.5)).save(d / "soft_big.png")  # higher resolution, blurred
    m = _manifest(hw, d, tmp_path)
    out = tmp_path / "s.parquet"
    assert hw("dedup", m, "--out", out).code == 0
    f = read_manifest(out)
    kept = {Path(p).name for p, k in zip(f["path"], f["keep"], strict=True) if k}
    assert kept == {"soft_big.png"}  # default: the higher resolution
    assert hw("dedup", m, "--out", out, "--overwrite", "--keep-by", "q_sharpness").code == 0
    f = read_manifest(out)
    kept = {Path(p).name for p, k in zip(f["path"], f["keep"], strict=True) if k}
    assert kept == {"sharp_small.png"}


def test_python_api_without_typer(tmp_path, quality_set, hw):
    m = _manifest(hw, quality_set, tmp_path)
    res = dd.run_dedup(dd.DedupRequest(manifest=m, out=tmp_path / "api.parquet", quality=True))
    assert res.report.rows == 20 and res.quality is not None and res.outlier_method.startswith("stats")
    f = read_manifest(tmp_path / "api.parquet")
    assert set(q.STAT_COLUMNS) <= set(f.columns) and {"q_flags", "q_outlier_rank"} <= set(f.columns)
    assert "dedup" in read_metadata(tmp_path / "api.parquet")["history"]
    # --no-stats: no q_* columns; stats reused on a re-run of the output in the same mode
    res2 = dd.run_dedup(dd.DedupRequest(manifest=tmp_path / "api.parquet", out=tmp_path / "again.parquet"))
    assert res2.report.reused == res2.report.hashed + res2.report.reused - res2.report.hashed
    g = read_manifest(tmp_path / "again.parquet")
    assert g["q_sharpness"].equals(f["q_sharpness"])
    res3 = dd.run_dedup(dd.DedupRequest(manifest=m, out=tmp_path / "nostats.parquet", stats=False))
    assert not any(c.startswith("q_") for c in read_manifest(tmp_path / "nostats.parquet").columns)
    assert res3.outlier_method is None


def test_fast_mode_statistics_close_to_exact(photos):
    jpgs = [p for p in photos if p.suffix == ".jpg"]
    ex, fa = rust_stats(jpgs), rust_stats(jpgs, fast=128)
    for p, a, b in zip(jpgs, ex, fa, strict=True):
        assert abs(a["q_luma_mean"] - b["q_luma_mean"]) < 2.0, p
        assert 0.3 < (b["q_sharpness"] + 1) / (a["q_sharpness"] + 1) < 3.0, p
        assert a["q_jpeg_quality"] == b["q_jpeg_quality"]


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_fast_mode_luma_only_decode(tmp_path, subsampling):
    """Fast mode decodes a YCbCr JPEG's Y plane (no chroma upsampling or colour conversion):
    the luma is Pillow's within rounding, the hashes do not depend on --stats, and the colour
    statistics (from the chroma planes, nearest sample) stay close to exact mode's."""
    im = Image.fromarray(skdata.astronaut()).crop((0, 0, 500, 360))
    p = tmp_path / f"a{subsampling}.jpg"
    im.save(p, quality=90, subsampling=subsampling)
    full = _rust.decode_luma(str(p)).astype(int)  # Pillow's convert("L"), bit-exact
    y = _rust.decode_luma(str(p), fast_min_side=4096).astype(int)  # fast mode at scale 1: Y
    d = np.abs(y - full)  # rounding (±1), and out-of-gamut colours Pillow clamps in RGB first
    assert y.shape == full.shape and d.mean() < 0.05 and (d > 1).mean() < 0.01 and d.max() <= 16
    r0 = _rust.perceptual_hashes([str(p)], fast_min_side=90)
    r1 = _rust.perceptual_hashes([str(p)], fast_min_side=90, stats=True)
    assert r0["phash"][0] == r1["phash"][0] and r0["dhash"][0] == r1["dhash"][0]
    assert _rust.decode_luma(str(p), fast_min_side=90).shape == (90, 125)  # decoded at 1/4
    ex, fa = rust_stats([p])[0], rust_stats([p], fast=90)[0]
    assert fa["q_colorfulness"] == pytest.approx(ex["q_colorfulness"], rel=0.1)
    assert fa["q_luma_mean"] == pytest.approx(ex["q_luma_mean"], abs=1.5)
    assert fa["q_grayscale"] is False and fa["q_jpeg_quality"] == ex["q_jpeg_quality"] == 90
    g = tmp_path / "gray_ycc.jpg"  # a colour JPEG of a gray picture is still gray
    im.convert("L").convert("RGB").save(g, quality=90)
    assert rust_stats([g], fast=90)[0]["q_grayscale"] is True


def test_knn_outlier_score_ranks_the_far_point_first():
    from pycore.curation.dedup import outliers

    rng = np.random.default_rng(0)
    centre = rng.normal(size=16)
    pts = centre + 0.05 * rng.normal(size=(30, 16))
    pts = np.vstack([pts, -centre])  # one embedding pointing the other way
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    sc = outliers.knn_scores(pts.astype(np.float32), k=5, block=7)  # blocks smaller than n
    assert int(np.argmax(sc)) == 30 and sc[30] > 1.5 and sc[:30].max() < 0.05
    # the hash-space surprisal: a row whose bits disagree with the majority scores highest
    h = np.full(20, 0x0F0F0F0F0F0F0F0F, np.uint64)
    h[7] = ~h[7]
    assert int(np.argmax(outliers.hash_surprisal(h))) == 7
