"""Benchmark `hw dedup` against the tools users would pick instead, side by side in one run.

    python bench/bench_dedup.py [--out bench/out] [--n-photos 1000] [--search-n 1000000]
                                [--peer-search-n 100000] [--skip-peer-search]

1. Hashing: `imagehash.phash` in a Python loop vs hw's Rust hashing (exact and fast modes, all
   cores) on the same ~1 MP JPEG photos, cut from the real photos shipped with scikit-image and
   scikit-learn (random crops resized to about 1 megapixel; small sources are upscaled).
   Also: the fast mode's agreement with exact (identical share, mean and max bit difference).
2. Search: 1,000,000 random 64-bit hashes with planted near pairs (distance 1..8), threshold 8:
   time, and every planted pair found; imagededup's search (`find_duplicates` on an encoding
   map, its default search) on --peer-search-n hashes.
3. Quality: a near-duplicate set from real photos — distinct 256–400 px tiles, each with variants
   (resize to 60%, JPEG q=40 re-encode, 6% crop, brightness +25) — precision and recall over
   pairs at a range of thresholds for hw phash (exact, fast) and imagededup's PHash.

Writes OUT/dedup.json and OUT/dedup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycore import _rust  # noqa: E402
from pycore.curation import dedup as dd  # noqa: E402

SK_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
             "retina", "moon", "coins", "stereo_motorcycle", "clock"]  # fmt: skip


def source_photos() -> list[tuple[str, np.ndarray]]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = []
    for n in SK_PHOTOS:
        a = getattr(data, n)()
        a = a[0] if isinstance(a, tuple) else a
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        out.append((n, a[..., :3].astype(np.uint8)))
    for k, a in enumerate(load_sample_images().images):
        out.append((f"sklearn{k}", a))
    return out


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs of about 1 MP: random crops of the source photos, resized, quality 85–95."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".done-{n}"
    paths = [folder / f"p{i:05d}.jpg" for i in range(n)]
    if marker.exists():
        return paths
    rng = np.random.default_rng(seed)
    src = source_photos()
    for i, p in enumerate(paths):
        name, a = src[i % len(src)]
        h, w = a.shape[:2]
        fw, fh = rng.uniform(0.5, 0.95, size=2)
        cw, ch = max(32, int(w * fw)), max(32, int(h * fh))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        im = Image.fromarray(a[y : y + ch, x : x + cw])
        aspect = rng.choice([1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9])
        tw = int(round((1_000_000 * aspect) ** 0.5))
        th = int(round(1_000_000 / tw))
        im = im.resize((tw, th), Image.Resampling.BICUBIC)
        im.save(p, "JPEG", quality=int(rng.integers(85, 96)), subsampling=int(rng.choice([0, 2])))
    marker.write_text("ok")
    return paths


def bench_hashing(paths: list[Path]) -> dict:
    import imagehash

    res: dict = {"photos": len(paths)}
    with Image.open(paths[0]) as im:
        res["example_size"] = list(im.size)
    t = time.perf_counter()
    ref = []
    for p in paths:
        with Image.open(p) as im:
            ref.append(int(str(imagehash.phash(im)), 16))
    res["imagehash_phash_loop_s"] = time.perf_counter() - t
    strs = [str(p) for p in paths]
    _rust.perceptual_hashes(strs[:8])  # warm up the pool
    modes = {"exact": None, "fast64": 64, "fast128": 128, "fast256": 256}
    hashes = {}
    for name, fast in modes.items():
        t = time.perf_counter()
        r = _rust.perceptual_hashes(strs, fast_min_side=fast, threads=0)
        res[f"hw_{name}_s"] = time.perf_counter() - t
        assert r["ok"].all()
        hashes[name] = r["phash"].astype(np.uint64)
        t = time.perf_counter()
        r1 = _rust.perceptual_hashes(strs, fast_min_side=fast, threads=1)
        res[f"hw_{name}_1thread_s"] = time.perf_counter() - t
        assert (r1["phash"] == r["phash"]).all()
    ref = np.array(ref, dtype=np.uint64)
    res["exact_identical_to_imagehash"] = float((hashes["exact"] == ref).mean())
    for name in ("fast64", "fast128", "fast256"):
        d = dd.popcount64(hashes[name] ^ hashes["exact"])
        res[f"{name}_agreement"] = {"identical_share": float((d == 0).mean()), "mean_bits": float(d.mean()),
                                    "max_bits": int(d.max()), "p99_bits": float(np.percentile(d, 99))}  # fmt: skip
    for k in list(res):
        if k.startswith("hw_") and k.endswith("_s"):
            res[k.replace("_s", "_speedup")] = res["imagehash_phash_loop_s"] / res[k]
    return res


def _floor_decode(strs: list[str], threads: int) -> float:
    """The physical floor of the fast mode: libjpeg-turbo (PyTurboJPEG, the same system library
    hw links) decoding every file at 1/8 scale, read from the page cache, over `threads` threads
    (ctypes releases the GIL during the decode)."""
    from concurrent.futures import ThreadPoolExecutor

    import turbojpeg

    local = __import__("threading").local()

    def one(p: str) -> int:
        tj = getattr(local, "tj", None) or turbojpeg.TurboJPEG()
        local.tj = tj
        with open(p, "rb") as f:
            return tj.decode(f.read(), scaling_factor=(1, 8)).shape[0]

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, strs, chunksize=16))
    return time.perf_counter() - t


def bench_stats_cost(paths: list[Path], work: Path, rounds: int = 5) -> dict:
    """Interleaved rounds, same run: the statistics' cost on the hashing call and on the whole
    `hw dedup` (run_dedup in-process), and the fast mode against its physical floor."""
    from cli.app import main as hw_main
    from pycore.curation.dedup import DedupRequest, run_dedup
    from pycore.limits import cpu_count

    strs = [str(p) for p in paths]
    manifest = work / "photos.parquet"
    if not manifest.exists():
        assert hw_main(["bucket", str(paths[0].parent), "--out", str(manifest)]) == 0
    threads = cpu_count()
    configs = {
        "floor_turbojpeg_1_8": lambda: _floor_decode(strs, threads),
        "hash_fast": lambda: _timed(lambda: _rust.perceptual_hashes(strs, fast_min_side=dd.FAST_MIN_SIDE)),
        "hash_fast_stats": lambda: _timed(lambda: _rust.perceptual_hashes(strs, fast_min_side=dd.FAST_MIN_SIDE, stats=True)),
        "hash_exact": lambda: _timed(lambda: _rust.perceptual_hashes(strs)),
        "hash_exact_stats": lambda: _timed(lambda: _rust.perceptual_hashes(strs, stats=True)),
        "dedup_exact_nostats": lambda: _timed(lambda: run_dedup(DedupRequest(manifest, work / "o1.parquet", stats=False, overwrite=True))),
        "dedup_exact_stats": lambda: _timed(lambda: run_dedup(DedupRequest(manifest, work / "o2.parquet", overwrite=True))),
        "dedup_fast_nostats": lambda: _timed(lambda: run_dedup(DedupRequest(manifest, work / "o3.parquet", hash_mode="fast", stats=False, overwrite=True))),
        "dedup_fast_stats": lambda: _timed(lambda: run_dedup(DedupRequest(manifest, work / "o4.parquet", hash_mode="fast", overwrite=True))),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    load: list[float] = []
    _rust.perceptual_hashes(strs[:8])  # warm the pool and the page cache
    _floor_decode(strs, threads)
    names = list(configs)
    for r in range(rounds):
        # Each round runs every configuration once, in an order rotated by one per round, so a
        # configuration is not always the one after the same neighbour when the load changes.
        for k in names[r % len(names) :] + names[: r % len(names)]:
            load.append(os.getloadavg()[0])
            c = time.process_time()
            times[k].append(configs[k]())
            cpu[k].append(time.process_time() - c)
    med = {k: float(np.median(v)) for k, v in times.items()}
    mcpu = {k: float(np.median(v)) for k, v in cpu.items()}
    one = stats_cpu_per_image(strs)
    floor = med["floor_turbojpeg_1_8"]
    paired = {name: _per_round(times, a, b, name.startswith("stats_cost")) for name, a, b in PAIRS}
    paired_cpu = {name: _per_round(cpu, a, b, name.startswith("stats_cost")) for name, a, b in PAIRS}
    return {"photos": len(paths), "threads": threads, "rounds": rounds, "median_s": med, "all_s": times,
            "load_1min": {"min": min(load), "median": float(np.median(load)), "max": max(load)},
            "per_round": paired, "per_round_cpu": paired_cpu,
            "median_cpu_s": mcpu, "all_cpu_s": cpu, "one_thread_cpu_ms_per_image": one,
            "one_thread_stats_cost_exact": one["exact_stats"] / one["exact"] - 1,
            "one_thread_stats_cost_fast": one["fast_stats"] / one["fast"] - 1,
            "cpu_stats_cost_hash_exact": mcpu["hash_exact_stats"] / mcpu["hash_exact"] - 1,
            "cpu_stats_cost_hash_fast": mcpu["hash_fast_stats"] / mcpu["hash_fast"] - 1,
            "cpu_stats_cost_dedup_exact": mcpu["dedup_exact_stats"] / mcpu["dedup_exact_nostats"] - 1,
            "cpu_stats_cost_dedup_fast": mcpu["dedup_fast_stats"] / mcpu["dedup_fast_nostats"] - 1,
            "cpu_fast_share_of_floor": mcpu["floor_turbojpeg_1_8"] / mcpu["hash_fast"],
            "cpu_fast_stats_share_of_floor": mcpu["floor_turbojpeg_1_8"] / mcpu["hash_fast_stats"],
            "stats_cost_hash_exact": med["hash_exact_stats"] / med["hash_exact"] - 1,
            "stats_cost_hash_fast": med["hash_fast_stats"] / med["hash_fast"] - 1,
            "stats_cost_dedup_exact": med["dedup_exact_stats"] / med["dedup_exact_nostats"] - 1,
            "stats_cost_dedup_fast": med["dedup_fast_stats"] / med["dedup_fast_nostats"] - 1,
            "fast_share_of_floor": floor / med["hash_fast"],
            "fast_stats_share_of_floor": floor / med["hash_fast_stats"]}  # fmt: skip


#: (name, numerator, denominator) of the ratios taken within each round: statistics' cost
#: (t_with / t_without − 1) and the fast mode's share of its floor (t_floor / t_hw).
PAIRS = [("stats_cost_hash_exact", "hash_exact_stats", "hash_exact"),
         ("stats_cost_hash_fast", "hash_fast_stats", "hash_fast"),
         ("stats_cost_dedup_exact", "dedup_exact_stats", "dedup_exact_nostats"),
         ("stats_cost_dedup_fast", "dedup_fast_stats", "dedup_fast_nostats"),
         ("fast_share_of_floor", "floor_turbojpeg_1_8", "hash_fast"),
         ("fast_stats_share_of_floor", "floor_turbojpeg_1_8", "hash_fast_stats"),
         ("dedup_fast_share_of_floor", "floor_turbojpeg_1_8", "dedup_fast_nostats"),
         ("dedup_fast_stats_share_of_floor", "floor_turbojpeg_1_8", "dedup_fast_stats")]  # fmt: skip


def _per_round(t: dict[str, list[float]], a: str, b: str, cost: bool) -> dict:
    """The ratio a/b in each round (minus 1 for a cost): its median, min, max and every value."""
    v = [x / y - (1 if cost else 0) for x, y in zip(t[a], t[b], strict=True)]
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "all": v}


def stats_cpu_per_image(strs: list[str], n: int = 400, repeats: int = 4) -> dict[str, float]:
    """CPU milliseconds per image of the Rust hashing call on one thread, the minimum of
    `repeats` interleaved runs: the statistics' own cost with the least noise from other jobs."""
    part = strs[:n]
    _rust.perceptual_hashes(part[:8], threads=1)
    kws = {"fast": dict(fast_min_side=dd.FAST_MIN_SIDE), "fast_stats": dict(fast_min_side=dd.FAST_MIN_SIDE, stats=True),
           "exact": {}, "exact_stats": dict(stats=True)}  # fmt: skip
    t: dict[str, list[float]] = {k: [] for k in kws}
    for _ in range(repeats):
        for k, kw in kws.items():
            c = time.process_time()
            _rust.perceptual_hashes(part, threads=1, **kw)
            t[k].append((time.process_time() - c) / len(part) * 1000)
    return {k: float(min(v)) for k, v in t.items()}


