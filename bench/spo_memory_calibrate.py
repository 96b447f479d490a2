"""Calibrate the closed-form memory model of `hw spo-train --plan` on the meta-device simulation.

    python bench/spo_memory_calibrate.py            # writes pycore/spo/memory_calibration.json
    python bench/spo_memory_calibrate.py --check    # compares the model with fresh simulations at 3 resolutions

pycore.spo.memory predicts the activation peak of each phase of a run (one rollout UNet call, the
decode of x̂0, the SPM scoring, one training micro-step) as ``a + n·c + n·b·P`` bytes, where n is
the phase's batch (latents, images or transitions) and P the latent pixels (h·w). This script runs
bench/spo_memory_budget.py's simulation (real diffusers/transformers modules on PyTorch's meta
device, every live storage tracked, CUDA autocast and flash/memory-efficient attention emulated) for
each phase variant at three (n, P) points per family and solves for a, c, b; the weights are exact
parameter counts. Fits at 768² and 1280² (SDXL) or 256² and 768² (SD1.5) with the preset's n, and at
the first resolution with n = 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import spo_memory_budget as smb  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from pycore.spo.memory import CALIBRATION_FILE, SD15_UNET, decode_key, effective_key, sample_key, spm_key, train_key  # noqa: E402

FIT_RES = {"sdxl": (768, 1280), "sd15": (256, 768)}
#: Tiled decodes are fitted where tiling happens (above the 512² tile); at or below it the planner uses the untiled figures.
TILED_FIT_RES = {"sdxl": (768, 1280), "sd15": (640, 1024)}
CHECK_RES = {"sdxl": (832, 1024, 1216), "sd15": (384, 512, 640)}


class Models:
    """The family's meta models, built once per dtype."""

    def __init__(self, family: str):
        self.family, self.cfg = family, from_preset(family)
        self.unets: dict[str, Any] = {}
        self.vaes: dict[str, Any] = {}
        self.spms: dict[str, Any] = {}

    def unet(self, dtype: str):
        if dtype not in self.unets:
            if self.family == "sdxl":
                u = smb.build_unet(smb._dt(dtype))
            else:
                from diffusers import UNet2DConditionModel

                with smb.META:
                    u = UNet2DConditionModel(**SD15_UNET).to(smb._dt(dtype))
            self.unets[dtype] = (u, None, smb.add_lora(u, self.cfg))
        return self.unets[dtype]

    def vae(self, dtype: str):
        if dtype not in self.vaes:
            self.vaes[dtype] = smb.build_vae(smb._dt(dtype))
        return self.vaes[dtype]

    def spm(self, dtype: str):
        if dtype not in self.spms:
            self.spms[dtype] = smb.build_spm(smb._dt(dtype))
        return self.spms[dtype]


def _cond_for(family: str):
    """bench's SDXL conditioning, or SD1.5's (768-wide embeddings, no pooled / time ids)."""
    if family == "sdxl":
        return smb._cond
    from pycore.diffusion.text import Conditioning

    def cond(n: int, unet: Any):
        d = unet.config.cross_attention_dim
        return Conditioning(embeds=torch.zeros(n, 77, d, device=smb.META), neg_embeds=torch.zeros(1, 77, d, device=smb.META))

    return cond


