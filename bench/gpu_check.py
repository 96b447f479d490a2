"""Measured CUDA memory of one SDXL-shaped SPO step per planned option set, next to `--plan`'s figure.

    bash bench/gpu_check.sh                 # on a machine with a CUDA card: a few minutes, no downloads
    bash bench/gpu_check.sh --cpu --tiny    # the same code path on tiny models on the CPU (tests keep it working)

For each card size (80/24/16/12 GiB, or --cards) it takes the option set `--memory auto` plans
(pycore.spo.memory.plan), builds the models with **random weights** from the published SDXL
architecture (UNet, VAE, a PickScore-shaped SPM; prompt embeddings are random tensors, as with
cached embeddings the text encoders are not on the card), and runs, on the device:

1. one rollout UNet call on k × batch latents (CFG) under autocast,
2. the decode of the k × batch candidates' x̂0 and their SPM scores, outside autocast,
3. one training micro-step (reference and policy forward, backward) through pycore.spo.train_step.spo_loss,

reporting ``torch.cuda.max_memory_allocated`` per phase (weights included) beside the plan's
phase totals. Then the fp16/bf16 scorer agreement: the same decoded images scored by the SPM in
float32 (official), float16 and bfloat16 — the largest score difference and how many pair
decisions at the preset's threshold flip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pycore.spo.config import SPOConfig, from_preset  # noqa: E402

GiB = 2**30


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights straight on ``device`` in ``dtype`` (no fp32 copy on the card): meta or CPU module → empty
    storage → weights N(0, 0.02), biases 0, 1-D scales 1, position ids rebuilt."""
    module.to(dtype=dtype)
    module.to_empty(device=device)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif p.ndim == 0:  # CLIP's logit_scale
                    p.fill_(4.6052)
                elif p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
            for name, b in mod.named_buffers(recurse=False):
                if "position_ids" in name:
                    b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
                elif b.is_floating_point():
                    b.zero_()
    return module.requires_grad_(False)


def build(cfg: SPOConfig, tiny: bool, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Random-weight UNet (half), VAE and SPM (their dtypes); SDXL's architecture (built on the meta device, then
    materialized on the card) or the tiny test models (through the same materialization)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    from pycore.spm.model import StepAwarePreferenceModel, TimeConditionedCLIP

    half = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16 if device.type == "cuda" else torch.float32
    if tiny:
        from tests.kit.clip import tiny_spm_config
        from tests.kit.tokenizer import write_tiny_clip_tokenizer
        from tests.kit.diffusion import build_tiny_models

        m = build_tiny_models(tmp / "tok", sdxl=True, seed=0)
        unet, vae = m.unet, m.vae
        tok = write_tiny_clip_tokenizer(tmp / "spm_tok")
        spm = StepAwarePreferenceModel.from_config(tiny_spm_config(tok), tok, seed=0)
    else:
        from tests.kit.sdxl_arch import UNET, VAE

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from spo_memory_budget import PICKSCORE, VAE_EXTRA

        with torch.device("meta"):
            unet = UNet2DConditionModel(**UNET)
            vae = AutoencoderKL(**VAE, **VAE_EXTRA)
            spm = StepAwarePreferenceModel(TimeConditionedCLIP(CLIPModel(CLIPConfig(**PICKSCORE))), tokenizer=None)
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    materialize(unet, device, half)
    materialize(vae, device, dt.get(cfg.vae_dtype, torch.float32))
    materialize(spm, device, dt.get(cfg.spm_dtype, torch.float32))
    return {"unet": unet, "vae": vae, "spm": spm.eval(), "half": half}


def conditioning(unet: Any, n: int, device: torch.device, resolution: int) -> Any:
    from pycore.diffusion.text import Conditioning, sdxl_time_ids

    c = unet.config
    d = c.cross_attention_dim
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = torch.Generator().manual_seed(0)
    return Conditioning(embeds=torch.randn(n, 77, d, generator=g).to(device), neg_embeds=torch.zeros(1, 77, d, device=device),
                        pooled=torch.randn(n, pooled, generator=g).to(device), neg_pooled=torch.zeros(1, pooled, device=device),
                        time_ids=sdxl_time_ids(resolution, resolution, n).to(device))  # fmt: skip


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GiB


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _move(modules: Any, to: torch.device, device: torch.device) -> float:
    """Move ``modules`` to ``to``; the seconds it took (synchronised on CUDA)."""
    t0 = time.perf_counter()
    for mod in modules:
        mod.to(to)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return round(time.perf_counter() - t0, 3)