def _timed(f) -> float:  # noqa: ANN001
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def stats_markdown(s: dict) -> str:
    m = s["median_s"]
    rows = [("libjpeg-turbo 1/8-scale decode, all cores (the floor)", "floor_turbojpeg_1_8"),
            ("hw hashing, fast mode", "hash_fast"), ("hw hashing + statistics, fast mode", "hash_fast_stats"),
            ("hw hashing, exact mode", "hash_exact"), ("hw hashing + statistics, exact mode", "hash_exact_stats"),
            ("`hw dedup --no-stats` (exact)", "dedup_exact_nostats"), ("`hw dedup` (exact, statistics)", "dedup_exact_stats"),
            ("`hw dedup --hash-mode fast --no-stats`", "dedup_fast_nostats"),
            ("`hw dedup --hash-mode fast` (statistics)", "dedup_fast_stats")]  # fmt: skip
    out = [f"### Quality statistics: cost, and the fast mode against its floor ({s['photos']} photos, "
           f"{s['threads']} threads, median of {s['rounds']} interleaved rounds)", "",
           "| run | wall s | CPU s (all threads) |", "|---|---|---|"]  # fmt: skip
    out += [f"| {label} | {m[k]:.3f} | {s['median_cpu_s'][k]:.3f} |" for label, k in rows]
    out += ["", f"- statistics cost: hashing exact {100 * s['stats_cost_hash_exact']:+.1f}%, fast "
                f"{100 * s['stats_cost_hash_fast']:+.1f}%; whole `hw dedup` exact {100 * s['stats_cost_dedup_exact']:+.1f}%, "
                f"fast {100 * s['stats_cost_dedup_fast']:+.1f}%",
            f"- fast mode reaches {100 * s['fast_share_of_floor']:.0f}% of the floor without statistics, "
            f"{100 * s['fast_stats_share_of_floor']:.0f}% with them (floor time / hw time)",
            f"- in CPU seconds (less sensitive to other jobs on the machine): statistics cost hashing exact "
            f"{100 * s['cpu_stats_cost_hash_exact']:+.1f}%, fast {100 * s['cpu_stats_cost_hash_fast']:+.1f}%; whole `hw dedup` "
            f"exact {100 * s['cpu_stats_cost_dedup_exact']:+.1f}%, fast {100 * s['cpu_stats_cost_dedup_fast']:+.1f}%; fast mode "
            f"{100 * s['cpu_fast_share_of_floor']:.0f}% of the floor without statistics, "
            f"{100 * s['cpu_fast_stats_share_of_floor']:.0f}% with them",
            f"- per round (each ratio taken within one round, so load shifts between rounds cancel): "
            + "; ".join(f"{k.replace('_', ' ')} {_fmt_ratio(k, v)}" for k, v in s["per_round"].items()),
            f"- the same per round in CPU seconds: "
            + "; ".join(f"{k.replace('_', ' ')} {_fmt_ratio(k, v)}" for k, v in s["per_round_cpu"].items()),
            f"- load average (1 min) during the rounds: median {s['load_1min']['median']:.1f}, "
            f"range {s['load_1min']['min']:.1f}–{s['load_1min']['max']:.1f} on {os.cpu_count()} cores",
            f"- one thread, CPU ms per image (min of 4): exact {s['one_thread_cpu_ms_per_image']['exact']:.2f} → "
            f"{s['one_thread_cpu_ms_per_image']['exact_stats']:.2f} with statistics "
            f"({100 * s['one_thread_stats_cost_exact']:+.1f}%), fast {s['one_thread_cpu_ms_per_image']['fast']:.2f} → "
            f"{s['one_thread_cpu_ms_per_image']['fast_stats']:.2f} ({100 * s['one_thread_stats_cost_fast']:+.1f}%)"]  # fmt: skip
    return "\n".join(out) + "\n"


