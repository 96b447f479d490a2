"""Benchmark `hw merge-lora` / `hw extract-lora` on full-size SDXL-shaped checkpoints, side by side.

    python bench/bench_lora.py [--work /tmp/hw_bench_lora] [--sample 48] [--keep]

Generates (fast: random fp16 bytes from a pool, written through hw's streaming writer):

  * base.safetensors   a single-file SDXL checkpoint, fp16, with the real SGM key names and shapes
                       of the UNet (model.diffusion_model.*), CLIP-L (conditioner.embedders.0.*),
                       OpenCLIP-G with fused in_proj (conditioner.embedders.1.*) and the VAE
                       (first_stage_model.* + the diffusers VAE names) — about 6.9 GB;
  * tuned.safetensors  the same with every attention / text-encoder projection changed by a
                       decaying-spectrum rank-96 difference plus noise (what fine-tuning leaves);
  * lora.safetensors   a kohya rank-64 LoRA on all 722 UNet + 72 + 192 text-encoder modules.

Then, each in a subprocess whose peak RSS comes from os.wait4 (ru_maxrss):

  1. merge: `hw merge-lora base lora --out merged` (streaming) vs the load-everything way
     (safetensors load_file + add in fp32 + save_file, as the usual scripts do), outputs compared
     tensor by tensor;
  2. extract: `hw extract-lora tuned base --rank 64` end to end (randomized low-rank SVD), and on a
     sample of layers evenly spread over every layer shape, full torch.linalg.svd vs the low-rank
     path: seconds per layer, peak RSS and the Frobenius error of each; the full-SVD time for all
     layers is extrapolated from the sample (running it on all ~1000 layers takes ~10+ minutes).

Results: a markdown table on stdout and in bench/out/lora.md, figures in bench/out/lora.json.
Generated files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pycore.lora import formats as fm  # noqa: E402
from pycore.lora.checkpoint import sgm_entries, target_kind  # noqa: E402
from pycore.lora.io import DTYPES, SafeWriter  # noqa: E402
from tests.kit.sdxl_arch import CLIP_G, CLIP_L, UNET, VAE  # noqa: E402


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sdxl_plan() -> list[tuple[str, str, tuple[int, ...], list]]:
    """(SGM key, dtype, shape, sources) for a full SDXL single file, from the real configs on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))}  # fmt: skip
        vae = AutoencoderKL(**VAE)
    plan = sgm_entries({c: {k: ("F16", tuple(v.shape)) for k, v in m.state_dict().items()} for c, m in models.items()})
    plan += [(f"first_stage_model.{k}", "F16", tuple(v.shape), []) for k, v in vae.state_dict().items()]
    return plan


def module_of(key: str) -> list[fm.Target]:
    return fm.sgm_targets(key)


def write_checkpoints(work: Path, plan, tuned: bool) -> dict:
    """base.safetensors (and tuned.safetensors) from a random fp16 pool; tuned adds a structured difference."""
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 * 1024 * 1024, generator=g) * 0.02).half()  # 128 MB of N(0, 0.02²) fp16
    pool_b = pool.view(torch.uint8).numpy()
    entries = [(k, d, s) for k, d, s, _ in plan]
    t0 = time.perf_counter()
    off = 0
    wb = SafeWriter(work / "base.safetensors", entries, {"format": "pt", "hw_bench": "random SDXL-shaped"})
    wt = SafeWriter(work / "tuned.safetensors", entries, {"format": "pt"}) if tuned else None
    changed = 0
    gd = torch.Generator().manual_seed(1)
    mv = memoryview(pool_b)
    for k, d, s, _ in plan:
        nb = math.prod(s) * DTYPES[d][1]
        if off + nb > len(pool_b):
            off = 0
        chunk = mv[off : off + nb]  # zero-copy slice of the pool (every tensor fits in it)
        off = (off + nb + 2 * 12345) % len(pool_b)
        wb.write_bytes(k, chunk)
        if wt is not None:
            tg = module_of(k)
            kinds = [target_kind(t.canonical, len(s)) for t in tg]
            if tg and all(kd in ("attn", "te") for kd in kinds):
                w = torch.frombuffer(chunk, dtype=torch.float16).reshape(s).float()
                noise_off = (off * 7 + 4096) % (len(pool) - w.numel())
                w += structured_delta(s, gd, pool[noise_off : noise_off + w.numel()])
                wt.write(k, w.half())
                changed += 1
            else:
                wt.write_bytes(k, chunk)
    wb.close()
    if wt is not None:
        wt.close()
    return {"seconds": round(time.perf_counter() - t0, 1), "tensors": len(plan), "tuned_tensors_changed": changed,
            "bytes": (work / "base.safetensors").stat().st_size}  # fmt: skip


