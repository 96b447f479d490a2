"""Benchmark `hw spo-train` on the CPU at a reduced, SDXL-shaped scale.

    python bench/bench_spo.py [--quick] [--threads 1] [--repeats 5] [--bf16]

Models (random weights, seeded, built from configs in code; nothing is downloaded):

* UNet: the real SDXL UNet architecture (tests.kit.sdxl_arch.UNET: 3 levels, DownBlock2D then two
  cross-attention levels, text_time conditioning, 64-wide attention heads) with the channels cut
  to 64/128/256 (SDXL: 320/640/1280), the transformer depth to 1/2/2 (SDXL: 1/2/10), the
  cross-attention width to 256 and the pooled/time embeddings to 160/32 (SDXL: 2048, 1280, 256);
* text encoders: two CLIP text towers shaped like CLIP-L and bigG (hidden 96 and 160 = 256 for
  the UNet, 2 layers each, bigG's projection 160) with the character-level tiny tokenizer;
* VAE: SDXL's 4-level AutoencoderKL with channels 16/32/64/64 (SDXL: 128/256/512/512);
* SPM: the time-conditioned CLIP of pycore.spm.model (ViT, patch 14 at 224², hidden 128,
  4 layers; PickScore: hidden 1280, 32 layers);
* latents 4 × 32 × 32 (256² images); ``--quick`` uses 4 × 16 × 16, 10 sampling steps and one timed
  step per variant (a smoke test, under 2 minutes).

Every measurement runs in its own subprocess (peak RSS = that process's ru_maxrss from
os.wait4), single-threaded by default (``--threads``), one after another:

1. **Reference model.** One SPO training step (loss + backward + clipping + AdamW step) on a fixed
   batch of train_batch_size transitions (win + lose, CFG: a UNet batch of 8):
   (a) hw — the policy UNet with its peft LoRA, the reference = the same UNet with the adapter
   disabled (pycore.spo.train_step.spo_loss); (b) the official code's way — a frozen deep copy of
   the UNet as the reference, same loss otherwise. The LoRA's B matrices are drawn N(0, 0.02²) so
   policy and reference differ from the first step; the reference log-probabilities and the
   losses of (a) and (b) must be identical (checked). Memory: each variant in its own process
   (RSS once the models are built, peak RSS over a few steps). Time: the variants interleaved
   step by step in one more process, so they share the machine's load (median of ``--repeats``
   rounds after a warm-up round).
2. **Gradient checkpointing**: (a) with ``unet.enable_gradient_checkpointing()``, measured the
   same two ways.
3. **Time split** of one SPO rollout plus the training pass over its transitions, the hw path
   (pycore.spo.sampler.spo_rollout with the real decode + SPM scorer, spm_scorer): sampling =
   rollout time minus the time inside the scorer; decode + score = the time inside the scorer
   (VAE decode of x̂0 + SPM) plus the SPM text embeddings; training = spo_loss, backward,
   clipping and AdamW over the transitions in micro-batches with accumulation. The pair threshold
   is 0 here (every judged pair is trained; random weights rarely pass the official 0.4). Next to
   the measured shares: the FLOP shares of the same batch, counted on the meta device with
   spo_memory_budget.compute_split (which gives the real-SDXL split the same way).
4. **Decoding**: the scorer on the k × batch candidates, batched vs one image at a time
   (``--vae-slicing``): the increase of peak RSS over the process's RSS before the call, and the
   time. ``--bf16`` adds VAE and SPM in bfloat16; on CPUs without AVX512-BF16/AMX PyTorch runs
   bf16 convolutions through its slow reference (im2col) path, whose buffers make bf16 look
   *bigger* than fp32 — a CPU artefact, which is why it is off by default.

CPU figures measure the *relative* cost of the options on this machine; the memory of a real
SDXL run on a GPU is estimated on paper by bench/spo_memory_budget.py. The machine's cores may
be shared with other work: the load average is recorded and the CPU time of every step is
reported next to its wall time.

Output: a markdown table on stdout and in bench/out/spo.md, every figure in bench/out/spo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

#: Prompts of the time-split rollout (any text tokenizes with the tiny tokenizer).
PROMPTS = ["a watercolor painting of a lighthouse at dusk", "a close-up photo of a red fox in the snow",
           "an isometric illustration of a tiny city", "a portrait of an old sailor, dramatic light"]  # fmt: skip

SCALES = {
    "full": dict(latent=32, rounds=5, warmup=1, memory_steps=3, rollouts=1, steps=20, decode_repeats=3),
    "quick": dict(latent=16, rounds=1, warmup=1, memory_steps=1, rollouts=1, steps=10, decode_repeats=1),
}

TE1 = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3, hidden_act="quick_gelu")
TE2 = dict(hidden_size=160, intermediate_size=640, num_hidden_layers=2, num_attention_heads=5, hidden_act="gelu", projection_dim=160)


def unet_config(latent: int) -> dict[str, Any]:
    from tests.kit.sdxl_arch import UNET

    return dict(UNET, sample_size=latent, block_out_channels=[64, 128, 256], transformer_layers_per_block=[1, 2, 2],
                attention_head_dim=[1, 2, 4], cross_attention_dim=TE1["hidden_size"] + TE2["hidden_size"], addition_time_embed_dim=32,
                projection_class_embeddings_input_dim=TE2["projection_dim"] + 6 * 32)  # fmt: skip


def vae_config(latent: int) -> dict[str, Any]:
    from tests.kit.sdxl_arch import VAE

    return dict(VAE, block_out_channels=[16, 32, 64, 64], norm_num_groups=16, sample_size=8 * latent, scaling_factor=0.13025)


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================================ worker side


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count(m: Any) -> int:
    return sum(p.numel() for p in m.parameters())


def build(tmp: str, latent: int, *, unet: bool = True, vae_dtype: str = "float32", spm_dtype: str = "float32") -> dict[str, Any]:
    """The reduced models, seeded (the same weights in every process)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pycore.checks import parse_dtype
    from pycore.spm.model import StepAwarePreferenceModel
    from tests.kit.clip import tiny_clip_config
    from tests.kit.tokenizer import write_tiny_clip_tokenizer

    tok = write_tiny_clip_tokenizer(Path(tmp) / "tok")
    ids = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.eos_token_id)  # fmt: skip
    m: dict[str, Any] = {"tokenizer": tok}
    torch.manual_seed(0)
    if unet:
        m["unet"] = UNet2DConditionModel(**unet_config(latent))
        m["text_encoder"] = CLIPTextModel(CLIPTextConfig(**TE1, **ids)).eval()
        m["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**TE2, **ids)).eval()
    torch.manual_seed(1)
    m["vae"] = AutoencoderKL(**vae_config(latent)).eval().to(parse_dtype(vae_dtype)).requires_grad_(False)
    spm_cfg = tiny_clip_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, hidden=128, layers=4, patch_size=14)
    m["spm"] = StepAwarePreferenceModel.from_config(spm_cfg, tok, seed=2).to(parse_dtype(spm_dtype)).requires_grad_(False)
    return m


