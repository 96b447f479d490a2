"""`hw dedup`: imagehash bit-exactness, exact Hamming search, groups, keep policy, CLI."""

from __future__ import annotations

import io
import os
from pathlib import Path

import imagehash
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skdata

from pycore import _rust
from pycore.curation import dedup as dd
from pycore.errors import HwError
from pycore.manifest import read_manifest, read_metadata, write_manifest
from tests.conftest import SAMPLE

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "retina"]


def ref_hashes(path) -> tuple[str, str]:
    with Image.open(path) as im:
        return str(imagehash.phash(im)), str(imagehash.dhash(im))


def rust_hashes(paths, fast=None) -> list[tuple[str, str] | None]:
    r = _rust.perceptual_hashes([str(p) for p in paths], fast_min_side=fast)
    return [(f"{int(a):016x}", f"{int(b):016x}") if ok else None for a, b, ok in zip(r["phash"], r["dhash"], r["ok"])]


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    """scikit-image sample photos in the formats and modes users have: PNG (RGB, L, P, RGBA, LA,
    16-bit) and JPEG (qualities, 4:4:4 / 4:2:2 / 4:2:0, progressive, grayscale, CMYK)."""
    d = tmp_path_factory.mktemp("photos")
    files = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(skdata, name)())
        if max(im.size) > 800:  # keep the test quick: a 700×700 crop of the big ones
            im = im.crop((100, 100, 800, 800))
        variants = [("PNG", m, {}) for m in ("RGB", "L", "P", "RGBA", "LA")]
        variants += [("JPEG", "RGB", dict(quality=q, subsampling=s)) for q, s in ((95, 0), (75, 1), (50, 2))]
        variants += [("JPEG", "RGB", dict(quality=85, progressive=True)), ("JPEG", "L", dict(quality=90)),
                     ("JPEG", "CMYK", dict(quality=95, subsampling=0))]  # fmt: skip
        for k, (fmt, mode, kw) in enumerate(variants):
            p = d / f"{name}_{k}.{fmt.lower()}"
            im.convert(mode).save(p, fmt, **kw)
            files.append(p)
        # RGBA with real transparency, 16-bit gray
        rgba = im.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(im.size))
        rgba.save(d / f"{name}_alpha.png")
        files.append(d / f"{name}_alpha.png")
        tall = im.crop((0, 0, im.width // 3, im.height))  # height shrinks most: vertical pass first
        tall.save(d / f"{name}_tall.jpg", quality=90)
        files.append(d / f"{name}_tall.jpg")
        g16 = (np.asarray(im.convert("L")).astype(np.uint16) * 3 // 2).astype(np.uint16)
        Image.fromarray(g16).save(d / f"{name}_g16.png")
        files.append(d / f"{name}_g16.png")
    return files


def test_bit_exact_with_imagehash_on_real_photos(photo_files):
    got = rust_hashes(photo_files)
    for p, g in zip(photo_files, got, strict=True):
        assert g is not None, f"Rust did not decode {p.name}"
        assert g == ref_hashes(p), p.name


def test_luma_matches_pillow_convert_L(photo_files):
    for p in photo_files[::3]:
        with Image.open(p) as im:
            ref = np.asarray(im.convert("L"))
        np.testing.assert_array_equal(_rust.decode_luma(str(p)), ref, err_msg=p.name)


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_resample_and_dct_match_imagehash(w, h, seed):
    # Any size, up- and down-sampling; smooth noise so there are no exact median ties.
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(h, w)).astype(np.uint8)
    im = Image.fromarray(a, "L")
    p, d = _rust.hash_luma(a)
    assert f"{p:016x}" == str(imagehash.phash(im)) or _median_tie(im)
    assert f"{d:016x}" == str(imagehash.dhash(im))


def _median_tie(im) -> bool:
    """imagehash's phash bits are ill-defined when the two middle DCT values tie (flat input)."""
    import scipy.fftpack

    px = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=float)
    low = scipy.fftpack.dct(scipy.fftpack.dct(px, axis=0), axis=1)[:8, :8].ravel()
    s = np.sort(low)
    return abs(s[31] - s[32]) < 1e-6


def test_bit_layout_and_documented_tie_case():
    # Bit 63 is the first (DC) coefficient, row-major after it, as imagehash's hex string.
    a = np.random.default_rng(5).integers(0, 256, size=(50, 70)).astype(np.uint8)
    p, _ = _rust.hash_luma(a)
    bits = imagehash.phash(Image.fromarray(a)).hash.flatten()
    assert [(p >> (63 - k)) & 1 for k in range(64)] == [int(b) for b in bits]
    # A hard black/white step has many DCT coefficients exactly 0, tied with the median: those
    # bits depend on floating-point noise (scipy's FFT vs our direct sum) — the documented case.
    step = np.zeros((64, 64), np.uint8)
    step[:, 32:] = 255
    assert _median_tie(Image.fromarray(step))


def test_fast_mode_is_close_to_exact(photo_files):
    jpegs = [p for p in photo_files if p.suffix == ".jpeg"]
    exact = rust_hashes(jpegs)
    fast = rust_hashes(jpegs, fast=32)
    dist = [bin(int(e[0], 16) ^ int(f[0], 16)).count("1") for e, f in zip(exact, fast, strict=True)]
    assert max(dist) <= 12 and np.mean(dist) <= 4, dist
    luma = _rust.decode_luma(str(jpegs[0]), fast_min_side=64)
    full = _rust.decode_luma(str(jpegs[0]))
    assert luma.shape[0] < full.shape[0] and min(luma.shape) >= 64


def test_undecodable_files_are_errors_not_crashes(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (tmp_path / "t.png").write_bytes((SAMPLE / "photos" / "coffee_0.png").read_bytes()[:200])
    r = _rust.perceptual_hashes([str(tmp_path / "bad.jpg"), str(tmp_path / "t.png"), str(tmp_path / "none.png")])
    assert not r["ok"].any()
    assert r["error_kind"][2] == "not_found"


# ---- search ----


def planted(n, t, seed):
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, size=n, dtype=np.uint64)
    k = n // 4
    src = rng.integers(0, n, size=k)
    flips = np.zeros(k, np.uint64)
    for i in range(k):
        for b in rng.choice(64, size=rng.integers(0, t + 3), replace=False):
            flips[i] |= np.uint64(1) << np.uint64(b)
    return np.concatenate([h, h[src] ^ flips, h[: n // 20]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 400), t=st.integers(0, 20), seed=st.integers(0, 10_000))
def test_mih_equals_brute_force(n, t, seed):
    h = planted(n, t, seed)
    got = _rust.hamming_pairs(h, t)
    ref = _rust.hamming_pairs(h, t, brute_force=True)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    # and the brute force is itself right
    if len(h) < 120:
        pairs = {(i, j) for i in range(len(h)) for j in range(i + 1, len(h)) if bin(int(h[i]) ^ int(h[j])).count("1") <= t}
        assert pairs == set(zip(ref[0].tolist(), ref[1].tolist()))


def test_mih_large_planted_pairs_found():
    rng = np.random.default_rng(1)
    n = 100_000
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64)
    idx = 2 * rng.choice(n // 2, size=1000, replace=False)  # disjoint pairs (2k, 2k + 1)
    partner = idx + 1
    for a, b in zip(idx, partner, strict=True):
        bits = rng.choice(64, size=8, replace=False)
        h[b] = h[a] ^ np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64))
    i, j, d = _rust.hamming_pairs(h, 8)
    found = set(zip(i.tolist(), j.tolist()))
    for a, b in zip(idx.tolist(), partner.tolist(), strict=True):
        assert (min(a, b), max(a, b)) in found
    assert (d <= 8).all()


def test_components_and_diameters():
    lab = _rust.connected_components(6, np.array([0, 1, 4], np.uint32), np.array([1, 2, 5], np.uint32))
    assert lab.tolist() == [0, 0, 0, -1, 1, 1]
    d, exact = _rust.group_max_distances(np.array([0, 0b1111, 0xFF, 1, 1, 3], np.uint64), lab)
    assert d.tolist() == [8, 1] and exact.all()
    with pytest.raises(ValueError):
        _rust.connected_components(2, np.array([0], np.uint32), np.array([5], np.uint32))


def test_cosine_pairs_blocked_equals_full():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(300, 16)).astype(np.float32)
    e[150:] = e[:150] + rng.normal(scale=0.1, size=(150, 16))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    i, j, s = dd.cosine_pairs(e, 0.9, block=64)
    full = e @ e.T
    ref = {(a, b) for a in range(300) for b in range(a + 1, 300) if full[a, b] >= 0.9}
    assert set(zip(i.tolist(), j.tolist())) == ref and len(ref) >= 150


def test_options_validated():
    with pytest.raises(HwError):
        dd.DedupOptions(threshold=40)
    with pytest.raises(HwError):
        dd.DedupOptions(hash_mode="quick")
    with pytest.raises(HwError):
        dd.DedupOptions(method="sift")


# ---- CLI ----


def make_set(tmp_path) -> Path:
    """A folder with exact copies, near duplicates (re-encode, resize, brightness) and distinct photos."""
    d = tmp_path / "imgs"
    d.mkdir()
    base = Image.fromarray(skdata.astronaut()).resize((256, 256))
    base.save(d / "a.png")
    (d / "a_copy.png").write_bytes((d / "a.png").read_bytes())
    base.save(d / "a_q70.jpg", quality=70)
    base.resize((200, 200), Image.Resampling.BICUBIC).save(d / "a_small.png")
    Image.eval(base, lambda v: min(255, v + 12)).save(d / "a_bright.jpg", quality=90)
    big = Image.fromarray(skdata.astronaut()).resize((400, 400))
    big.save(d / "a_big.jpg", quality=95)
    for name in ("coffee", "chelsea", "rocket", "camera"):
        Image.fromarray(getattr(skdata, name)()).save(d / f"{name}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(40))
    return d


@pytest.fixture
def manifest(tmp_path, hw) -> Path:
    d = make_set(tmp_path)
    out = tmp_path / "m.parquet"
    r = hw("bucket", d, "--out", out)
    assert r.code == 0, r.err
    return out


def test_cli_groups_keep_and_columns(hw, manifest, tmp_path):
    out = tmp_path / "d.parquet"
    r = hw("dedup", manifest, "--out", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    f = read_manifest(out)
    for c in ("phash", "dhash", "dup_group", "dup_distance", "dup_max_distance", "dup_exact", "keep"):
        assert c in f.columns
    by = {Path(p).name: row for p, row in zip(f["path"], f.iter_rows(named=True), strict=True)}
    # every row's hash is imagehash's
    for name, row in by.items():
        if row["status"] == "ok":
            assert (row["phash"], row["dhash"]) == ref_hashes(row["path"]), name
    group = by["a.png"]["dup_group"]
    assert group is not None
    for n in ("a_copy.png", "a_q70.jpg", "a_small.png", "a_bright.jpg", "a_big.jpg"):
        assert by[n]["dup_group"] == group, n
    for n in ("coffee.png", "chelsea.png", "rocket.png", "camera.png"):
        assert by[n]["dup_group"] is None and by[n]["keep"] is True
    # highest resolution kept
    assert by["a_big.jpg"]["keep"] is True and by["a_big.jpg"]["dup_distance"] == 0
    assert sum(by[n]["keep"] is False for n in by) == 5 == rep["marked_for_removal"]
    assert rep["exact_groups"] == 1 and rep["near_groups"] == 1
    gmax = by["a.png"]["dup_max_distance"]
    members = [row for row in by.values() if row["dup_group"] == group]
    assert gmax == max(bin(int(x["phash"], 16) ^ int(y["phash"], 16)).count("1") for x in members for y in members)
    for row in members:
        kept = next(m for m in members if m["keep"])
        assert row["dup_distance"] == bin(int(row["phash"], 16) ^ int(kept["phash"], 16)).count("1")
    # the broken JPEG keeps its row, with a reason
    assert by["broken.jpg"]["status"] != "ok" and by["broken.jpg"]["keep"] is None


def test_cli_reuses_hashes_and_keep_by(hw, manifest, tmp_path):
    out1, out2, out3 = tmp_path / "1.parquet", tmp_path / "2.parquet", tmp_path / "3.parquet"
    assert hw("dedup", manifest, "--out", out1).code == 0
    r = hw("dedup", out1, "--out", out2, "--json")
    assert r.code == 0, r.err
    assert r.json()["hashed"] == 0 and r.json()["reused"] >= 9
    assert read_manifest(out1)["phash"].to_list() == read_manifest(out2)["phash"].to_list()
    # --keep-by a score column: keep the highest score
    f = read_manifest(out2)
    score = [10.0 if p.endswith("a_small.png") else 1.0 for p in f["path"]]
    write_manifest(f.with_columns(pl.Series("aesthetic", score)), tmp_path / "s.parquet")
    r = hw("dedup", tmp_path / "s.parquet", "--out", out3, "--keep-by", "aesthetic", "--json")
    assert r.code == 0, r.err
    g = read_manifest(out3)
    kept = g.filter(pl.col("keep") & pl.col("dup_group").is_not_null())["path"].to_list()
    assert any(p.endswith("a_small.png") for p in kept)
    assert hw("dedup", out2, "--out", tmp_path / "4.parquet", "--keep-by", "nope").code == 1


def test_cli_threshold_zero_and_hash_mode_fast(hw, manifest, tmp_path):
    r = hw("dedup", manifest, "--out", tmp_path / "z.parquet", "--threshold", "0", "--json")
    assert r.code == 0
    f = read_manifest(tmp_path / "z.parquet")
    assert (f.filter(pl.col("dup_group").is_not_null())["dup_distance"] == 0).all()
    r = hw("dedup", manifest, "--out", tmp_path / "f.parquet", "--hash-mode", "fast", "--json")
    assert r.code == 0 and r.json()["hash_mode"] == "fast"


def test_cli_missing_columns_and_bad_options(hw, tmp_path):
    pl.DataFrame({"path": ["x.jpg"]}).write_parquet(tmp_path / "bad.parquet")
    r = hw("dedup", tmp_path / "bad.parquet", "--out", tmp_path / "o.parquet")
    assert r.code == 1 and "status" in r.err and len(r.err.strip().splitlines()) == 1
    r = hw("dedup", tmp_path / "bad.parquet", "--out", tmp_path / "o.parquet", "--apply", "delete:x")
    assert r.code == 1 and "--apply" in r.err


def test_cli_apply_move_symlink_dry_run(hw, manifest, tmp_path):
    dup_dir = tmp_path / "dups"
    out = tmp_path / "d.parquet"
    r = hw("dedup", manifest, "--out", out, "--apply", f"move:{dup_dir}", "--dry-run")
    assert r.code == 0 and "would move" in r.err
    assert not dup_dir.exists()
    imgs = tmp_path / "imgs"
    before = sorted(os.listdir(imgs))
    r = hw("dedup", manifest, "--out", tmp_path / "s.parquet", "--apply", f"symlink:{dup_dir}", "--json")
    assert r.code == 0, r.err
    links = list(dup_dir.rglob("*"))
    assert sum(p.is_symlink() for p in links) == 5
    assert sorted(os.listdir(imgs)) == before
    # moving: never overwrites (names collide with the symlinks made above)
    r = hw("dedup", manifest, "--out", tmp_path / "m2.parquet", "--apply", f"move:{dup_dir}", "--json")
    assert r.code == 0, r.err
    assert len(os.listdir(imgs)) == len(before) - 5
    assert sum(p.is_symlink() for p in dup_dir.rglob("*")) == 5  # the old symlinks are untouched
    f = read_manifest(tmp_path / "m2.parquet")
    moved = f.filter(pl.col("status") == "duplicate_moved")
    assert moved.height == 5 and all(Path(p).is_file() for p in moved["dup_moved_to"])
    assert (f.filter(pl.col("keep"))["path"].map_elements(os.path.exists, return_dtype=pl.Boolean)).all()


def test_cli_refuses_to_overwrite(hw, manifest, tmp_path):
    out = tmp_path / "d.parquet"
    out.write_bytes(b"x")
    r = hw("dedup", manifest, "--out", out)
    assert r.code == 1 and "--overwrite" in r.err
    assert out.read_bytes() == b"x"


def test_sample_manifest_bit_exact(hw, tmp_path):
    m = tmp_path / "sample.parquet"
    assert hw("bucket", SAMPLE, "--out", m, "--snap", "32").code == 0
    r = hw("dedup", m, "--out", tmp_path / "d.parquet", "--json")
    assert r.code == 0, r.err
    f = read_manifest(tmp_path / "d.parquet").filter(pl.col("status") == "ok")
    assert f.height > 30
    for p, ph, dh in f.select("path", "phash", "dhash").iter_rows():
        assert (ph, dh) == ref_hashes(p), p


def _tiny_clip():
    from tests.kit.open_clip import embed_only_clip

    return embed_only_clip(seed=0)


@pytest.mark.slow
def test_clip_method_with_tiny_model(manifest, tmp_path, monkeypatch):
    model, preprocess = _tiny_clip()
    from pycore.curation.dedup import clip

    monkeypatch.setattr(clip, "load_clip", lambda name, pretrained, device: (model, preprocess))
    from cli.app import main

    out = tmp_path / "c.parquet"
    code = main(["dedup", str(manifest), "--out", str(out), "--method", "clip", "--clip-threshold", "0.99", "--device", "cpu"])
    assert code == 0
    f = read_manifest(out)
    by = {Path(p).name: r for p, r in zip(f["path"], f.iter_rows(named=True), strict=True)}
    # byte-identical files have identical embeddings: always grouped, similarity 1
    assert by["a.png"]["dup_group"] is not None and by["a.png"]["dup_group"] == by["a_copy.png"]["dup_group"]
    assert "dup_similarity" in f.columns
    # the groups are the connected components of the cosine pairs of the same embeddings
    ok = f.filter(pl.col("status") == "ok")
    emb, errs = dd.clip_embeddings(ok["path"].to_list(), model, preprocess, "cpu")
    assert not any(errs)
    i, j, _ = dd.cosine_pairs(emb, 0.99)
    labels = _rust.connected_components(ok.height, i, j)
    want = {frozenset(np.flatnonzero(labels == g).tolist()) for g in set(labels.tolist()) if g >= 0}
    got_labels = ok["dup_group"].to_list()
    got = {frozenset(k for k, x in enumerate(got_labels) if x == g) for g in set(got_labels) if g is not None}
    assert got == want
    kept = ok.filter(pl.col("keep") & pl.col("dup_group").is_not_null())
    assert (kept["dup_similarity"] > 0.999).all()
    # outliers come from the same embeddings (k-NN cosine), ranked 1..n over the ok rows
    assert sorted(ok["q_outlier_rank"].to_list()) == list(range(1, ok.height + 1))
    assert read_metadata(out)["dedup_outlier_method"].startswith("clip-knn")


def test_html_review_escapes_names(tmp_path, hw):
    d = tmp_path / "imgs"
    d.mkdir()
    im = Image.fromarray(skdata.coffee())
    im.save(d / "<b>x&y'.png")
    im.save(d / "plain.jpg", quality=90)
    m = tmp_path / "m.parquet"
    assert hw("bucket", d, "--out", m).code == 0
    page = tmp_path / "r.html"
    assert hw("dedup", m, "--out", tmp_path / "o.parquet", "--review", page).code == 0
    text = page.read_text()
    assert "<b>x" not in text and "&lt;b&gt;x&amp;y" in text
    groups_part = text.split("<section class='gallery'")[0]  # each duplicate's thumbnail once (galleries follow)
    assert groups_part.count("data:image/jpeg;base64,") == 2 and "http" not in text