def simulate(models: Models, kind: str, variant: dict[str, Any], n: int, resolution: int) -> dict[str, float]:
    """Activation bytes of one phase variant with batch n at a resolution (bench/spo_memory_budget.py's simulation)."""
    cfg = models.cfg
    latent = (4, resolution // 8, resolution // 8)
    smb._cond = _cond_for(models.family) if models.family == "sd15" else _SDXL_COND
    if kind == "sample":
        k = cfg.num_candidates
        c = cfg.replace(sample_batch_size=max(1, n // k), num_candidates=k) if n % k == 0 else cfg.replace(sample_batch_size=n, num_candidates=1)
        ph = smb.Phase(unet_dtype=variant["dtype"], autocast=variant["dtype"] if variant["dtype"] != "float32" else None)
        return {"act": smb.sim_sampling(models.unet(variant["dtype"])[0], c, ph, latent)["peak"]}
    if kind == "train":
        ph = smb.Phase(unet_dtype=variant["dtype"], autocast=variant["dtype"] if variant["dtype"] != "float32" else None,
                       checkpointing=variant["checkpointing"], train_batch_size=n)  # fmt: skip
        u, ref, params = models.unet(variant["dtype"])
        return {"act": smb.sim_training(u, ref, params, cfg, ph, latent)["peak"]}
    k = cfg.num_candidates
    c = cfg.replace(sample_batch_size=max(1, n // k)) if n % k == 0 else cfg.replace(sample_batch_size=n, num_candidates=1)
    ph = smb.Phase(vae_dtype=variant.get("vae_dtype", "float16"), decode=variant.get("decode", "batched"),
                   spm_dtype=variant.get("spm_dtype", "float32"), score_autocast=False)  # fmt: skip
    r = smb.sim_scoring(models.vae(ph.vae_dtype), models.spm(ph.spm_dtype), c, ph, latent)
    return {"decode": r["decode_peak"], "images": r["images"], "spm": r["spm_peak"]}


_SDXL_COND = smb._cond


def variants(family: str) -> list[tuple[str, str, dict[str, Any], str]]:
    """(key, kind, settings, which simulated figure) of every phase variant the planner uses."""
    out = []
    dt = "float16"  # fp16 and bf16 take the same bytes; the planner models mixed precision (the CUDA default)
    out.append((sample_key(dt), "sample", {"dtype": dt}, "act"))
    for ck in (False, True):
        out.append((train_key(dt, ck), "train", {"dtype": dt, "checkpointing": ck}, "act"))
    for vd, modes in (("float16", ("batched", "sliced", "tiled", "sliced_tiled")), ("float32", ("batched", "sliced"))):
        for mode in modes:
            out.append((decode_key(vd, mode), "score", {"vae_dtype": vd, "decode": mode}, "decode"))
    for sd in ("float32", "float16"):
        out.append((spm_key(sd), "score", {"spm_dtype": sd, "decode": "sliced"}, "spm"))
    return out


def preset_n(cfg: Any, kind: str) -> int:
    return cfg.train_batch_size if kind == "train" else cfg.sample_batch_size * cfg.num_candidates


def parameters(models: Models) -> dict[str, int]:
    """Exact parameter counts of the family's real architectures (meta device)."""
    te1, te2 = smb.build_text_encoders()
    u, _, lora = models.unet("float16")
    n_lora = sum(p.numel() for p in lora)
    return {"unet": smb.count(u) - n_lora, "text_encoders": smb.count(te1) + (smb.count(te2) if models.family == "sdxl" else 0),
            "vae": smb.count(models.vae("float16")), "spm": smb.count(models.spm("float32")),
            "lora_per_rank": n_lora / models.cfg.lora_rank}  # fmt: skip


def fit(family: str, log: Any = print, only: set[str] | None = None, coeffs: dict[str, Any] | None = None) -> dict[str, Any]:
    models = Models(family)
    cfg = models.cfg
    coeffs = dict(coeffs or {})
    for key, kind, var, fig in variants(family):
        if only and key not in only:
            continue
        r1, r2 = TILED_FIT_RES[family] if "tiled" in key else FIT_RES[family]
        n0 = preset_n(cfg, kind)
        p1, p2 = (r1 // 8) ** 2, (r2 // 8) ** 2
        t0 = time.perf_counter()
        y1 = simulate(models, kind, var, n0, r1)[fig]
        y2 = simulate(models, kind, var, n0, r2)[fig]
        n3 = 1 if kind == "train" else cfg.num_candidates  # a smaller batch (one prompt's k candidates) separates a from n·c
        y3 = simulate(models, kind, var, n3, r1)[fig] if n0 > n3 else None
        nb = (y2 - y1) / (p2 - p1)  # n·b
        b = nb / n0
        const0 = y1 - nb * p1  # a + n0·c
        if y3 is not None:
            const3 = y3 - n3 * b * p1  # a + n3·c
            c = (const0 - const3) / (n0 - n3)
            a = const0 - n0 * c
        else:
            a, c = const0, 0.0
        coeffs[key] = {"a": a, "c": c, "b": b}
        log(f"  {family} {key}: a {a / 2**20:.0f} MiB, c {c / 2**20:.1f} MiB, b {b:.0f} B/latent px ({time.perf_counter() - t0:.0f}s)")
    return {"params": parameters(models), "activations": coeffs, "fit_resolutions": list(FIT_RES[family]),
            "tiled_fit_resolutions": list(TILED_FIT_RES[family])}  # fmt: skip


def check(family: str, calib: dict[str, Any], log: Any = print) -> list[dict[str, Any]]:
    """Simulation vs model at CHECK_RES for the preset's n, for every variant; relative error."""
    from pycore.spo.memory import activation

    models = Models(family)
    rows = []
    for key, kind, var, fig in variants(family):
        n = preset_n(models.cfg, kind)
        for res in CHECK_RES[family]:
            sim = simulate(models, kind, var, n, res)[fig]
            model = activation(calib[family]["activations"][effective_key(key, res)], n, (res // 8) ** 2)
            rows.append({"family": family, "variant": key, "resolution": res, "n": n, "sim": sim, "model": model,
                         "rel_err": model / sim - 1})  # fmt: skip
            log(f"  {family} {key} {res}²: sim {sim / 2**30:.3f} GiB, model {model / 2**30:.3f} GiB ({100 * (model / sim - 1):+.1f}%)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare the stored calibration with fresh simulations at three resolutions")
    ap.add_argument("--family", choices=("sdxl", "sd15"), action="append", help="only this family (repeatable)")
    ap.add_argument("--only", action="append", help="refit only this variant key (repeatable), keeping the others")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fams = args.family or ["sdxl", "sd15"]
    if args.check:
        calib = json.loads(CALIBRATION_FILE.read_text())
        rows = [r for f in fams for r in check(f, calib)]
        worst = max(rows, key=lambda r: abs(r["rel_err"]))
        print(f"worst: {worst['family']} {worst['variant']} {worst['resolution']}²: {100 * worst['rel_err']:+.1f}%")
        return
    calib = json.loads(CALIBRATION_FILE.read_text()) if CALIBRATION_FILE.exists() else {}
    for f in fams:
        calib[f] = fit(f, only=set(args.only) if args.only else None, coeffs=calib.get(f, {}).get("activations") if args.only else None)
    CALIBRATION_FILE.write_text(json.dumps(calib, indent=1, sort_keys=True) + "\n")
    print(f"wrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