def structured_delta(shape, g, noise: torch.Tensor) -> torch.Tensor:
    """A fine-tuning-like difference: rank-96 with a decaying spectrum, plus small dense noise."""
    m, n = shape[0], math.prod(shape[1:])
    r = min(96, m, n)
    s = torch.logspace(-1.5, -3.5, r)
    a = torch.randn(m, r, generator=g) / math.sqrt(m)
    b = torch.randn(r, n, generator=g) / math.sqrt(n)
    d = (a * s) @ b * math.sqrt(m * n) / 50
    d += noise.reshape(m, n).float() * 0.01  # pool values are N(0, 0.02²): noise std 2e-4
    return d.reshape(shape)


def write_lora(work: Path, plan, rank: int = 64) -> dict:
    from pycore.lora.convert import save_lora
    from pycore.lora.layers import LoraLayer, LoraSet

    g = torch.Generator().manual_seed(2)
    lora = LoraSet()
    for k, _, s, _ in plan:
        for t in module_of(k):
            shp = s if t.rows is None else (s[0] // 3, *s[1:])
            if target_kind(t.canonical, len(shp)) in ("attn", "te"):
                lora.layers[t.canonical] = LoraLayer((torch.randn(rank, shp[1], generator=g) * 0.01).half(), (torch.randn(shp[0], rank, generator=g) * 0.01).half(), rank / 2)
    save_lora(lora, work / "lora.safetensors", "kohya", overwrite=True)
    return {"modules": lora.components(), "bytes": (work / "lora.safetensors").stat().st_size}


def write_lycoris(work: Path, plan, family: str) -> dict:
    """A LyCORIS file on the same modules: LoHa rank 32 (as many parameters as LoRA rank 64) or
    LoKr with a 4×4 full w1 and w2 factorised at rank 16 (LyCORIS's usual factor/dim split)."""
    g = torch.Generator().manual_seed(3)
    sd: dict = {}

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).half()

    for k, _, s, _ in plan:
        for t in module_of(k):
            shp = s if t.rows is None else (s[0] // 3, *s[1:])
            if target_kind(t.canonical, len(shp)) not in ("attn", "te"):
                continue
            name = fm.canonical_to_kohya(t.canonical)
            m, n = shp[0], math.prod(shp[1:])
            if family == "loha":
                sd |= {f"{name}.hada_w1_a": r(m, 32), f"{name}.hada_w1_b": r(32, n), f"{name}.hada_w2_a": r(m, 32), f"{name}.hada_w2_b": r(32, n)}
            else:
                sd |= {f"{name}.lokr_w1": r(4, 4), f"{name}.lokr_w2_a": r(m // 4, 16), f"{name}.lokr_w2_b": r(16, n // 4)}
            sd[f"{name}.alpha"] = torch.tensor(8.0)
    from pycore.lora.io import save_tensors

    path = work / f"{family}.safetensors"
    save_tensors(path, sd, {"ss_network_module": "lycoris.kohya"}, overwrite=True)
    return {"tensors": len(sd), "bytes": path.stat().st_size}


def run_rss(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"hw_bench_out_{os.getpid()}.txt"
        with open(out_path, "wb") as fo, open(str(out_path) + ".err", "wb") as fe:
            p = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=devnull)
            _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    out = out_path.read_text()
    err = Path(str(out_path) + ".err").read_text()[-3000:]
    out_path.unlink()
    Path(str(out_path) + ".err").unlink()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{err}")
    return {"seconds": round(dt, 1), "peak_rss_gb": round(ru.ru_maxrss / 1024 / 1024, 2), "stdout": out}


BASELINE_MERGE = r"""
import sys, json, time
sys.path.insert(0, {repo!r})
import torch
from safetensors.torch import load_file, save_file
from pycore.lora.checkpoint import open_checkpoint
from pycore.lora.convert import load_lora
from pycore.lora.merge import LoraSpec, apply_adapters, plan_merge
base, lora_p, out = sys.argv[1:4]
ck = open_checkpoint(base)
plan, _ = plan_merge(ck, [(LoraSpec(lora_p), load_lora(lora_p))])
sd = load_file(base)                      # the whole model in memory
for (_, key), items in plan.items():
    sd[key] = apply_adapters(sd[key], items).to(sd[key].dtype)
save_file(sd, out)                        # save_file needs every tensor at once
import os
with open(out, "rb+") as f:               # flush to disk like hw's atomic write does, for equal work
    os.fsync(f.fileno())
"""

SVD_WORKER = r"""
import sys, json, time, math
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(int(sys.argv[4]))
from pycore.lora.checkpoint import open_checkpoint
from pycore.lora.extract import SvdOptions, _TensorCache, factorize
tuned, base, method = sys.argv[1:4]
names = json.loads(sys.argv[5])
it, ib = open_checkpoint(tuned).index(), open_checkpoint(base).index()
ct, cb = _TensorCache(), _TensorCache()
res = []
for n in names:
    d = ct.get(it[n][0]) - cb.get(ib[n][0])
    t0 = time.perf_counter()
    f = factorize(d, SvdOptions(rank=64, method=method))
    dt = time.perf_counter() - t0
    res.append({{"layer": n, "shape": list(d.shape), "seconds": dt, "rel_error": f.rel_error,
                "check": float(torch.linalg.norm(d - (f.up.flatten(1) @ f.down.flatten(1)).reshape(d.shape)) / torch.linalg.norm(d))}})
print(json.dumps(res))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/hw_bench_lora"))
    ap.add_argument("--sample", type=int, default=24, help="layers in the full-vs-low-rank SVD comparison")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every measured process (1 avoids OpenMP oversubscription on a shared machine)")
    ap.add_argument("--reuse", action="store_true", help="reuse base/tuned/lora.safetensors left by a --keep run")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--skip-baseline", action="store_true", help="skip the load-everything merge (needs ~2x the model in RAM)")
    ap.add_argument("--before", type=Path, default=None, help="another checkout of hw (e.g. the main branch) whose merge-lora is measured right after this one's, same files and load")
    ap.add_argument("--skip-extract", action="store_true", help="measure the merges only")
    ap.add_argument("--families", default="loha,lokr", help="LyCORIS families also merged (streaming), each measured like the LoRA merge; '' for none")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    need = 4 * 7.0e9
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need ~{need / 1e9:.0f} GB (base, tuned, two merged outputs)")
    hw = [sys.executable, "-m", "cli.app"]
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.chdir(REPO)
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                             "torch_threads": args.threads, "load_average_at_start": os.getloadavg()}}  # fmt: skip
    t_all = time.perf_counter()
    try:
        log("planning SDXL shapes on the meta device …")
        plan = sdxl_plan()
        log(f"  {len(plan)} tensors")
        have = all((work / f"{n}.safetensors").is_file() for n in ("base", "tuned", "lora"))
        if args.reuse and have:
            from pycore.lora.convert import load_lora

            log("reusing the generated checkpoints")
            res["generate"] = {"seconds": "reused", "tensors": len(plan), "bytes": (work / "base.safetensors").stat().st_size}
            res["lora"] = {"modules": load_lora(work / "lora.safetensors").components(), "bytes": (work / "lora.safetensors").stat().st_size}
        else:
            log("writing base.safetensors and tuned.safetensors …")
            res["generate"] = write_checkpoints(work, plan, tuned=not args.skip_extract)
            log(f"  {res['generate']}")
            res["lora"] = write_lora(work, plan)
            log(f"  lora: {res['lora']}")

        log("merge: hw merge-lora (streaming) …")
        r = run_rss([*hw, "merge-lora", str(work / "base.safetensors"), str(work / "lora.safetensors"), "--out", str(work / "merged_hw.safetensors"), "--json", "--overwrite", "--threads", str(args.threads)])
        res["merge_hw"] = {k: v for k, v in r.items() if k != "stdout"}
        log(f"  {res['merge_hw']}")
        if args.before is not None:
            log(f"merge: the same with the hw in {args.before} …")
            env = {**os.environ, "PYTHONPATH": str(args.before)}
            r = run_rss(["env", f"PYTHONPATH={env['PYTHONPATH']}", "sh", "-c", f"cd {args.before} && exec {sys.executable} -m cli.app \"$@\"", "hw",
                         "merge-lora", str(work / "base.safetensors"), str(work / "lora.safetensors"), "--out", str(work / "merged_before.safetensors"),
                         "--json", "--overwrite", "--threads", str(args.threads)])  # fmt: skip
            res["merge_before"] = {k: v for k, v in r.items() if k != "stdout"}
            res["merge_before_identical"] = compare(work / "merged_hw.safetensors", work / "merged_before.safetensors")
            log(f"  {res['merge_before']} identical: {res['merge_before_identical']}")
            (work / "merged_before.safetensors").unlink()
        if not args.skip_baseline:
            log("merge: load everything (load_file + add + save_file) …")
            r = run_rss([sys.executable, "-c", BASELINE_MERGE.format(repo=str(REPO)), str(work / "base.safetensors"), str(work / "lora.safetensors"), str(work / "merged_base.safetensors")])
            res["merge_load_all"] = {k: v for k, v in r.items() if k != "stdout"}
            log(f"  {res['merge_load_all']}")
            res["merge_outputs_identical"] = compare(work / "merged_hw.safetensors", work / "merged_base.safetensors")
            log(f"  outputs identical: {res['merge_outputs_identical']}")
            (work / "merged_base.safetensors").unlink()
        (work / "merged_hw.safetensors").unlink()
        for fam in [f for f in args.families.split(",") if f]:
            res[f"{fam}_file"] = write_lycoris(work, plan, fam)
            log(f"merge: hw merge-lora with a {fam} file {res[f'{fam}_file']} …")
            r = run_rss([*hw, "merge-lora", str(work / "base.safetensors"), str(work / f"{fam}.safetensors"), "--out", str(work / "merged_hw.safetensors"), "--json", "--overwrite", "--threads", str(args.threads)])
            res[f"merge_hw_{fam}"] = {k: v for k, v in r.items() if k != "stdout"}
            log(f"  {res[f'merge_hw_{fam}']}")
            (work / "merged_hw.safetensors").unlink()
            (work / f"{fam}.safetensors").unlink()
        if args.skip_extract:
            res["total_seconds"] = round(time.perf_counter() - t_all, 1)
            report(res)
            return

        log("extract: hw extract-lora --rank 64 (randomized low-rank SVD) …")
        r = run_rss([*hw, "extract-lora", str(work / "tuned.safetensors"), str(work / "base.safetensors"), "--out", str(work / "x.safetensors"), "--rank", "64", "--json", "--overwrite", "--threads", str(args.threads)])
        rep = json.loads(r["stdout"])
        res["extract_hw"] = {"seconds": r["seconds"], "peak_rss_gb": r["peak_rss_gb"], "layers": rep["layers"], "kept_overall": rep["kept_overall"],
                             "unchanged": rep["unchanged"], "methods": rep["methods"]}  # fmt: skip
        log(f"  {res['extract_hw']}")

        from pycore.lora.checkpoint import open_checkpoint

        idx = open_checkpoint(work / "base.safetensors").index()
        layers = sorted(c for c, pl in idx.items() if target_kind(c, len(pl[0].shape)) in ("attn", "te"))
        by_shape: dict = {}
        for c in layers:
            by_shape.setdefault(idx[c][0].shape, []).append(c)
        sample: list[str] = []
        i = 0
        while len(sample) < min(args.sample, len(layers)):  # round-robin over shapes
            for shp in sorted(by_shape):
                if i < len(by_shape[shp]) and len(sample) < args.sample:
                    sample.append(by_shape[shp][i])
            i += 1
        threads = str(args.threads)
        out = {}
        for method in ("lowrank", "full"):
            log(f"extract: {method} SVD on {len(sample)} sampled layers …")
            r = run_rss([sys.executable, "-c", SVD_WORKER.format(repo=str(REPO)), str(work / "tuned.safetensors"), str(work / "base.safetensors"), method, threads, json.dumps(sample)])
            rows = json.loads(r["stdout"])
            out[method] = {"peak_rss_gb": r["peak_rss_gb"], "rows": rows}
        # weight per shape so the extrapolation covers every layer
        per_shape = {}
        for method in ("lowrank", "full"):
            for row in out[method]["rows"]:
                per_shape.setdefault(method, {}).setdefault(tuple(row["shape"]), []).append(row["seconds"])
        est = {m: sum(len(by_shape[s]) * (sum(v) / len(v)) for s, v in per_shape[m].items()) for m in per_shape}
        err_low = math.sqrt(sum(r["rel_error"] ** 2 for r in out["lowrank"]["rows"]) / len(sample))
        err_full = math.sqrt(sum(r["rel_error"] ** 2 for r in out["full"]["rows"]) / len(sample))
        worst = max(lo["rel_error"] / fu["rel_error"] - 1 for lo, fu in zip(out["lowrank"]["rows"], out["full"]["rows"], strict=True))
        res["svd"] = {
            "sample_layers": len(sample), "all_layers": len(layers), "shapes": {str(list(k)): len(v) for k, v in by_shape.items()},
            "lowrank_s_per_layer": round(sum(r["seconds"] for r in out["lowrank"]["rows"]) / len(sample), 4),
            "full_s_per_layer": round(sum(r["seconds"] for r in out["full"]["rows"]) / len(sample), 4),
            "lowrank_all_layers_s_est": round(est["lowrank"], 1), "full_all_layers_s_est": round(est["full"], 1),
            "speedup": round(est["full"] / est["lowrank"], 1),
            "rms_rel_error_lowrank": err_low, "rms_rel_error_full": err_full, "worst_layer_extra_error": worst,
            "peak_rss_gb_lowrank": out["lowrank"]["peak_rss_gb"], "peak_rss_gb_full": out["full"]["peak_rss_gb"],
            "max_reported_vs_measured_error_gap": max(abs(r["rel_error"] - r["check"]) for m in out for r in out[m]["rows"]),
        }  # fmt: skip
        log(f"  {res['svd']}")
    finally:
        res["total_seconds"] = round(time.perf_counter() - t_all, 1)
        (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
        (REPO / "bench" / "out" / "lora.json").write_text(json.dumps(res, indent=2, default=str))  # partial results survive a failure
        if not args.keep:
            for name in ("base", "tuned", "lora", "x", "merged_hw", "merged_base"):
                (work / f"{name}.safetensors").unlink(missing_ok=True)
    report(res)


def compare(a: Path, b: Path) -> bool:
    from pycore.lora.io import SafeReader

    with SafeReader(a) as ra, SafeReader(b) as rb:
        if set(ra.keys()) != set(rb.keys()):
            return False
        return all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())


def report(res: dict) -> None:
    g = res["generate"]
    lines = [
        f"## hw LoRA tools — benchmark ({res['machine']['cpus']} CPUs shared (load average {res['machine']['load_average_at_start'][0]:.1f} at start), "
        f"torch {res['machine']['torch']}, {res['machine']['torch_threads']} torch thread(s))",
        "",
        f"SDXL-shaped single file: {g['tensors']} tensors, {g['bytes'] / 1e9:.2f} GB fp16 (generated in {g['seconds']} s, two files); "
        f"LoRA: kohya rank 64 on {sum(res['lora']['modules'].values())} modules, {res['lora']['bytes'] / 1e6:.0f} MB.",
        "",
        "| merge rank-64 LoRA into the checkpoint | wall time | peak RSS |",
        "|---|---:|---:|",
        f"| `hw merge-lora` (streaming) | {res['merge_hw']['seconds']} s | {res['merge_hw']['peak_rss_gb']} GB |",
    ]
    if "merge_load_all" in res:
        lm = res["merge_load_all"]
        lines.append(f"| load_file + add + save_file | {lm['seconds']} s | {lm['peak_rss_gb']} GB |")
        lines.append(f"| ratio (load-all / hw) | {lm['seconds'] / res['merge_hw']['seconds']:.2f}× | {lm['peak_rss_gb'] / res['merge_hw']['peak_rss_gb']:.1f}× |")
        lines.append("")
        lines.append(f"Merged outputs identical tensor by tensor: {res['merge_outputs_identical']}.")
    if "merge_before" in res:
        mb = res["merge_before"]
        lines.append(f"| the same with the hw before this change (`--before`) | {mb['seconds']} s | {mb['peak_rss_gb']} GB |")
    for fam, what in (("loha", "LoHa rank 32"), ("lokr", "LoKr 4×4 ⊗ rank-16")):
        if f"merge_hw_{fam}" in res:
            m = res[f"merge_hw_{fam}"]
            lines.append(f"| `hw merge-lora` (streaming), {what} file ({res[f'{fam}_file']['bytes'] / 1e6:.0f} MB) | {m['seconds']} s | {m['peak_rss_gb']} GB |")
    if "svd" not in res:
        lines += ["", f"Total benchmark time {res['total_seconds']} s (extraction not run)."]
        text = "\n".join(lines) + "\n"
        print(text)
        (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
        (REPO / "bench" / "out" / "lora_merge_families.md").write_text(text)
        return
    s, e = res["svd"], res["extract_hw"]
    lines += [
        "",
        f"Extract rank 64 from two such checkpoints (tuned = base + decaying-spectrum rank-96 difference + noise on the {s['all_layers']} attention/text-encoder projections):",
        "",
        "| extraction | time | peak RSS | RMS relative Frobenius error |",
        "|---|---:|---:|---:|",
        f"| `hw extract-lora --rank 64` end to end (low-rank SVD, {e['layers']} layers, streaming) | {e['seconds']} s | {e['peak_rss_gb']} GB | kept {e['kept_overall']:.4f} of ‖D‖ |",
        f"| low-rank SVD (q = r+16, 2 power its), {s['sample_layers']} sampled layers | {s['lowrank_s_per_layer']} s/layer → {s['lowrank_all_layers_s_est']} s for all | {s['peak_rss_gb_lowrank']} GB | {s['rms_rel_error_lowrank']:.5f} |",
        f"| full torch.linalg.svd, same layers | {s['full_s_per_layer']} s/layer → {s['full_all_layers_s_est']} s for all (est.) | {s['peak_rss_gb_full']} GB | {s['rms_rel_error_full']:.5f} |",
        f"| ratio | **{s['speedup']}× faster** | | worst layer: {s['worst_layer_extra_error'] * 100:+.3f}% error |",
        "",
        f"Total benchmark time {res['total_seconds']} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.md").write_text(text)
    (out / "lora.json").write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
