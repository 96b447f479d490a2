"""Benchmark `hw bucket` against the tools trainers use today, in one run on one corpus.

    python bench/bench_bucket.py [--corpus bench/out/corpus] [--n 20000] [--repeat 3]

Makes the corpus (bench/make_corpus.py) if it is missing, reads every file once untimed so the
page cache is warm, then times on the same files:

  * `hw bucket DIR --out X --overwrite --json --no-hash` and the same with hashing, as a
    subprocess (wall time: Python start-up, walk, probe, bucket, Parquet write), default threads
    (one per core) and --threads 1;
  * (a) a single-process Pillow loop reading headers + EXIF orientation (no pixel decode), and the
    literal trainer way ImageOps.exif_transpose(im).size on a subset (it decodes), extrapolated;
  * (b) imagesize.get() loops;
  * equal work: the baselines also hashing every file's bytes with xxh3-128 (the same hash hw
    stores; the hex digests are compared) next to hw with hashing;
  * re-bucketing a synthetic 1,000,000-row manifest (no file I/O): the CLI end to end and the
    in-process pycore.curation.assign.assign call.

Sizes are compared file by file (hw vs Pillow after EXIF orientation, hw's stored size vs
imagesize, both vs the corpus's recorded truth); any mismatch is counted and listed.
Results: a markdown table on stdout and in bench/out/bucket.md, all figures in bench/out/bucket.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import make_corpus  # noqa: E402

ORIENT_TAG = 0x0112
SWAP = (5, 6, 7, 8)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Hashing for the equal-work baselines


def pick_hasher() -> tuple[str, Callable[[bytes], str]]:
    """xxh3-128 (what hw stores) when the xxhash package is there, else BLAKE2b."""
    try:
        import xxhash

        return "xxh3-128 (xxhash " + xxhash.VERSION + ")", xxhash.xxh3_128_hexdigest
    except ImportError:
        import hashlib

        return "blake2b (hashlib; install xxhash for hw's own xxh3-128)", lambda b: hashlib.blake2b(b).hexdigest()


# --------------------------------------------------------------------------------------------
# The baselines. Each takes a list of paths and returns a list of (width, height[, hash]).


def pil_lazy_size(src, Image, tiff_oriented: bool) -> tuple[int, int]:
    """Displayed size with Pillow reading only headers and EXIF (no pixel decode)."""
    with Image.open(src) as im:
        w, h = im.size
        if im.format == "PNG":
            # im.getexif() on a PNG decodes the whole image to look for a late eXIf chunk; the
            # chunks before IDAT (where writers put eXIf) are already parsed into im.info.
            raw = im.info.get("exif")
            o = None
            if raw:
                ex = Image.Exif()
                ex.load(raw)
                o = ex.get(ORIENT_TAG)
        else:
            o = im.getexif().get(ORIENT_TAG)
        if o in SWAP and not (im.format == "TIFF" and tiff_oriented):
            w, h = h, w
    return w, h


def run_pil_lazy(paths: list[str], hasher=None) -> list:
    from PIL import Image

    tiff_oriented = make_corpus.pil_tiff_size_is_oriented()
    out = []
    if hasher is None:
        for p in paths:
            out.append(pil_lazy_size(p, Image, tiff_oriented))
    else:
        for p in paths:
            with open(p, "rb") as f:
                data = f.read()
            out.append((*pil_lazy_size(io.BytesIO(data), Image, tiff_oriented), hasher(data)))
    return out


def run_pil_literal(paths: list[str]) -> list:
    """The snippet as people write it: im.getexif() for every format (decodes PNG pixels)."""
    from PIL import Image

    tiff_oriented = make_corpus.pil_tiff_size_is_oriented()
    out = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
            o = im.getexif().get(ORIENT_TAG)
            if o in SWAP and not (im.format == "TIFF" and tiff_oriented):
                w, h = h, w
        out.append((w, h))
    return out


def run_pil_transpose(paths: list[str]) -> list:
    """The trainer way: decode, apply EXIF orientation, take the size."""
    from PIL import Image, ImageOps

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(ImageOps.exif_transpose(im).size)
    return out


def imagesize_has_rotation() -> bool:
    import inspect

    import imagesize

    return "exif_rotation" in inspect.signature(imagesize.get).parameters


def run_imagesize(paths: list[str], hasher=None, rotation: bool = False) -> list:
    import imagesize

    kw = {"exif_rotation": rotation} if imagesize_has_rotation() else {}
    get = imagesize.get
    out = []
    if hasher is None:
        for p in paths:
            out.append(get(p, **kw))
    else:
        for p in paths:
            with open(p, "rb") as f:
                data = f.read()
            out.append((*get(io.BytesIO(data), **kw), hasher(data)))
    return out


# The baselines as whole scripts (what a user runs instead of `hw bucket`): interpreter start-up,
# import, walk the folder for image extensions, loop, write the sizes as JSON. Run with `python -c`.
BASELINE_SCRIPT = r"""
import io, json, os, sys
root, out, kind, exts = sys.argv[1], sys.argv[2], sys.argv[3], set(sys.argv[4].split(","))
paths = []
for dirpath, dirs, files in os.walk(root):
    dirs.sort()
    paths += [os.path.join(dirpath, f) for f in sorted(files) if os.path.splitext(f)[1][1:].lower() in exts]