def _fmt_ratio(name: str, v: dict) -> str:
    if name.startswith("stats_cost"):
        return f"{100 * v['median']:+.1f}% [{100 * v['min']:+.1f}…{100 * v['max']:+.1f}]"
    return f"{100 * v['median']:.0f}% [{100 * v['min']:.0f}…{100 * v['max']:.0f}]"


def bench_search(n: int, peer_n: int, skip_peer: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    n_pairs = 10_000
    idx = 2 * rng.choice(n // 2, size=n_pairs, replace=False)
    for k, a in enumerate(idx):
        d = 1 + k % 8
        bits = rng.choice(64, size=d, replace=False).astype(np.uint64)
        h[a + 1] = h[a] ^ np.bitwise_or.reduce(np.uint64(1) << bits)
    t = time.perf_counter()
    i, j, d = _rust.hamming_pairs(h, 8)
    el = time.perf_counter() - t
    found = set(zip(i.tolist(), j.tolist()))
    missed = sum((int(a), int(a) + 1) not in found for a in idx)
    res = {"n": n, "threshold": 8, "planted_pairs": n_pairs, "planted_missed": missed, "pairs_found": int(len(i)),
           "hw_mih_s": el}  # fmt: skip
    # brute force (Rust, parallel) on a subset as a correctness and speed reference
    sub = h[:100_000]
    t = time.perf_counter()
    bi, bj, _ = _rust.hamming_pairs(sub, 8, brute_force=True)
    res["hw_bruteforce_100k_s"] = time.perf_counter() - t
    t = time.perf_counter()
    mi, mj, _ = _rust.hamming_pairs(sub, 8)
    res["hw_mih_100k_s"] = time.perf_counter() - t
    res["mih_equals_bruteforce_100k"] = bool(np.array_equal(bi, mi) and np.array_equal(bj, mj))
    if not skip_peer:
        from imagededup.methods import PHash

        m = {f"f{k}": f"{int(v):016x}" for k, v in enumerate(h[:peer_n])}
        t = time.perf_counter()
        dup = PHash(verbose=False).find_duplicates(encoding_map=m, max_distance_threshold=8)
        res["imagededup_n"] = peer_n
        res["imagededup_s"] = time.perf_counter() - t
        res["imagededup_pairs"] = sum(len(v) for v in dup.values()) // 2
        t = time.perf_counter()
        pi, _, _ = _rust.hamming_pairs(h[:peer_n], 8)
        res["hw_same_n_s"] = time.perf_counter() - t
        res["hw_same_n_pairs"] = int(len(pi))
        res["speedup_same_n"] = res["imagededup_s"] / res["hw_same_n_s"]
    return res


def make_quality_set(folder: Path, seed: int = 1) -> tuple[list[Path], list[int]]:
    """(paths, base id per path): distinct tiles and their variants."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, base = [], []
    bid = 0
    for name, a in source_photos():
        h, w = a.shape[:2]
        s = 320 if min(h, w) >= 320 else min(h, w)
        for y in range(0, h - s + 1, s):
            for x in range(0, w - s + 1, s):
                tile = a[y : y + s, x : x + s]
                if tile.std() < 25:  # skip nearly flat tiles (black retina corners, sky)
                    continue
                im = Image.fromarray(tile)
                variants = {
                    "orig.png": im,
                    "resize.png": im.resize((int(s * 0.6), int(s * 0.6)), Image.Resampling.BILINEAR),
                    "jpeg40.jpg": im,
                    "crop.png": im.crop((int(s * 0.06), int(s * 0.06), s - int(s * 0.06), s - int(s * 0.06))),
                    "bright.png": ImageEnhance.Brightness(im).enhance(1.0 + 25 / 128),
                }
                for vn, vim in variants.items():
                    p = folder / f"{name}_{x}_{y}_{vn}"
                    if not p.exists():
                        vim.save(p, quality=40) if vn.endswith(".jpg") else vim.save(p)
                    paths.append(p)
                    base.append(bid)
                bid += 1
    _ = rng
    return paths, base


def pr_at(hashes: np.ndarray, base: list[int], thresholds: list[int]) -> dict[int, dict]:
    b = np.array(base)
    truth = {(i, j) for i, j in combinations(range(len(b)), 2) if b[i] == b[j]}
    i, j, d = _rust.hamming_pairs(hashes.astype(np.uint64), max(thresholds), brute_force=True)
    out = {}
    for t in thresholds:
        pred = {(a, c) for a, c, x in zip(i.tolist(), j.tolist(), d.tolist(), strict=True) if x <= t}
        tp = len(pred & truth)
        out[t] = {"precision": tp / len(pred) if pred else 1.0, "recall": tp / len(truth), "pairs": len(pred)}
        p, r = out[t]["precision"], out[t]["recall"]
        out[t]["f1"] = 2 * p * r / (p + r) if p + r else 0.0
    return out


def bench_quality(folder: Path) -> dict:
    paths, base = make_quality_set(folder)
    strs = [str(p) for p in paths]
    thresholds = list(range(2, 17, 2)) + [10, 12]
    thresholds = sorted(set(thresholds))
    res: dict = {"images": len(paths), "distinct_bases": len(set(base)),
                 "true_pairs": sum(1 for i, j in combinations(range(len(base)), 2) if base[i] == base[j])}  # fmt: skip
    for name, fast in (("hw_phash_exact", None), ("hw_phash_fast128", 128)):
        r = _rust.perceptual_hashes(strs, fast_min_side=fast)
        res[name] = pr_at(r["phash"], base, thresholds)
    from imagededup.methods import PHash

    ph = PHash(verbose=False)
    hx = np.array([int(ph.encode_image(image_file=p), 16) for p in strs], dtype=np.uint64)
    res["imagededup_phash"] = pr_at(hx, base, thresholds)
    # recall of (original, variant) pairs per transformation at the default threshold
    exact = _rust.perceptual_hashes(strs)["phash"].astype(np.uint64)
    orig = {b: k for k, (p, b) in enumerate(zip(paths, base, strict=True)) if p.name.endswith("_orig.png")}
    per: dict[str, dict[str, float]] = {}
    for label, hs in (("hw_exact", exact), ("imagededup", hx)):
        for k, (p, b) in enumerate(zip(paths, base, strict=True)):
            v = p.name.rsplit("_", 1)[1].split(".")[0]
            if v == "orig":
                continue
            d = int(dd.popcount64(np.array([hs[k] ^ hs[orig[b]]], np.uint64))[0])
            per.setdefault(f"{label}:{v}", {"n": 0, "found": 0, "dist_sum": 0})
            per[f"{label}:{v}"]["n"] += 1
            per[f"{label}:{v}"]["found"] += d <= dd.DEFAULT_THRESHOLD
            per[f"{label}:{v}"]["dist_sum"] += d
    res["per_variant_at_default"] = {k: {"recall": v["found"] / v["n"], "mean_distance": v["dist_sum"] / v["n"]}
                                     for k, v in per.items()}  # fmt: skip
    return res


def to_markdown(r: dict) -> str:
    h, s, q = r["hashing"], r["search"], r["quality"]
    lines = ["# hw dedup benchmark", "", f"Machine: {os.cpu_count()} cores. {r['date']}.", "",
             f"## Hashing ({h['photos']} JPEG photos of ~1 MP, e.g. {h['example_size'][0]}×{h['example_size'][1]})", "",
             "| tool | seconds | images/s | vs imagehash |", "|---|---|---|---|",
             f"| `imagehash.phash` loop (Pillow decode) | {h['imagehash_phash_loop_s']:.2f} | {h['photos'] / h['imagehash_phash_loop_s']:.0f} | 1.0× |"]  # fmt: skip
    for k, label in (("exact", "hw exact (phash+dhash)"), ("fast256", "hw fast, min side 256"),
                     ("fast128", "hw fast, min side 128 (default fast)"), ("fast64", "hw fast, min side 64")):  # fmt: skip
        for suffix, tl in (("", "all cores"), ("_1thread", "1 thread")):
            sec = h[f"hw_{k}{suffix}_s"]
            lines.append(f"| {label}, {tl} | {sec:.2f} | {h['photos'] / sec:.0f} | {h['imagehash_phash_loop_s'] / sec:.1f}× |")
    lines += ["", f"Exact mode identical to imagehash: {h['exact_identical_to_imagehash']:.1%} of photos.", "",
              "| fast mode | identical to exact | mean bits | p99 bits | max bits |", "|---|---|---|---|---|"]  # fmt: skip
    for k in ("fast256", "fast128", "fast64"):
        a = h[f"{k}_agreement"]
        lines.append(f"| {k} | {a['identical_share']:.1%} | {a['mean_bits']:.2f} | {a['p99_bits']:.0f} | {a['max_bits']} |")
    lines += ["", f"## Search ({s['n']:,} random hashes, {s['planted_pairs']:,} planted pairs at distance 1–8, threshold 8)", "",
              f"- hw multi-index hashing: {s['hw_mih_s']:.2f} s, planted pairs missed: {s['planted_missed']}, pairs found {s['pairs_found']:,}",
              f"- on 100,000: hw MIH {s['hw_mih_100k_s']:.3f} s vs hw brute force (Rust, parallel) {s['hw_bruteforce_100k_s']:.2f} s; identical results: {s['mih_equals_bruteforce_100k']}"]  # fmt: skip
    if "imagededup_s" in s:
        lines.append(f"- imagededup `find_duplicates` on {s['imagededup_n']:,}: {s['imagededup_s']:.1f} s "
                     f"({s['imagededup_pairs']:,} pairs) vs hw {s['hw_same_n_s']:.3f} s ({s['hw_same_n_pairs']:,} pairs): "
                     f"{s['speedup_same_n']:.0f}×")  # fmt: skip
    lines += ["", f"## Quality ({q['images']} images: {q['distinct_bases']} distinct photo tiles × 5 variants; "
              f"{q['true_pairs']} true pairs)", "", "| threshold | hw exact P / R / F1 | hw fast128 P / R / F1 | imagededup PHash P / R / F1 |",
              "|---|---|---|---|"]  # fmt: skip
    for t in sorted(q["hw_phash_exact"], key=int):
        cells = []
        for k in ("hw_phash_exact", "hw_phash_fast128", "imagededup_phash"):
            m = q[k][t]
            cells.append(f"{m['precision']:.3f} / {m['recall']:.3f} / {m['f1']:.3f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", f"Original ↔ variant pairs at the default threshold {dd.DEFAULT_THRESHOLD}:", "",
              "| variant | hw exact recall | mean distance | imagededup recall | mean distance |", "|---|---|---|---|---|"]  # fmt: skip
    pv = q["per_variant_at_default"]
    for v in ("resize", "jpeg40", "crop", "bright"):
        a, b = pv[f"hw_exact:{v}"], pv[f"imagededup:{v}"]
        lines.append(f"| {v} | {a['recall']:.2f} | {a['mean_distance']:.1f} | {b['recall']:.2f} | {b['mean_distance']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--n-photos", type=int, default=1000)
    ap.add_argument("--search-n", type=int, default=1_000_000)
    ap.add_argument("--peer-search-n", type=int, default=100_000)
    ap.add_argument("--skip-peer-search", action="store_true")
    ap.add_argument("--only-quality", action="store_true", help="Re-run the quality part only (reuses OUT/dedup.json).")
    ap.add_argument("--only-stats", action="store_true", help="Run only the statistics-cost / floor part (OUT/dedup_stats.md).")
    ap.add_argument("--rounds", type=int, default=5, help="Interleaved rounds of the statistics-cost part.")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / "dedup_work"
    r: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.only_quality:
        r = json.loads((a.out / "dedup.json").read_text())
        r["quality"] = bench_quality(work / "quality")
        (a.out / "dedup.json").write_text(json.dumps(r, indent=1, default=str))
        (a.out / "dedup.md").write_text(to_markdown(r))
        print(to_markdown(r))
        return
    t = time.perf_counter()
    photos = make_photos(work / "photos", a.n_photos)
    print(f"corpus ready ({time.perf_counter() - t:.0f}s)", flush=True)
    r["stats_cost"] = bench_stats_cost(photos, work, a.rounds)
    (a.out / "dedup_stats.json").write_text(json.dumps(r["stats_cost"], indent=1))
    (a.out / "dedup_stats.md").write_text(stats_markdown(r["stats_cost"]))
    print(stats_markdown(r["stats_cost"]), flush=True)
    if a.only_stats:
        return
    r["hashing"] = bench_hashing(photos)
    print(json.dumps(r["hashing"], indent=1), flush=True)
    r["search"] = bench_search(a.search_n, a.peer_search_n, a.skip_peer_search)
    print(json.dumps(r["search"], indent=1), flush=True)
    r["quality"] = bench_quality(work / "quality")
    (a.out / "dedup.json").write_text(json.dumps(r, indent=1, default=str))
    md = to_markdown(r)
    (a.out / "dedup.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
