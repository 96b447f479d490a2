"""Start-up and small-corpus end-to-end times of `hw`, interleaved rounds, medians.

    python bench/bench_startup.py [--n 20000] [--rounds 7] [--other-tree /path/to/other/checkout]

Rows: `hw --help`, `hw bucket --help`, and `hw bucket DIR --no-hash` as a whole command next to the
whole Pillow header+EXIF script and the whole imagesize script of bench_bucket.py on the same
folder. The folder holds N small images (JPEG/PNG/WebP/GIF/BMP/TIFF, sizes varied, some with an
EXIF rotation): with --no-hash only headers are read, so the file sizes barely matter and the
fixed costs (interpreter, imports, walk, Parquet write) are what is measured. With --other-tree
the same rows run with that checkout's code first on PYTHONPATH (e.g. main, for a before/after).
Every round runs every row once, in turn, so load from other processes hits all rows alike.
Next to the wall time each row's CPU time (user + system of the child process, all threads) is
recorded: on a shared, loaded machine it moves far less than the wall time, so both are printed
with the load average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_bucket import BASELINE_SCRIPT  # noqa: E402

EXTS = "jpg,jpeg,png,webp,gif,bmp,tif,tiff"


def make_small_corpus(root: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    if len(list(root.rglob("*.*"))) >= n:
        return
    templates = []
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tif")):
        for w, h in ((64, 48), (48, 64), (60, 60), (80, 45)):
            buf = io.BytesIO()
            kw = {}
            if fmt == "JPEG" and rng.random() < 0.5:
                ex = Image.Exif()
                ex[0x0112] = 6
                kw["exif"] = ex.tobytes()
            Image.new("RGB", (w, h), (rng.randrange(256), 90, 160)).save(buf, fmt, **kw)
            templates.append((ext, buf.getvalue()))
    for i in range(n):
        ext, data = templates[i % len(templates)]
        sub = root / f"d{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:06d}.{ext}").write_bytes(data)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``argv``, started in a neutral folder: `python -c`
    puts the current folder first on sys.path, which would shadow PYTHONPATH's checkout."""
    c0, t0 = _children_cpu(), time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    dt, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--corpus", default=str(HERE / "out" / "small_corpus"))
    ap.add_argument("--other-tree", help="another checkout to compare with (its code first on PYTHONPATH)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    corpus = Path(a.corpus)
    make_small_corpus(corpus, a.n)
    tmp = Path(tempfile.mkdtemp(prefix="hw-startup-"))
    py = sys.executable
    trees = {"this": str(HERE.parent)} | ({"other": a.other_tree} if a.other_tree else {})
    rows: dict[str, tuple[list[str], dict]] = {}
    for tag, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=tree)
        hw = [py, "-c", "import sys, cli; assert cli.__file__.startswith(sys.argv[1]), cli.__file__; from cli.app import main; "
                        "sys.exit(main(sys.argv[2:]))", tree]
        rows[f"{tag}: hw --help"] = (hw + ["--help"], env)
        rows[f"{tag}: hw bucket --help"] = (hw + ["bucket", "--help"], env)
        rows[f"{tag}: hw bucket DIR --no-hash (whole command)"] = (
            hw + ["bucket", str(corpus), "--out", str(tmp / f"{tag}.parquet"), "--overwrite", "--no-hash", "--json"], env)
    env = dict(os.environ)
    for kind in ("pil", "imagesize"):
        rows[f"{kind} script (whole)"] = ([py, "-c", BASELINE_SCRIPT, str(corpus), str(tmp / f"{kind}.json"), kind, EXTS], env)
    times: dict[str, list[float]] = {k: [] for k in rows}
    cpus: dict[str, list[float]] = {k: [] for k in rows}
    for k, (cmd, e) in rows.items():  # one untimed warm-up each (page cache, .pyc)
        timed(cmd, e)
    load0 = os.getloadavg()
    for _ in range(a.rounds):
        for k, (cmd, e) in rows.items():
            wall, cpu = timed(cmd, e)
            times[k].append(wall)
            cpus[k].append(cpu)
    load = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpus.items()}
    print(f"{a.n} files, {a.rounds} interleaved rounds, medians; load average (1/5 min) {load0[0]:.1f}/{load0[1]:.1f} "
          f"before, {load[0]:.1f}/{load[1]:.1f} after, on {os.cpu_count()} cores")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:55s} wall {v:7.3f} s (min {min(times[k]):.3f}, max {max(times[k]):.3f})   CPU {cmed[k]:.3f} s")
    for tag in trees:
        hwk = f"{tag}: hw bucket DIR --no-hash (whole command)"
        for what, m in (("wall", med), ("CPU", cmed)):
            print(f"  {tag} ({what}): Pillow script / hw bucket = {m['pil script (whole)'] / m[hwk]:.1f}x;"
                  f" imagesize script / hw bucket = {m['imagesize script (whole)'] / m[hwk]:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"n": a.n, "rounds": a.rounds, "load_before": load0, "load_after": load,
                                            "times": times, "cpu": cpus, "median": med, "cpu_median": cmed}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