sizes = {}
if kind == "imagesize":
    import inspect, imagesize
    kw = {"exif_rotation": False} if "exif_rotation" in inspect.signature(imagesize.get).parameters else {}
    for p in paths:
        sizes[p] = imagesize.get(p, **kw)
else:
    from PIL import Image, TiffImagePlugin
    ifd = TiffImagePlugin.ImageFileDirectory_v2(); ifd[274] = 6; buf = io.BytesIO()
    Image.new("L", (2, 1)).save(buf, "TIFF", tiffinfo=ifd)
    tiff_oriented = Image.open(io.BytesIO(buf.getvalue())).size == (1, 2)
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
            if im.format == "PNG":
                raw, o = im.info.get("exif"), None
                if raw:
                    ex = Image.Exif(); ex.load(raw); o = ex.get(0x0112)
            else:
                o = im.getexif().get(0x0112)
            if o in (5, 6, 7, 8) and not (im.format == "TIFF" and tiff_oriented):
                w, h = h, w
        sizes[p] = (w, h)
with open(out, "w") as f:
    json.dump(sizes, f)
"""


def run_baseline_script(kind: str, root: str, out: str, exts: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, root, out, kind, exts], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench: the {kind} baseline script failed:\n{p.stderr[-3000:]}")
    return wall


# --------------------------------------------------------------------------------------------
# hw


def hw_command(arg: str | None) -> list[str]:
    if arg:
        return shlex.split(arg)
    exe = Path(sys.executable).parent / "hw"
    hw = str(exe) if exe.exists() else shutil.which("hw")
    if not hw:
        sys.exit("bench: the `hw` command is not installed in this environment (run scripts/setup.sh)")
    return [hw, "bucket"]


def run_hw(cmd: list[str], src: str, out: str, *extra: str, env: dict) -> tuple[float, dict]:
    argv = [*cmd, src, "--out", out, "--overwrite", "--json", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench: {shlex.join(argv)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return wall, json.loads(p.stdout)


# --------------------------------------------------------------------------------------------
# Timing helpers


def timed(fn: Callable[[], object], repeat: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all cores busy (from /proc/stat) over a short window; 0 when unknown."""

    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t1, i1 = snap()
        time.sleep(seconds)
        t2, i2 = snap()
    except OSError:
        return 0.0
    return 1 - (i2 - i1) / max(1, t2 - t1)


def machine_info(corpus: str) -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    fs = ""
    try:
        fs = subprocess.run(["df", "-T", corpus], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    except (OSError, IndexError):
        pass
    versions = {"python": platform.python_version()}
    for mod in ("PIL", "imagesize", "xxhash", "polars", "numpy"):
        try:
            m = __import__(mod)
            versions[mod if mod != "PIL" else "pillow"] = getattr(m, "__version__", getattr(m, "VERSION", "?"))
        except ImportError:
            versions[mod] = None
    rev = "unknown"
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        rev = r.stdout.strip() or "no commit yet"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "corpus_filesystem": fs,
        "versions": versions,
        "git": rev,
    }


# --------------------------------------------------------------------------------------------
# The re-bucketing manifest