def run_option_set(cfg: SPOConfig, tiny: bool, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Build, add the LoRA, run the three phases; measured peaks (GiB; None on the CPU) and the images for the agreement check."""
    from pycore.diffusion.schedule import NoiseSchedule, ddim_step
    from pycore.diffusion.vae import decode_latents
    from pycore.spo.sampler import Transitions
    from pycore.spo.train_step import add_spo_lora, make_optimizer, spo_loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
    m = build(cfg, tiny, device, tmp)
    unet = m["unet"]
    params = add_spo_lora(unet, cfg)
    opt = make_optimizer(params, cfg)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.vae_tiling:
        m["vae"].enable_tiling()
        factor = 2 ** (len(m["vae"].config.block_out_channels) - 1)
        m["vae"].tile_sample_min_size, m["vae"].tile_latent_min_size = 512, 512 // factor
    scale = 2 ** (len(m["vae"].config.block_out_channels) - 1)
    latent = (4, cfg.resolution // scale, cfg.resolution // scale)
    nk = cfg.sample_batch_size * cfg.num_candidates
    cond = conditioning(unet, nk, device, cfg.resolution)
    ac = NoiseSchedule().alphas_cumprod()
    auto = torch.autocast(device.type, dtype=m["half"], enabled=m["half"] != torch.float32)
    out: dict[str, Any] = {}
    x = torch.randn(nk, *latent, device=device)
    _reset(device)
    from pycore.diffusion.text import cfg_eps

    with torch.no_grad(), auto:
        eps = cfg_eps(unet, x, 551, cond, cfg.guidance_scale)
    out["rollout"] = _peak(device)
    x0 = ddim_step(eps.float(), x, 551, ac, cfg.step_ratio, cfg.eta).pred_original_sample
    del eps
    _reset(device)
    with torch.no_grad():
        images = decode_latents(m["vae"], x0, batch_size=1 if cfg.vae_slicing else None).float().clamp(-1, 1)
        scores = m["spm"].score(images, [""] * nk, torch.full((nk,), 551, device=device),
                                text_embeds=torch.nn.functional.normalize(torch.randn(nk, m["spm"].model.config.projection_dim), dim=-1).to(device))  # fmt: skip
    out["decode + score"] = _peak(device)
    out["scores_finite"] = bool(torch.isfinite(scores).all())
    if cfg.offload_scorer:  # as pycore.spo.trainer: the SPM and the VAE leave the card for the training micro-steps
        out["offload_seconds"] = _move((m["spm"], m["vae"]), torch.device("cpu"), device)
    n = cfg.train_batch_size
    tr = Transitions(x[:n], x[:n] * 0.99, x[n : 2 * n] if nk >= 2 * n else x[:n], x[:n] * 0.98, torch.full((n,), 551, device=device),
                     torch.arange(n, device=device) % nk)  # fmt: skip
    _reset(device)
    unet.train()
    with auto:
        loss, _ = spo_loss(unet, tr, cond, cfg)
    loss.backward()
    out["training micro-step"] = _peak(device)
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["loss_finite"] = bool(torch.isfinite(loss))
    if cfg.offload_scorer:  # and come back for the next rollout: the PCIe cost of the rung, per prompt batch
        out["reload_seconds"] = _move((m["spm"], m["vae"]), device, device)
    del m, unet, params, opt, cond, x, x0, loss
    return {"measured": out, "images": images.cpu()}


def scorer_agreement(images: torch.Tensor, cfg: SPOConfig, tiny: bool, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Scores of the same images with the SPM in float32, float16 and bfloat16 (same random weights)."""
    res: dict[str, Any] = {}
    ref = None
    n = images.shape[0]
    for dt in ("float32", "float16", "bfloat16"):
        if dt == "float16" and device.type == "cpu":
            continue  # half-precision convolutions/matmuls are a CUDA feature here
        spm = build(cfg.replace(spm_dtype=dt), tiny, device, tmp)["spm"]
        proj = spm.model.config.projection_dim
        t = torch.nn.functional.normalize(torch.randn(n, proj, generator=torch.Generator().manual_seed(1)), dim=-1).to(device)
        with torch.no_grad():
            s = spm.score(images.to(device), [""] * n, torch.zeros(n, dtype=torch.long, device=device), text_embeds=t).float().cpu()
        if ref is None:
            ref = s
            continue
        k = cfg.num_candidates
        flips = 0
        if n % k == 0:
            from pycore.spo.losses import select_pairs

            a, b = select_pairs(ref.view(-1, k), cfg.threshold), select_pairs(s.view(-1, k), cfg.threshold)
            flips = int((a.keep != b.keep).sum() + ((a.win != b.win) & a.keep & b.keep).sum())
        res[dt] = {"max_abs_diff": float((s - ref).abs().max()), "pair_decisions_changed": flips, "pairs": n // k}
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (no memory figures; checks the code path)")
    ap.add_argument("--tiny", action="store_true", help="tiny test models instead of SDXL's architecture (with --cpu: seconds)")
    ap.add_argument("--cards", default="80,24,16,12", help="card sizes in GiB to plan and measure (comma-separated)")
    ap.add_argument("--resolution", type=int, default=None, help="default 1024 (16 with --tiny)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    from pycore.spo.memory import MemoryError_, plan

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    tmp = Path(__file__).resolve().parent / "out" / "gpu_check_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    res = args.resolution or (16 if args.tiny else 1024)
    base = from_preset("sdxl", resolution=res if not args.tiny else 1024)  # tiny models run the option sets planned for SDXL at 1024²
    rows = []
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, SDXL-shaped at {res}², "
          f"{'tiny models' if args.tiny else 'random SDXL weights'}")  # fmt: skip
    images = None
    for card in [float(c) for c in args.cards.split(",")]:
        try:
            p = plan(base, card)
        except MemoryError_ as e:
            print(f"{card:g} GiB: {e}")
            continue
        cfg = p.config.replace(resolution=res)
        if device.type != "cuda":  # CPU autocast is bf16; the VAE and SPM stay float32 there
            cfg = cfg.replace(mixed_precision="bf16", vae_dtype="float32", spm_dtype="float32")
        t0 = time.perf_counter()
        r = run_option_set(cfg, args.tiny, device, tmp)
        images = r["images"] if images is None else images
        row = {"card_gib": card, "chosen": p.steps, "plan_gib": {k: round(v / GiB, 2) for k, v in p.estimate.phases.items()},
               "measured_gib": r["measured"], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        rows.append(row)
        meas = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["measured"].items())
        print(f"{card:g} GiB card — {', '.join(p.steps) or 'no memory-saving options'}: plan {row['plan_gib']}; measured {meas}")
    agree = scorer_agreement(images, base, args.tiny, device, tmp) if images is not None else {}
    print(f"SPM score agreement with float32 on {0 if images is None else images.shape[0]} images: {agree}")
    result = {"device": str(device), "resolution": res, "tiny": args.tiny, "rows": rows, "scorer_agreement": agree}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
