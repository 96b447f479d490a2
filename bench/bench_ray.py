"""Images/s of the per-image stages on tar shards: local (in-process) vs Ray Data with 1 and 2
workers, beside what users would otherwise write (Python tarfile + Pillow).

    python bench/bench_ray.py --images 1000 --shards 10 --rounds 3

Stages: the bucket scan (header + xxh3 content hash of each member, read in place), dedup's
perceptual hashing (decode + phash/dhash with the quality statistics, as `hw dedup` runs it) and
spm-score (decode, resize, one forward pass) with the test kit's tiny step-aware preference model
(tests/kit: a few-hundred-k-parameter CLIP — so the figure is the per-image I/O, decode and
Ray overhead, not a real model's compute). Rounds are interleaved (each round runs every method
once, in the same order) and the median round is reported, plus ratios to the local run. Ray runs
on this machine only, bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before ray
is imported); its start-up time is reported separately and not counted in the per-stage times.
Output: a markdown table on stdout and bench/out/ray.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only; read when ray is imported

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_shards(folder: Path, n: int, per_shard: int, side: int) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(0, n, per_shard):
        p = folder / f"{s // per_shard:05d}.tar"
        paths.append(str(p))
        if p.exists():
            continue
        with tarfile.open(p, "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                w, h = side + int(rng.integers(0, side // 2)), side
                base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                im = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
                for name, data in ((f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return paths


def tarfile_pillow(shards: list[str]) -> int:
    """What users write without hw: iterate members with tarfile, read each header with Pillow."""
    from PIL import Image

    n = 0
    for s in shards:
        with tarfile.open(s) as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".jpg"):
                    with Image.open(tf.extractfile(m)) as im:  # type: ignore[arg-type]
                        _ = im.size
                    n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--side", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    a = ap.parse_args()

    from pycore import distributed, sources
    from pycore.curation.scan_sources import scan_shards
    from pycore.spm.checkpoints import load_spm
    from pycore.spm.score import score_files
    from tests.kit.clip import save_tiny_spm

    a.out.mkdir(parents=True, exist_ok=True)
    shards = make_shards(a.out / "ray_shards", a.images, max(1, a.images // a.shards), a.side)
    refs = scan_shards(shards, hash=False).frame["path"].to_list()
    spm_dir = a.out / "ray_tiny_spm"
    if not spm_dir.exists():
        spm_dir.mkdir(parents=True)
        save_tiny_spm(spm_dir, seed=0)
    prompts = [f"image {i}" for i in range(len(refs))]
    spm = load_spm(str(spm_dir), device="cpu")
    spm.requires_grad_(False)
    score_unit = distributed.ScoreUnit(str(spm_dir), None, None, "float32", "cpu", 0, 16)

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - t0
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    scan = distributed.ScanUnit(hash=True, max_pixels=178_956_970, threads=1)
    units = [{"kind": "shard", "path": s} for s in shards]

    def ray_scan(w: int) -> int:
        return distributed.scan_units(units, scan, address="local", workers=w, near=a.out)[0].height

    def ray_hash(w: int) -> int:
        return len(distributed.perceptual_hashes(refs, None, 1, stats=True, address="local", workers=w, near=a.out)["ok"])

    def ray_score(w: int) -> int:
        return len(distributed.score(refs, prompts, score_unit, address="local", workers=w, near=a.out)[0])

    methods = {
        "scan: tarfile + Pillow (1 process)": lambda: tarfile_pillow(shards),
        "scan: hw local (in-process, 2 threads)": lambda: scan_shards(shards, threads=2).frame.height,
        "scan: hw --ray, 1 worker": lambda: ray_scan(1),
        "scan: hw --ray, 2 workers": lambda: ray_scan(2),
        "phash: hw local (in-process, 2 threads)": lambda: len(sources.perceptual_hashes(refs, None, 2, stats=True)["ok"]),
        "phash: hw --ray, 1 worker": lambda: ray_hash(1),
        "phash: hw --ray, 2 workers": lambda: ray_hash(2),
        "spm-score: hw local (in-process)": lambda: len(score_files(spm, refs, prompts)[0]),
        "spm-score: hw --ray, 1 worker": lambda: ray_score(1),
        "spm-score: hw --ray, 2 workers": lambda: ray_score(2),
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(a.rounds):
        for k, fn in methods.items():
            t = time.perf_counter()
            n = fn()
            times[k].append(time.perf_counter() - t)
            assert n == a.images, (k, n)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in methods:
        stage = k.split(":")[0]
        local = med[next(m for m in methods if m.startswith(f"{stage}: hw local"))]
        rows.append((k, a.images / med[k], local / med[k]))
    print(f"{a.images} JPEGs ({a.side}px short side) in {len(shards)} shards; median of {a.rounds} interleaved rounds; "
          f"Ray start-up {ray_start:.1f} s (not counted)\n")
    print("| method | images/s | vs hw local |\n|---|---:|---:|")
    for k, ips, ratio in rows:
        print(f"| {k} | {ips:,.0f} | {ratio:.2f}× |")
    load = os.getloadavg()
    (a.out / "ray.json").write_text(json.dumps({
        "images": a.images, "shards": len(shards), "side": a.side, "rounds": a.rounds, "times": times,
        "ray_start_s": ray_start, "loadavg": load, "cpus": os.cpu_count(), "python": platform.python_version(),
        "ray": ray.__version__,
    }, indent=2))  # fmt: skip
    print(f"\nload average during the run: {load[0]:.1f} (1 min) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