def make_rebucket_manifest(path: Path, rows: int, seed: int) -> None:
    import polars as pl

    from pycore.manifest import write_manifest

    rng = np.random.default_rng([seed, 7])
    common = np.array(make_corpus.COMMON_ASPECTS)
    aspect = np.where(rng.random(rows) < 0.6, rng.choice(common, rows), np.exp(rng.uniform(np.log(0.4), np.log(2.5), rows)))
    aspect = np.where((aspect != 1.0) & (rng.random(rows) < 0.45), 1 / aspect, aspect)
    short = np.exp(rng.uniform(np.log(256), np.log(2048), rows)).round()
    w = np.where(aspect >= 1, short * aspect, short).round().astype(np.int32)
    h = np.where(aspect >= 1, short, short / aspect).round().astype(np.int32)
    bad = rng.random(rows) < 0.005
    idx = np.arange(rows)
    fmt = rng.choice(np.array(["jpeg", "png", "webp", "gif", "bmp", "tiff"]), rows, p=[0.5, 0.2, 0.14, 0.05, 0.04, 0.07])
    frame = pl.DataFrame({"i": idx, "format": fmt}).select(
        (pl.lit("/data/sdxl/set") + (pl.col("i") // 1000).cast(pl.String).str.zfill(4) + pl.lit("/img_")
         + pl.col("i").cast(pl.String).str.zfill(7) + pl.lit(".") + pl.col("format")).alias("path"),
        pl.Series("status", np.where(bad, "not_image", "ok")),
        pl.Series("format", np.where(bad, None, fmt)),
        pl.Series("width", np.where(bad, 0, w)).cast(pl.Int32),
        pl.Series("height", np.where(bad, 0, h)).cast(pl.Int32),
        pl.Series("orientation", np.where(rng.random(rows) < 0.08, 6, 1)).cast(pl.UInt8),
        pl.Series("file_size", (w.astype(np.int64) * h * rng.uniform(0.1, 1.5, rows)).astype(np.int64)),
    ).with_columns(
        pl.when(pl.col("status") == "ok").then(pl.col("width")).alias("width"),
        pl.when(pl.col("status") == "ok").then(pl.col("height")).alias("height"),
    )
    write_manifest(frame, path, metadata={"root": "/data/sdxl", "source": "bench synthetic"}, overwrite=True)


# --------------------------------------------------------------------------------------------
# Checking sizes


def compare(name: str, got: list, want: list, variants: list[str], paths: list[str]) -> dict:
    bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if tuple(g) != tuple(w)]
    by_variant = Counter(variants[i] for i in bad)
    return {
        "what": name,
        "compared": len(got),
        "mismatches": len(bad),
        "by_variant": dict(by_variant),
        "examples": [{"path": paths[i], "variant": variants[i], "got": list(got[i]), "want": list(want[i])} for i in bad[:8]],
    }


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(HERE / "out" / "corpus"), help="corpus folder (made if missing)")
    ap.add_argument("--n", type=int, default=20000, help="images in the corpus (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--templates", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per full-corpus row; the best is reported")
    ap.add_argument("--subset", type=int, default=1000, help="files for the pixel-decoding rows (extrapolated)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the re-bucketing manifest")
    ap.add_argument("--out", default=str(HERE / "out"), help="where bucket.json / bucket.md go")
    ap.add_argument("--wait-idle", type=float, default=120, metavar="S",
                    help="wait up to S seconds for other load on the machine to settle before timing (default 120)")
    ap.add_argument("--hw-cmd", default=None, help="command that runs `hw bucket` (default: <venv>/bin/hw bucket)")
    args = ap.parse_args(argv)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    # ---- corpus
    meta = make_corpus.make_corpus(args.corpus, args.n, args.seed, args.templates, log=log)
    root = os.path.abspath(args.corpus)
    images = os.path.join(root, "images")
    truth_rows = list(csv.DictReader(open(os.path.join(root, "truth.csv"))))
    paths = [os.path.join(root, r["path"]) for r in truth_rows]
    variants = [r["variant"] for r in truth_rows]
    n = len(paths)
    truth_disp = [(int(r["width"]), int(r["height"])) for r in truth_rows]
    truth_stored = [(int(r["stored_width"]), int(r["stored_height"])) for r in truth_rows]

    # ---- warm-up: one untimed read of every file (and the captions, which hw's walk lists)
    t0 = time.perf_counter()
    nbytes = 0
    for dirpath, _dirs, files in os.walk(images):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while chunk := fh.read(1 << 20):
                    nbytes += len(chunk)
    os.sync()  # no write-back of the fresh corpus competing with the timed runs (hw fsyncs its output)
    t_warm = time.perf_counter() - t0
    log(f"\nwarm-up: read all {nbytes / 1e9:.2f} GB once and synced (untimed, {t_warm:.1f} s) so every row "
        "runs on a warm page cache")  # fmt: skip
    busy = cpu_busy()
    waited = 0.0
    quiet = 0
    while args.wait_idle > waited and quiet < 3:
        quiet = quiet + 1 if busy <= 0.15 else 0
        if quiet < 3:
            busy = cpu_busy()
            waited += 2
    log(f"other load on the machine before timing: {busy:.0%} of all cores busy over 2 s"
        + (f" (after waiting {waited:.0f} s for it to settle)" if waited else ""))  # fmt: skip
    if busy > 0.15:
        log("  warning: the machine is not idle; timings will be noisy (see loadavg and cpu_seconds in bucket.json)")

    hash_name, hasher = pick_hasher()
    hash_short = hash_name.split(" (")[0]
    log(f"content hash for the equal-work baselines: {hash_name}")
    cmd = hw_command(args.hw_cmd)
    env = {k: v for k, v in os.environ.items() if k != "HW_THREADS"}
    cores = os.cpu_count() or 1
    rows: list[dict] = []

    def add(key, tool, work_desc, times, files, *, hashing, extrapolated_from=None, internal=None, cpu=None):
        sec = min(times)  # best of N: the machine may be shared; every row gets the same treatment
        scale = files / extrapolated_from if extrapolated_from else 1.0
        rows.append({
            "key": key, "tool": tool, "work": work_desc, "files": files, "seconds": sec * scale,
            "files_per_s": files / (sec * scale), "runs": [round(t, 4) for t in times],
            "median_seconds": statistics.median(times) * scale, "hashing": hashing,
            "extrapolated_from": extrapolated_from, "internal_seconds": internal,
            "cpu_seconds": [round(c, 4) for c in cpu] if cpu else None,
        })  # fmt: skip
        extra = f" (from {extrapolated_from:,} files)" if extrapolated_from else ""
        log(f"  {tool:<52} {sec * scale:8.3f} s  {files / (sec * scale):>10,.0f} files/s{extra}")

    # ---- the full-corpus rows: hw (CLI and in-process), the loops, the scripts. They are run
    # round-robin (one run of each, N times over) so that load from elsewhere on the machine is
    # spread over all rows instead of landing on whichever row happened to run then.
    from pycore.curation.scan import IMAGE_EXTENSIONS, scan_folder

    exts = ",".join(IMAGE_EXTENSIONS)
    rot = imagesize_has_rotation()
    results: dict[str, object] = {}
    jobs: list[dict] = []

    def cli_job(key, label, extra, hashing):
        out = str(work / f"{key}.parquet")
        results[key] = out

        def fn():
            wall, rep = run_hw(cmd, images, out, *extra, env=env)
            if rep.get("total_rows") != n:
                log(f"  warning: hw found {rep.get('total_rows')} image files, the corpus has {n}")
            return wall, rep.get("seconds")

        jobs.append({"key": key, "label": label, "hashing": hashing, "fn": fn, "sub": True,
                     "work": "walk + headers + EXIF" + (" + hash" if hashing else "") + " + bucket + write Parquet"})  # fmt: skip

    def py_job(key, label, work_desc, hashing, call):
        def fn():
            t0 = time.perf_counter()
            results[key] = call()
            return time.perf_counter() - t0, None

        jobs.append({"key": key, "label": label, "hashing": hashing, "fn": fn, "sub": False, "work": work_desc})

    def script_job(key, kind, label, work_desc):
        out = str(work / f"{key}.json")
        results[key] = out
        jobs.append({"key": key, "label": label, "hashing": False, "sub": True, "work": work_desc,
                     "fn": lambda: (run_baseline_script(kind, images, out, exts), None)})  # fmt: skip

    cli_job("hw_nohash", f"hw bucket --no-hash ({cores} threads, default)", ["--no-hash"], False)
    cli_job("hw_nohash_t1", "hw bucket --no-hash --threads 1", ["--no-hash", "--threads", "1"], False)
    cli_job("hw_hash", f"hw bucket, hashing xxh3-128 ({cores} threads, default)", [], True)
    cli_job("hw_hash_t1", "hw bucket, hashing --threads 1", ["--threads", "1"], True)
    for key, label, hashing, threads in [
        ("hw_py_nohash", f"scan_folder(hash=False) ({cores} threads)", False, 0),
        ("hw_py_nohash_t1", "scan_folder(hash=False, threads=1)", False, 1),
        ("hw_py_hash", f"scan_folder(hash=True) ({cores} threads)", True, 0),
        ("hw_py_hash_t1", "scan_folder(hash=True, threads=1)", True, 1),
    ]:
        py_job(key, "hw " + label, "walk + headers + EXIF" + (" + hash" if hashing else "") + " (in-process)", hashing,
               lambda h=hashing, th=threads: scan_folder(images, hash=h, threads=th))  # fmt: skip
    py_job("pil_lazy", "(a) Pillow: open + .size + EXIF orientation", "headers + EXIF, no decode", False,
           lambda: run_pil_lazy(paths))  # fmt: skip
    py_job("pil_lazy_hash", "(a) Pillow + hash", f"read file, {hash_short}, headers + EXIF", True,
           lambda: run_pil_lazy(paths, hasher))  # fmt: skip
    py_job("imagesize", "(b) imagesize.get" + (" (exif_rotation=False)" if rot else ""), "headers only, no EXIF", False,
           lambda: run_imagesize(paths))  # fmt: skip
    py_job("imagesize_hash", "(b) imagesize + hash", f"read file, {hash_short}, headers", True,
           lambda: run_imagesize(paths, hasher))  # fmt: skip
    if rot:
        py_job("imagesize_rot", "(b) imagesize.get (default: EXIF rotation)", "headers + JPEG/TIFF EXIF orientation",
               False, lambda: run_imagesize(paths, rotation=True))  # fmt: skip
    script_job("imagesize_script", "imagesize", "(b) imagesize script, end to end",
               "python -c: start-up + walk + headers + write JSON")  # fmt: skip
    script_job("pil_script", "pil", "(a) Pillow script, end to end",
               "python -c: start-up + walk + headers + EXIF + write JSON")  # fmt: skip

    log(f"\nfull-corpus rows: {len(jobs)} rows × {args.repeat} rounds, round-robin, best run reported; "
        f"hw CLI = {shlex.join(cmd)} (wall time of the whole command); Python loops single-process")  # fmt: skip
    run_pil_lazy(paths[:200])  # untimed warm-ups: Pillow's plugins, imagesize, hw's imports and .pyc
    run_imagesize(paths[:200])
    scan_folder(images, hash=False, threads=0)
    for j in jobs:
        if j["sub"]:
            j["fn"]()
    timing = {j["key"]: {"wall": [], "internal": [], "cpu": []} for j in jobs}
    for r in range(args.repeat):
        for j in jobs:
            c0, ch0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, internal = j["fn"]()
            ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (ch1.ru_utime + ch1.ru_stime - ch0.ru_utime - ch0.ru_stime) if j["sub"] else time.process_time() - c0
            timing[j["key"]]["wall"].append(wall)
            timing[j["key"]]["internal"].append(internal)
            timing[j["key"]]["cpu"].append(cpu)
        log(f"  round {r + 1}/{args.repeat} done ({time.perf_counter() - t_start:.0f} s since start)")
    for j in jobs:
        t = timing[j["key"]]
        internals = [x for x in t["internal"] if x is not None]
        add(j["key"], j["label"], j["work"], t["wall"], n, hashing=j["hashing"], cpu=t["cpu"],
            internal=min(internals) if internals else None)  # fmt: skip
    for key in ("hw_py_nohash", "hw_py_hash"):
        if len(results[key].frame) != n:
            log(f"  warning: scan_folder found {len(results[key].frame)} image files, the corpus has {n}")
    hw_out = {k: results[k] for k in ("hw_nohash", "hw_nohash_t1", "hw_hash", "hw_hash_t1")}
    script_out = {k: results[k] for k in ("imagesize_script", "pil_script")}
    pil, pil_h, isz, isz_h = (results[k] for k in ("pil_lazy", "pil_lazy_hash", "imagesize", "imagesize_hash"))
    isz_rot = results.get("imagesize_rot")

    k = max(1, n // args.subset)
    sub_idx = list(range(0, n, k))[: args.subset]
    sub_paths = [paths[i] for i in sub_idx]
    log(f"\npixel-decoding rows on a {len(sub_idx):,}-file subset (every {k}th file), one run each, extrapolated to {n:,}")
    run_pil_transpose(sub_paths[:20])
    t, tr = timed(lambda: run_pil_transpose(sub_paths), 1)
    add("pil_transpose", "(a) Pillow: ImageOps.exif_transpose(im).size", "decode pixels + rotate (trainer way)",
        t, n, hashing=False, extrapolated_from=len(sub_idx))  # fmt: skip
    t, lit = timed(lambda: run_pil_literal(sub_paths), 1)
    add("pil_literal", "(a) Pillow: .size + im.getexif() on every format", "decodes PNG pixels for getexif()",
        t, n, hashing=False, extrapolated_from=len(sub_idx))  # fmt: skip

    # ---- correctness
    import polars as pl

    log("\nchecking sizes file by file")
    frames = {key: pl.read_parquet(p) for key, p in hw_out.items()}
    checks = []
    base = frames["hw_hash"]
    idx = {p: i for i, p in enumerate(base["path"].to_list())}
    missing = [p for p in paths if p not in idx]
    extra_rows = len(idx) - (n - len(missing))
    order = [idx.get(p) for p in paths]
    status = base["status"].to_list()
    ws, hs = base["width"].to_list(), base["height"].to_list()
    orients = base["orientation"].to_list()
    hashes = base["content_hash"].to_list()
    hw_disp = [(ws[i], hs[i]) if i is not None else (None, None) for i in order]
    hw_orient = [orients[i] if i is not None else None for i in order]
    hw_stored = [(h, w) if o in SWAP else (w, h) for (w, h), o in zip(hw_disp, hw_orient, strict=True)]
    not_ok = Counter(status[i] for i in order if i is not None and status[i] != "ok")
    checks.append({"what": "hw rows for corpus files", "compared": n, "mismatches": len(missing) + sum(not_ok.values()),
                   "missing": len(missing), "extra": extra_rows, "not_ok": dict(not_ok)})  # fmt: skip
    for key in ("hw_nohash", "hw_nohash_t1", "hw_hash_t1"):
        f = frames[key]
        same = f.select("path", "status", "width", "height", "orientation").equals(
            base.select("path", "status", "width", "height", "orientation"))  # fmt: skip
        checks.append({"what": f"{key} rows identical to hw_hash (path, status, sizes, orientation)",
                       "compared": len(f), "mismatches": 0 if same else len(f)})  # fmt: skip
    checks.append(compare("hw (displayed) vs corpus truth", hw_disp, truth_disp, variants, paths))
    checks.append(compare("(a) Pillow headers+EXIF vs hw (displayed)", pil, hw_disp, variants, paths))
    checks.append(compare("(a) Pillow + hash: sizes vs hw", [r[:2] for r in pil_h], hw_disp, variants, paths))
    hw_hash_list = [hashes[i] if i is not None else None for i in order]
    if hash_name.startswith("xxh3"):
        checks.append(compare("(a) Pillow + hash: xxh3-128 vs hw content_hash", [(r[2],) for r in pil_h],
                              [(x,) for x in hw_hash_list], variants, paths))  # fmt: skip
        checks.append(compare("(b) imagesize + hash: xxh3-128 vs hw content_hash", [(r[2],) for r in isz_h],
                              [(x,) for x in hw_hash_list], variants, paths))  # fmt: skip
    checks.append(compare("(a) exif_transpose subset vs hw (displayed)", tr, [hw_disp[i] for i in sub_idx],
                          [variants[i] for i in sub_idx], sub_paths))  # fmt: skip
    checks.append(compare("(a) literal getexif subset vs hw (displayed)", lit, [hw_disp[i] for i in sub_idx],
                          [variants[i] for i in sub_idx], sub_paths))  # fmt: skip
    checks.append(compare("(b) imagesize vs hw stored (unrotated) size", isz, hw_stored, variants, paths))
    checks.append(compare("(b) imagesize + hash: sizes vs hw stored", [r[:2] for r in isz_h], hw_stored, variants, paths))
    checks.append(compare("hw stored (unrotated) vs corpus truth", hw_stored, truth_stored, variants, paths))
    for key, want, what in (("pil_script", hw_disp, "(a) Pillow script vs hw (displayed)"),
                            ("imagesize_script", hw_stored, "(b) imagesize script vs hw stored (unrotated)")):  # fmt: skip
        got = json.load(open(script_out[key]))
        checks.append(compare(what, [tuple(got.get(p, (None, None))) for p in paths], want, variants, paths))
        if len(got) != n:
            checks[-1]["mismatches"] += abs(len(got) - n)
            checks[-1]["files_listed"] = len(got)
    if isz_rot is not None:
        c = compare("(b) imagesize with EXIF rotation vs hw (displayed)", isz_rot, hw_disp, variants, paths)
        if c["mismatches"]:
            c["note"] = "imagesize reads orientation from JPEG/TIFF/HEIF only; PNG eXIf and WebP EXIF rotations are missed"
        checks.append(c)
    for c in checks:
        flag = "ok " if c["mismatches"] == 0 else "MISMATCH"
        bv = f"  by variant: {c['by_variant']}" if c.get("by_variant") else ""
        log(f"  [{flag}] {c['what']}: {c['mismatches']} of {c['compared']:,}{bv}")

    # ---- re-bucketing a 1,000,000-row manifest
    log(f"\nre-bucketing a synthetic {args.rows:,}-row manifest (no file I/O)")
    m_in, m_out = work / "rebucket_in.parquet", work / "rebucket_out.parquet"
    t0 = time.perf_counter()
    make_rebucket_manifest(m_in, args.rows, args.seed)
    log(f"  built {m_in.name} ({m_in.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    from pycore.curation.assign import BucketOptions, assign, report
    from pycore.curation.tables import load_table
    from pycore.manifest import read_manifest, write_manifest

    table, opts = load_table("helloworld"), BucketOptions()
    frame = read_manifest(m_in, required=("path", "status", "width", "height"))
    assigned = assign(frame, table, opts)
    run_hw(cmd, str(m_in), str(m_out), env=env)  # untimed warm-ups
    steps = {
        "read_manifest": lambda: read_manifest(m_in, required=("path", "status", "width", "height")),
        "assign": lambda: assign(frame, table, opts),
        "report": lambda: report(assigned, table),
        "write_manifest": lambda: write_manifest(assigned, work / "rebucket_py.parquet", overwrite=True),
    }
    walls, internals, cpus = [], [], []
    step_times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeat):  # round-robin again: CLI run, then each in-process step
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, rep = run_hw(cmd, str(m_in), str(m_out), env=env)
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(wall)
        internals.append(rep.get("seconds"))
        cpus.append(ch1.ru_utime + ch1.ru_stime - ch0.ru_utime - ch0.ru_stime)
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            step_times[name].append(time.perf_counter() - t0)
    add("rebucket_cli", f"hw bucket M.parquet (re-bucket {args.rows:,} rows)",
        "Python start-up + read Parquet + assign + report + write Parquet", walls, args.rows,
        hashing=False, internal=min(internals), cpu=cpus)  # fmt: skip
    add("rebucket_assign", "pycore.curation.assign.assign (in-process)", "bucket assignment only", step_times["assign"],
        args.rows, hashing=False)  # fmt: skip
    breakdown = {k: min(v) for k, v in step_times.items()}
    log("  in-process breakdown: " + ", ".join(f"{k} {v:.3f} s" for k, v in breakdown.items()))
    n_ok = int((assigned["status"] == "ok").sum())
    log(f"  {n_ok:,} rows bucketed")

    # ---- results
    by = {r["key"]: r for r in rows}

    def ratio(base_key: str, hw_key: str) -> float:
        return by[base_key]["seconds"] / by[hw_key]["seconds"]

    # baseline -> the hw rows doing the same work: CLI default threads, CLI 1 thread,
    # in-process default threads, in-process 1 thread.
    no_hash = ("hw_nohash", "hw_nohash_t1", "hw_py_nohash", "hw_py_nohash_t1")
    with_hash = ("hw_hash", "hw_hash_t1", "hw_py_hash", "hw_py_hash_t1")
    pairs = {"pil_lazy": no_hash, "pil_lazy_hash": with_hash, "pil_transpose": no_hash, "pil_literal": no_hash,
             "imagesize": no_hash, "imagesize_rot": no_hash, "imagesize_hash": with_hash,
             "pil_script": no_hash, "imagesize_script": no_hash}  # fmt: skip
    for r in rows:
        if r["key"] in pairs:
            r["compared_with"] = list(pairs[r["key"]])
            r["hw_speedup"] = {hw_key: round(ratio(r["key"], hw_key), 2) for hw_key in pairs[r["key"]]}
    size_checks_ok = all(c["mismatches"] == 0 for c in checks if "imagesize with EXIF rotation" not in c["what"])
    targets = {}
    for where, sfx in (("`hw bucket` CLI, end to end", ""), ("in-process scan", "_py")):
        targets.update({
            f"{where}: >= 10x faster than (a) Pillow headers+EXIF (vs --no-hash)": ratio("pil_lazy", f"hw{sfx}_nohash") >= 10,
            f"{where}: >= 10x faster than (a) Pillow + hash (vs hashing)": ratio("pil_lazy_hash", f"hw{sfx}_hash") >= 10,
            f"{where}: faster than (b) imagesize (vs --no-hash)": ratio("imagesize", f"hw{sfx}_nohash") > 1,
            f"{where}: faster than (b) imagesize + hash (vs hashing)": ratio("imagesize_hash", f"hw{sfx}_hash") > 1,
        })  # fmt: skip
    targets.update({
        "`hw bucket` CLI vs the baseline scripts end to end: >= 10x faster than (a) Pillow": ratio("pil_script", "hw_nohash") >= 10,
        "`hw bucket` CLI vs the baseline scripts end to end: faster than (b) imagesize": ratio("imagesize_script", "hw_nohash") > 1,
    })  # fmt: skip
    targets["identical sizes (every check above, 0 mismatches)"] = size_checks_ok
    targets[f"re-bucket {args.rows:,} rows end to end (CLI) < 2 s"] = by["rebucket_cli"]["seconds"] < 2
    machine = machine_info(root)
    machine["loadavg_start"] = [round(x, 2) for x in load_start]
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["cpu_busy_before"] = round(busy, 3)
    result = {
        "corpus": {"dir": root, **meta},
        "warm_up": {"bytes": nbytes, "seconds": round(t_warm, 2)},
        "hash_for_baselines": hash_name,
        "hw_command": cmd,
        "repeat": args.repeat,
        "rows": rows,
        "rebucket_breakdown": breakdown,
        "checks": checks,
        "targets": targets,
        "machine": machine,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    md = render_markdown(result)
    (out_dir / "bucket.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "bucket.md").write_text(md)
    log("\n" + md)
    log(f"results → {out_dir / 'bucket.md'}, {out_dir / 'bucket.json'}  (bench took {result['seconds_total']} s)")
    return 0


def render_markdown(res: dict) -> str:
    m, c = res["machine"], res["corpus"]["stats"]
    by = {r["key"]: r for r in res["rows"]}
    n = c["files"]
    lines = [
        f"Corpus: {n:,} images ({', '.join(f'{k} {v:,}' for k, v in c['by_format'].items())}), "
        f"{c['total_bytes'] / 1e9:.2f} GB, {c['rotated_5_to_8']:,} with EXIF orientation 5–8, "
        f"{c['captions']:,} caption .txt files beside them, {c['folders']} folders. Warm page cache.",
        f"Machine: {m['cpu']}, {m['cores_usable']} cores, {m['memory_gb']} GB RAM, {m['os']}, "
        f"{m['corpus_filesystem']}; Python {m['versions']['python']}, Pillow {m['versions'].get('pillow')}, "
        f"imagesize {m['versions'].get('imagesize')}, xxhash {m['versions'].get('xxhash')}; "
        f"other load before timing {m['cpu_busy_before']:.0%} of the cores. hw at {m['git']}.",
        "",
        f"| tool | work | seconds | files/s | CPU s | hw CLI speed-up ({m['cores_usable']} threads / 1) "
        f"| hw in-process speed-up ({m['cores_usable']} threads / 1) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if r["key"].startswith("rebucket"):
            continue
        tool = r["tool"] + (" ¹" if r["extrapolated_from"] else "")
        if "hw_speedup" in r and r["key"].endswith("_script"):
            a, b = (r["hw_speedup"][k] for k in r["compared_with"][:2])
            sp = f"**{a:.1f}×** / {b:.1f}× | (n/a: end to end)"
        elif "hw_speedup" in r:
            a, b, c, d = (r["hw_speedup"][k] for k in r["compared_with"])
            sp = f"**{a:.1f}×** / {b:.1f}× | **{c:.1f}×** / {d:.1f}×"
        else:
            sp = "— | —"
        cpu = f"{min(r['cpu_seconds']):.2f}" if r.get("cpu_seconds") else "—"
        lines.append(f"| {tool} | {r['work']} | {r['seconds']:.2f} | {r['files_per_s']:,.0f} | {cpu} | {sp} |")
    lines += [
        "",
        "CPU s: the least CPU time (user + system, all threads) of the runs; next to the wall time it "
        "shows how much of a core each row used and how much it waited.",
        f"¹ Timed on a {by['pil_transpose']['extrapolated_from']:,}-file subset (every "
        f"{n // by['pil_transpose']['extrapolated_from']}th file) and extrapolated to {n:,} files.",
        f"`hw bucket` rows are the wall time of the whole command (best of {res['repeat']}): Python "
        f"start-up and imports, walk, probe, bucketing, Parquet write. `scan_folder` rows are the same scan "
        f"in-process, on the footing of the Python loops (imports done, nothing written; it still walks the "
        f"folder, the loops get a ready list of paths). Speed-ups compare equal work: no-hash baselines with "
        f"hw not hashing, hashing baselines ({res['hash_for_baselines'].split(' (')[0]}) with hw hashing.",
        "",
        "| re-bucketing (no file I/O) | seconds | rows/s |",
        "|---|---:|---:|",
    ]
    for key in ("rebucket_cli", "rebucket_assign"):
        r = by[key]
        lines.append(f"| {r['tool']}: {r['work']} | {r['seconds']:.2f} | {r['files_per_s']:,.0f} |")
    b = res["rebucket_breakdown"]
    lines += [
        "",
        "In-process breakdown: " + ", ".join(f"{k} {v:.2f} s" for k, v in b.items()) + ".",
        "",
        "| size / hash check | compared | mismatches |",
        "|---|---:|---:|",
    ]
    for ch in res["checks"]:
        note = f" ({ch['note']})" if ch.get("note") else ""
        bv = f" — {', '.join(f'{k} {v}' for k, v in ch['by_variant'].items())}" if ch.get("by_variant") else ""
        lines.append(f"| {ch['what']}{note} | {ch['compared']:,} | {ch['mismatches']:,}{bv} |")
    lines += ["", "| target | met |", "|---|---|"]
    for t, ok in res["targets"].items():
        lines.append(f"| {t} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