def bench_config(latent: int, **over: Any):
    from pycore.spo.config import from_preset

    return from_preset("sdxl", resolution=8 * latent, threshold=0.0, **over)


def encoder_for(m: dict[str, Any], cfg) -> Any:
    from pycore.diffusion.text import PromptEncoder

    return PromptEncoder(m["tokenizer"], m["text_encoder"], m["tokenizer"], m["text_encoder_2"], resolution=cfg.resolution,
                         force_zeros_for_empty_prompt=True)  # fmt: skip


def official_loss(unet: Any, ref: Any, batch: Any, cond: Any, cfg: Any):
    """Variant (b): pycore's loss with the reference log-probabilities from a separate frozen UNet copy (the official code's way)."""
    import torch

    from pycore.diffusion.schedule import NoiseSchedule
    from pycore.spo.losses import spo_dpo_loss
    from pycore.spo.train_step import transition_logprob

    ac = NoiseSchedule().alphas_cumprod()
    x_t = torch.cat([batch.x_t_win, batch.x_t_lose])
    x_next = torch.cat([batch.x_next_win, batch.x_next_lose])
    t = torch.cat([batch.t, batch.t])
    c2 = cond.select(torch.cat([batch.prompt_idx, batch.prompt_idx]))
    with torch.no_grad():
        lp_ref = transition_logprob(ref, x_t, x_next, t, c2, cfg, ac)
    lp = transition_logprob(unet, x_t, x_next, t, c2, cfg, ac)
    n = len(batch)
    return spo_dpo_loss(lp[:n], lp_ref[:n], lp[n:], lp_ref[n:], beta=cfg.beta, clip=cfg.clip_range)


