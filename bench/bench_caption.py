"""Benchmark `hw caption --backend openai` against a local OpenAI-compatible server.

    python bench/bench_caption.py [--n 1000] [--latency 0.075] [--fault-rate 0.05] [--concurrency 1,8,32]

Makes a corpus of N photo-like 1024×768 JPEGs (bench/out/caption_corpus, reused), a manifest with
`hw bucket`, and starts tests/kit/fake_openai.py as its own process: every request sleeps
``--latency`` seconds (a remote API's round trip) and ~``--fault-rate`` of (image, attempt)
pairs fail (429 with retry-after, 500/503, malformed JSON, schema-violating JSON, refusals).

Timed, each on a fresh result store:
  * `hw caption` as a subprocess at each concurrency (images/s over the captioning phase and end
    to end, requests, retries, failures; the server's count of images served twice must be 0);
  * the naive way today's scripts work — one image at a time, the whole file base64-encoded, one
    request, no retry — for the ratio;
  * the local CPU ceiling: decoding + resizing + JPEG-encoding the corpus with no network, on
    1 thread and on all cores (the rate `hw caption` cannot exceed on this machine).

Results: a markdown table on stdout and in bench/out/caption.md, all figures in bench/out/caption.json
(``--name`` changes the file names, e.g. for a run with ``--latency 0.5`` — a remote model's pace).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(REPO))


def log(msg: str = "") -> None:
    print(msg, flush=True)


def make_corpus(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth gradients plus noise and shapes (so encoding costs what a photo costs)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.jpg" for i in range(n)]
    todo = [p for p in paths if not p.exists()]
    if not todo:
        return paths
    yy, xx = np.mgrid[0:768, 0:1024].astype(np.float32)
    for p in todo:
        i = int(p.stem.split("_")[1])
        r = np.random.default_rng(seed * 100_003 + i)
        base = np.stack([(xx * r.uniform(0.05, 0.25) + yy * r.uniform(0.05, 0.25) + r.uniform(0, 255)) % 256 for _ in range(3)], -1)
        noise = r.normal(0, 18, size=base.shape)
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = r.integers(0, 900), r.integers(0, 650)
            d.ellipse([x0, y0, x0 + r.integers(30, 200), y0 + r.integers(30, 200)], fill=tuple(int(c) for c in r.integers(0, 256, 3)))
        img.save(p, "JPEG", quality=90)
    return paths


class Server:
    def __init__(self, latency: float, fault_rate: float, seed: int = 0):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "kit" / "fake_openai.py"), "--latency", str(latency), "--fault-rate", str(fault_rate), "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline().split()
        self.port = int(line[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def hw_caption(manifest: Path, out: Path, store: Path, base_url: str, concurrency: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "cli.app", "caption", str(manifest), "--out", str(out), "--store", str(store), "--base-url", base_url,
           "--model", "fake-vision", "--concurrency", str(concurrency), "--overwrite", "--json"]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"hw caption failed: {p.stderr}")
    return wall, json.loads(p.stdout)


def naive(paths: list[Path], base_url: str) -> dict:
    """One image at a time, the file base64-encoded as is, no retries (how captioning scripts do it)."""
    import httpx

    from pycore.caption.schema import response_format

    ok = bad = 0
    t = time.perf_counter()
    with httpx.Client(timeout=60) as c:
        for p in paths:
            url = "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()
            body = {"model": "fake-vision", "response_format": response_format(),
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "caption"}, {"type": "image_url", "image_url": {"url": url}}]}]}  # fmt: skip
            r = c.post(f"{base_url}/chat/completions", json=body)
            ok += r.status_code == 200
            bad += r.status_code != 200
    s = time.perf_counter() - t
    return {"images": len(paths), "seconds": s, "images_per_s": len(paths) / s, "non_200": bad}


def cpu_ceiling(paths: list[Path], threads: int) -> float:
    from pycore.caption.images import data_url

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        for _ in ex.map(lambda p: data_url(p, 768, 90), paths):
            pass
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.075)
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--naive-n", type=int, default=200, help="images for the naive baseline (extrapolated as a rate)")
    ap.add_argument("--name", default="caption", help="result file names: bench/out/NAME.md and NAME.json")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = OUT / "caption_corpus"
    log(f"corpus: {a.n} JPEGs 1024×768 in {corpus}")
    paths = make_corpus(corpus, a.n)[: a.n]
    manifest = OUT / "caption_manifest.parquet"
    subprocess.run([sys.executable, "-m", "cli.app", "bucket", str(corpus), "--out", str(manifest), "--overwrite", "--json"],
                   cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    import polars as pl

    names = {p.name for p in paths}
    full = pl.read_parquet(manifest)
    if full.height != len(paths):  # the corpus folder holds more images than --n
        full.filter(pl.col("path").map_elements(lambda s: Path(s).name in names, return_dtype=pl.Boolean)).write_parquet(manifest)
    for p in paths:  # warm the page cache
        p.read_bytes()
    cores = os.cpu_count() or 1
    res: dict = {"n": a.n, "latency_s": a.latency, "fault_rate": a.fault_rate, "cores": cores, "python": platform.python_version(), "runs": []}
    log("CPU ceiling (decode + resize to 768 + JPEG + base64, no network) …")
    res["cpu_ceiling_1_thread"] = cpu_ceiling(paths[:200], 1)
    res["cpu_ceiling_all_cores"] = cpu_ceiling(paths[:400], cores)
    log(f"  {res['cpu_ceiling_1_thread']:.1f} img/s on 1 thread, {res['cpu_ceiling_all_cores']:.1f} img/s on {cores}")
    for conc in [int(x) for x in a.concurrency.split(",")]:
        srv = Server(a.latency, a.fault_rate)
        try:
            store = OUT / f"caption_store_c{conc}"
            if store.exists():
                import shutil

                shutil.rmtree(store)
            wall, rep = hw_caption(manifest, OUT / f"caption_c{conc}.parquet", store, srv.base_url, conc)
            st = srv.stats()
        finally:
            srv.close()
        api = rep["api"]
        run = {"concurrency": conc, "wall_s": wall, "caption_phase_s": api["seconds"], "images_per_s": a.n / api["seconds"],
               "images_per_s_end_to_end": a.n / wall, "ok": rep["ok"], "failed": rep["failed"], "requests": api["requests"],
               "retries": api["retries"], "server_actions": st["actions"], "served_twice": st["served_twice"]}  # fmt: skip
        res["runs"].append(run)
        log(f"  concurrency {conc:>3}: {run['images_per_s']:.1f} img/s (end to end {run['images_per_s_end_to_end']:.1f}); "
            f"{run['ok']} ok, {run['failed']} failed, {run['requests']} requests, {run['retries']} retries, served twice {run['served_twice']}")  # fmt: skip
    srv = Server(a.latency, a.fault_rate)
    try:
        res["naive"] = naive(paths[: a.naive_n], srv.base_url)
    finally:
        srv.close()
    log(f"  naive sequential script: {res['naive']['images_per_s']:.1f} img/s, {res['naive']['non_200']} of {a.naive_n} requests failed (not retried)")
    (OUT / f"{a.name}.json").write_text(json.dumps(res, indent=2))
    md = [f"`hw caption` vs a local OpenAI-compatible server: {a.n} photo-like 1024×768 JPEGs, {a.latency * 1000:.0f} ms per request, "
          f"~{a.fault_rate:.0%} injected faults (429 with retry-after, 500/503, malformed or schema-violating JSON, refusals), {cores} cores.",
          "", "| run | images/s (captioning) | images/s (end to end) | ok | failed | requests | retries | served twice |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["runs"]:
        md.append(f"| hw caption --concurrency {r['concurrency']} | {r['images_per_s']:.1f} | {r['images_per_s_end_to_end']:.1f} | {r['ok']} | {r['failed']} | {r['requests']} | {r['retries']} | {r['served_twice']} |")
    nv = res["naive"]
    md.append(f"| naive sequential script (full file, no retry; {a.naive_n} images) | {nv['images_per_s']:.1f} | – | {nv['images'] - nv['non_200']} | {nv['non_200']} (lost) | {nv['images']} | 0 | – |")
    md += ["", f"Local CPU ceiling (decode, resize to 768, JPEG, base64; no network): {res['cpu_ceiling_1_thread']:.1f} img/s on 1 thread, "
           f"{res['cpu_ceiling_all_cores']:.1f} img/s on {cores} cores."]  # fmt: skip
    best = max(res["runs"], key=lambda r: r["images_per_s"])
    md.append(f"Best hw rate / naive script: {best['images_per_s'] / nv['images_per_s']:.1f}×.")
    text = "\n".join(md) + "\n"
    (OUT / f"{a.name}.md").write_text(text)
    log("")
    log(text)


if __name__ == "__main__":
    main()