def fixed_batch(unet: Any, cond: Any, cfg: Any, latent: int):
    """train_batch_size transitions at segment timesteps: x_t random, x_next one stochastic DDIM step of the base model."""
    import torch

    from pycore.diffusion.text import cfg_eps
    from pycore.diffusion.schedule import NoiseSchedule, ddim_step, leading_timesteps, sample_prev
    from pycore.spo.sampler import Transitions

    n = cfg.train_batch_size
    g = torch.Generator().manual_seed(3)
    ts = leading_timesteps(cfg.num_inference_steps)[cfg.divert_start_step :][:n]
    t = torch.tensor([ts[i % len(ts)] for i in range(n)])
    idx = torch.arange(n) % len(cond)
    ac = NoiseSchedule().alphas_cumprod()
    xs = {}
    with torch.no_grad():
        for side in ("win", "lose"):
            x_t = torch.randn(n, 4, latent, latent, generator=g)
            st = ddim_step(cfg_eps(unet, x_t, t, cond.select(idx), cfg.guidance_scale), x_t, t, ac, cfg.step_ratio, cfg.eta)
            xs[side] = (x_t, sample_prev(st, g))
    return Transitions(x_t_win=xs["win"][0], x_next_win=xs["win"][1], x_t_lose=xs["lose"][0], x_next_lose=xs["lose"][1], t=t, prompt_idx=idx)


def setup_training(p: dict[str, Any], with_copy: bool) -> dict[str, Any]:
    """Models, conditioning, the fixed batch, (the copy,) the LoRA with random B, AdamW — the same in every process."""
    import copy

    import torch

    from pycore.diffusion.schedule import NoiseSchedule
    from pycore.spo.train_step import adapters_disabled, add_spo_lora, make_optimizer, transition_logprob

    st: dict[str, Any] = {"rss_start": rss_now()}
    with tempfile.TemporaryDirectory() as tmp:
        m = build(tmp, p["latent"])
    st["rss_models"] = rss_now()
    cfg = bench_config(p["latent"])
    unet = m["unet"]
    cond = encoder_for(m, cfg)(PROMPTS[: cfg.train_batch_size])
    batch = fixed_batch(unet, cond, cfg, p["latent"])
    ref = copy.deepcopy(unet).requires_grad_(False) if with_copy else None
    st["rss_with_reference"] = rss_now()
    torch.manual_seed(cfg.seed)
    params = add_spo_lora(unet, cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, prm in unet.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    unet.train()
    st["param_counts"] = {"unet": count(unet) - sum(x.numel() for x in params), "lora": sum(x.numel() for x in params),
                    "text_encoder": count(m["text_encoder"]), "text_encoder_2": count(m["text_encoder_2"]), "vae": count(m["vae"]),
                    "spm": count(m["spm"])}  # fmt: skip
    ac = NoiseSchedule().alphas_cumprod()
    x_t = torch.cat([batch.x_t_win, batch.x_t_lose])
    x_next = torch.cat([batch.x_next_win, batch.x_next_lose])
    tt = torch.cat([batch.t, batch.t])
    c2 = cond.select(torch.cat([batch.prompt_idx, batch.prompt_idx]))
    with torch.no_grad():
        if ref is None:
            with adapters_disabled(unet):
                lp_ref = transition_logprob(unet, x_t, x_next, tt, c2, cfg, ac)
        else:
            lp_ref = transition_logprob(ref, x_t, x_next, tt, c2, cfg, ac)
    st["ref_logprobs"] = lp_ref.tolist()
    st.update(cfg=cfg, unet=unet, ref=ref, params=params, opt=make_optimizer(params, cfg), cond=cond, batch=batch)
    return st


def train_step_timed(st: dict[str, Any], mode: str) -> tuple[float, float, float]:
    """One step — mode 'disabled' (a), 'copy' (b) or 'checkpointing' ((a) with checkpointing): (loss, wall s, CPU s)."""
    from pycore.spo.train_step import clip_gradients, spo_loss

    unet, cfg = st["unet"], st["cfg"]
    if mode == "checkpointing":
        unet.enable_gradient_checkpointing()
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "copy":
        loss, _ = official_loss(unet, st["ref"], st["batch"], st["cond"], cfg)
    else:
        loss, _ = spo_loss(unet, st["batch"], st["cond"], cfg)
    loss.backward()
    clip_gradients(st["params"], cfg.max_grad_norm)
    st["opt"].step()
    st["opt"].zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if mode == "checkpointing":
        unet.disable_gradient_checkpointing()
    return float(loss.detach()), wall, cpu


_KEEP = ("rss_start", "rss_models", "rss_with_reference", "param_counts", "ref_logprobs")


def worker_train(p: dict[str, Any]) -> dict[str, Any]:
    """Memory and correctness of one variant in a clean process: (a) 'disabled', (b) 'copy' or (a) with 'checkpointing'."""
    st = setup_training(p, with_copy=p["mode"] == "copy")
    out = {k: st[k] for k in _KEEP}
    out["rss_ready"] = rss_now()
    out["losses"] = [train_step_timed(st, p["mode"])[0] for _ in range(p["steps"])]
    out.update(rss_end=rss_now(), rss_peak=rss_peak(), unet_batch_with_grad=4 * st["cfg"].train_batch_size)
    return out


def worker_timing(p: dict[str, Any]) -> dict[str, Any]:
    """Step times of (a), (b) and (a) + checkpointing interleaved in one process, so all three see the same machine load."""
    import statistics

    st = setup_training(p, with_copy=True)
    modes = ["disabled", "copy", "checkpointing"]
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in modes}
    for r in range(p["warmup"] + p["rounds"]):
        for mode in modes[r % 3 :] + modes[: r % 3]:  # rotate the order every round
            _, w, c = train_step_timed(st, mode)
            if r >= p["warmup"]:
                times[mode]["wall"].append(w)
                times[mode]["cpu"].append(c)
    return {m: {**t, "wall_median": statistics.median(t["wall"]), "cpu_median": statistics.median(t["cpu"]),
                "wall_min": min(t["wall"])} for m, t in times.items()}  # fmt: skip


class TimedScorer:
    """Wraps a scorer: seconds spent in it (VAE decode + SPM), calls and images."""

    def __init__(self, scorer: Any):
        self.scorer, self.seconds, self.calls, self.images = scorer, 0.0, 0, 0

    def __call__(self, x0: Any, idx: Any, t: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.scorer(x0, idx, t)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.images += int(x0.shape[0])


def worker_split(p: dict[str, Any]) -> dict[str, Any]:
    """One rollout with the real scorer, then one training pass over its transitions (hw path, no accelerator)."""
    import torch

    from pycore.spo.sampler import spm_scorer, spo_rollout
    from pycore.spo.train_step import add_spo_lora, clip_gradients, make_optimizer, spo_loss

    with tempfile.TemporaryDirectory() as tmp:
        m = build(tmp, p["latent"])
    cfg = bench_config(p["latent"], num_inference_steps=p["steps"])
    unet, vae, spm = m["unet"], m["vae"], m["spm"]
    enc = encoder_for(m, cfg)
    torch.manual_seed(cfg.seed)
    params = add_spo_lora(unet, cfg)
    opt = make_optimizer(params, cfg)
    calls = {"n": 0, "samples": 0}

    def count_call(_mod: Any, args: Any) -> None:
        calls["n"] += 1
        calls["samples"] += int(args[0].shape[0])

    unet.register_forward_pre_hook(count_call)
    latent_shape = (4, p["latent"], p["latent"])
    out: dict[str, Any] = {"rollouts": []}
    for r in range(p["rollouts"]):
        prompts = PROMPTS[(r * cfg.sample_batch_size) % len(PROMPTS) :][: cfg.sample_batch_size]
        unet.eval()
        t0 = time.perf_counter()
        cond = enc(prompts)
        t_cond = time.perf_counter() - t0
        t0 = time.perf_counter()
        scorer = TimedScorer(spm_scorer(spm, vae, prompts))
        t_text = time.perf_counter() - t0
        calls.update(n=0, samples=0)
        t0 = time.perf_counter()
        roll = spo_rollout(unet, cond, scorer, cfg, latent_shape, torch.Generator().manual_seed(5 + r))
        t_roll = time.perf_counter() - t0
        sample_calls = dict(calls)
        tr = roll.transitions
        calls.update(n=0, samples=0)
        unet.train()
        t0 = time.perf_counter()
        chunks = list(torch.arange(len(tr)).split(cfg.train_batch_size))
        steps = 0
        for c, idx in enumerate(chunks):
            loss, _ = spo_loss(unet, tr.index(idx), cond, cfg)
            (loss / cfg.gradient_accumulation_steps).backward()
            if (c + 1) % cfg.gradient_accumulation_steps == 0 or c == len(chunks) - 1:
                clip_gradients(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
        t_train = time.perf_counter() - t0
        out["rollouts"].append({
            "prompts": len(prompts), "encode_prompts": t_cond, "rollout": t_roll, "scorer": scorer.seconds, "spm_text": t_text,
            "sampling": t_roll - scorer.seconds, "decode_score": scorer.seconds + t_text, "training": t_train,
            "unet_calls_sampling": sample_calls["n"], "unet_samples_sampling": sample_calls["samples"],
            "scorer_calls": scorer.calls, "images_scored": scorer.images, "transitions": len(tr), "micro_steps": len(chunks),
            "optimizer_steps": steps, "unet_calls_training": calls["n"], "unet_samples_training": calls["samples"],
            "acceptance": roll.stats.acceptance_rate,
        })  # fmt: skip
    out["rss_peak"] = rss_peak()
    return out


def worker_decode(p: dict[str, Any]) -> dict[str, Any]:
    """The scorer (decode + SPM) on k × batch candidates: batched or one image at a time; fp32 or bf16."""
    import torch

    from pycore.spo.sampler import spm_scorer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        m = build(tmp, p["latent"], unet=False, vae_dtype=p["dtype"], spm_dtype=p["dtype"])
    cfg = bench_config(p["latent"])
    n = cfg.num_candidates * cfg.sample_batch_size
    prompts = PROMPTS[: cfg.sample_batch_size]
    scorer = spm_scorer(m["spm"], m["vae"], prompts, decode_batch_size=1 if p["sliced"] else None)
    x0 = torch.randn(n, 4, p["latent"], p["latent"], generator=torch.Generator().manual_seed(6))
    idx = torch.arange(n) % cfg.sample_batch_size
    ts = torch.full((n,), 551)
    out = {"images": n, "weights_bytes": sum(x.numel() * x.element_size() for mod in (m["vae"], m["spm"]) for x in mod.parameters()),
           "rss_before": rss_now(), "peak_before": rss_peak()}  # fmt: skip
    t0 = time.perf_counter()
    scores = scorer(x0, idx, ts)
    out["first_call"] = time.perf_counter() - t0
    out["peak_after_first"] = rss_peak()
    times = []
    for _ in range(p["repeats"]):
        t0 = time.perf_counter()
        scorer(x0, idx, ts)
        times.append(time.perf_counter() - t0)
    out.update(seconds=sum(times) / len(times) if times else out["first_call"], scores=scores.float().tolist(), rss_peak=rss_peak())
    out["peak_increase"] = out["peak_after_first"] - max(out["rss_before"], out["peak_before"])
    return out


WORKERS = {"train": worker_train, "timing": worker_timing, "split": worker_split, "decode": worker_decode}


def worker_main(spec: str) -> None:
    p = json.loads(spec)
    import torch

    torch.set_num_threads(p["threads"])
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    res = WORKERS[p["task"]](p)
    print(json.dumps(res))


# ============================================================================================ parent side


def run_worker(p: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh process; its ru_maxrss comes from os.wait4."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(p)]
    env = dict(os.environ, OMP_NUM_THREADS=str(p["threads"]), MKL_NUM_THREADS=str(p["threads"]), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO))
        _, status, ru = os.wait4(proc.pid, 0)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(), fe.read().decode()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"worker {p['task']} failed ({rc}):\n{err[-4000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(process_seconds=time.perf_counter() - t0, process_peak_rss=ru.ru_maxrss * 1024, load_before=load,
               cpu_seconds=ru.ru_utime + ru.ru_stime)  # fmt: skip
    return res


def reduced_flops(latent: int, steps: int) -> dict[str, Any]:
    """FLOPs of the time-split batch with the reduced models, counted on the meta device (spo_memory_budget.compute_split)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel

    import spo_memory_budget as budget
    from pycore.spm.model import StepAwarePreferenceModel, TimeConditionedCLIP
    from pycore.spo.train_step import add_spo_lora
    from tests.kit.clip import tiny_clip_config

    cfg = bench_config(latent, num_inference_steps=steps)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(latent))
        vae = AutoencoderKL(**vae_config(latent))
        clip = CLIPModel(tiny_clip_config(514, bos_token_id=512, eos_token_id=513, hidden=128, layers=4, patch_size=14))  # the tiny tokenizer's ids
        spm = StepAwarePreferenceModel(TimeConditionedCLIP(clip), None)
    params = add_spo_lora(unet, cfg)
    return budget.compute_split(unet, params, vae, spm, cfg, (4, latent, latent), autocast=None, acceptance=1.0)


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller latents (16²), 10 sampling steps, one timed step: a smoke run in under 2 minutes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every measured process (1 keeps timings steady on a shared machine)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (one step of each variant) after the warm-up round (default 5; --quick 1)")
    ap.add_argument("--bf16", action="store_true", help="also decode + score in bfloat16 (slow without AVX512-BF16/AMX: PyTorch then uses its "
                    "reference im2col convolution, whose buffers also inflate the memory figure)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    scale = dict(SCALES["quick" if args.quick else "full"])
    if args.repeats is not None:
        scale["rounds"] = max(1, args.repeats)
    base = {"threads": args.threads, "latent": scale["latent"]}
    t_all = time.perf_counter()
    import torch

    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "full", "scale": scale,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "load_average_at_start": os.getloadavg(), "platform": platform.platform()},
        "unet_config": unet_config(scale["latent"]), "vae_config": vae_config(scale["latent"]), "text_encoders": [TE1, TE2],
    }  # fmt: skip
    tr = {"task": "train", "steps": scale["memory_steps"], **base}
    runs = [
        ("a_disabled", {**tr, "mode": "disabled"}, "memory: (a) hw, reference = LoRA disabled"),
        ("b_copy", {**tr, "mode": "copy"}, "memory: (b) official, reference = frozen UNet copy"),
        ("a_checkpointing", {**tr, "mode": "checkpointing"}, "memory: (a) + gradient checkpointing"),
        ("timing", {"task": "timing", "warmup": scale["warmup"], "rounds": scale["rounds"], **base}, "step times, (a) (b) (a)+checkpointing interleaved"),
        ("split", {"task": "split", "rollouts": scale["rollouts"], "steps": scale["steps"], **base}, "time split"),
    ]
    for dt in ["float32"] + (["bfloat16"] if args.bf16 else []):
        for sliced in (False, True):
            runs.append((f"decode_{dt}_{'sliced' if sliced else 'batched'}",
                         {"task": "decode", "dtype": dt, "sliced": sliced, "repeats": scale["decode_repeats"] if dt == "float32" else 0, **base},
                         f"decode + score, {dt}, {'one image at a time' if sliced else 'batched'}"))  # fmt: skip
    try:
        for key, spec, label in runs:
            log(f"{label} …")
            res[key] = run_worker(spec)
            r = res[key]
            brief = {k: r[k] for k in ("process_peak_rss", "rss_models", "rss_with_reference", "rss_ready", "losses", "peak_increase",
                                       "seconds") if k in r}  # fmt: skip
            if key == "timing":
                brief = {m: (round(v["wall_median"], 2), round(v["cpu_median"], 2)) for m, v in r.items() if isinstance(v, dict)}
            log(f"  {brief}  ({r['process_seconds']:.0f} s, load {r['load_before']:.2f})")
        a, b = res["a_disabled"], res["b_copy"]
        res["checks"] = {
            "ref_logprobs_identical": a["ref_logprobs"] == b["ref_logprobs"],
            "first_loss_identical": a["losses"][0] == b["losses"][0],
            "all_losses_identical": a["losses"] == b["losses"],
            "max_loss_difference": max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)),
            "checkpointing_same_losses": max(abs(x - y) for x, y in zip(a["losses"], res["a_checkpointing"]["losses"], strict=True)),
        }
        log(f"checks: {res['checks']}")
        log("FLOPs of the measured SPO batch (meta device) …")
        res["flops"] = reduced_flops(scale["latent"], scale["steps"])
        if not (res["checks"]["ref_logprobs_identical"] and res["checks"]["first_loss_identical"]):
            raise SystemExit(f"the adapter-disabled reference differs from the UNet copy: {res['checks']}")
    finally:
        res["total_seconds"] = round(time.perf_counter() - t_all, 1)
        res["machine"]["load_average_at_end"] = os.getloadavg()
        out = REPO / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "spo.json").write_text(json.dumps(res, indent=2, default=str))
    report(res)


def report(res: dict[str, Any]) -> None:
    a, b, ck, sp = res["a_disabled"], res["b_copy"], res["a_checkpointing"], res["split"]
    pa = a["param_counts"]
    mc = res["machine"]
    lat = res["scale"]["latent"]
    lines = [
        f"## `hw spo-train` on the CPU, reduced SDXL-shaped scale ({res['mode']} run: latents 4×{lat}×{lat}, {8 * lat}² images)",
        "",
        *(["**Quick run: a smoke test with one timed step per variant; its timings are not for comparison.**", ""] if res["mode"] == "quick" else []),
        f"{mc['cpus']} CPUs shared with other work (load average {mc['load_average_at_start'][0]:.2f} at start, "
        f"{mc['load_average_at_end'][0]:.2f} at end), {mc['threads']} torch thread(s), torch {mc['torch']}. "
        f"Parameters: UNet {pa['unet']:,} (SDXL: 2,567,463,684), LoRA rank 64 {pa['lora']:,}, text encoders "
        f"{pa['text_encoder']:,} + {pa['text_encoder_2']:,}, VAE {pa['vae']:,}, SPM {pa['spm']:,} (float32). "
        f"A worker process holds {mb(a['rss_start'])} MiB after importing torch, diffusers and transformers, before any model.",
        "",
        f"| one training step (train batch 2 pairs: UNet batch {a['unet_batch_with_grad']} with gradients + the reference) "
        "| step wall s (median) | step CPU s (median) | RSS with models | peak RSS | peak − RSS before the steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    tm = res["timing"]
    for r, mode, label in ((a, "disabled", "(a) hw: reference = the policy with its LoRA disabled"),
                           (b, "copy", "(b) official: reference = a frozen deep copy of the UNet"),
                           (ck, "checkpointing", "(a) + gradient checkpointing")):  # fmt: skip
        lines.append(f"| {label} | {tm[mode]['wall_median']:.2f} | {tm[mode]['cpu_median']:.2f} | {mb(r['rss_with_reference'])} MiB | "
                     f"{mb(r['process_peak_rss'])} MiB | {mb(r['process_peak_rss'] - r['rss_ready'])} MiB |")  # fmt: skip
    copy_bytes = pa["unet"] * 4
    lines += [
        "",
        f"(b) holds {mb(b['rss_with_reference'] - a['rss_with_reference'])} MiB more once the models are built (the copy's fp32 weights are "
        f"{mb(copy_bytes)} MiB) and peaks {mb(b['process_peak_rss'] - a['process_peak_rss'])} MiB higher; its step time differs from (a)'s by "
        f"{100 * (tm['copy']['wall_median'] / tm['disabled']['wall_median'] - 1):+.1f}% (the same reference forward either way). Gradient "
        f"checkpointing lowers the peak by {mb(a['process_peak_rss'] - ck['process_peak_rss'])} MiB and costs "
        f"{100 * (tm['checkpointing']['wall_median'] / tm['disabled']['wall_median'] - 1):+.0f}% step time. Step times: median of "
        f"{len(tm['disabled']['wall'])} round(s) after a warm-up round, the three variants interleaved in one process (same load); memory: each "
        f"variant in its own process, {len(a['losses'])} steps. Checks: reference log-probabilities of (a) and (b) identical: {res['checks']['ref_logprobs_identical']}; first-step "
        f"loss identical: {res['checks']['first_loss_identical']} ({a['losses'][0]:.6f}); all {len(a['losses'])} losses identical: "
        f"{res['checks']['all_losses_identical']}; the same losses with checkpointing: {res['checks']['checkpointing_same_losses'] == 0}.",
        "",
    ]
    r0 = sp["rollouts"][0]
    tot = r0["sampling"] + r0["decode_score"] + r0["training"]
    fl = res.get("flops", {}).get("flops")
    fs = {}
    if fl:
        ftot = fl["sampling"] + fl["decode"] + fl["spm"] + fl["training"]
        fs = {"sampling": fl["sampling"] / ftot, "decode_score": (fl["decode"] + fl["spm"]) / ftot, "training": fl["training"] / ftot}

    def share(k: str) -> str:
        return f"{100 * fs[k]:.0f}%" if k in fs else "—"

    lines += [
        f"| one SPO batch ({r0['prompts']} prompts, k = 2, {res['scale']['steps']} steps; threshold 0: {r0['transitions']} transitions trained) "
        "| seconds | share | FLOP share | work |",
        "|---|---:|---:|---:|---|",
        f"| sampling (UNet calls in spo_rollout) | {r0['sampling']:.1f} | {100 * r0['sampling'] / tot:.0f}% | {share('sampling')} | "
        f"{r0['unet_calls_sampling']} UNet calls, {r0['unet_samples_sampling']} samples |",
        f"| decode + score (VAE decode of x̂0 + SPM) | {r0['decode_score']:.1f} | {100 * r0['decode_score'] / tot:.0f}% | {share('decode_score')} | "
        f"{r0['scorer_calls']} call(s), {r0['images_scored']} images |",
        f"| training (spo_loss + backward + AdamW) | {r0['training']:.1f} | {100 * r0['training'] / tot:.0f}% | {share('training')} | "
        f"{r0['micro_steps']} micro-steps, {r0['optimizer_steps']} optimizer steps, {r0['unet_calls_training']} UNet calls |",
        "",
        "| decode + score of the k × batch candidates | seconds | peak RSS increase | VAE + SPM weights |",
        "|---|---:|---:|---:|",
    ]
    for k in sorted(x for x in res if x.startswith("decode_")):
        d = res[k]
        dt, mode = k.split("_")[1:]
        lines.append(f"| {d['images']} images, {dt}, {'one at a time (--vae-slicing)' if mode == 'sliced' else 'batched'} | {d['seconds']:.2f} | "
                     f"{mb(d['peak_increase'])} MiB | {mb(d['weights_bytes'])} MiB |")  # fmt: skip
    lines += ["", f"Total benchmark time {res['total_seconds']} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "bench" / "out" / "spo.md").write_text(text)


if __name__ == "__main__":
    main()
