"""Training the step-aware preference model on preference pairs (``hw spm-train``).

The noising procedure of the SPO paper: for each pair draw t ~ U{0..T-1}; VAE-encode both images,
add the *same* noise at t; the frozen base diffusion model (SD1.5 or SDXL, diffusers) predicts ε with
classifier-free guidance; x̂0 (DDIM's pred_original_sample) is decoded and scored at t. Loss:
PickScore's 2-way cross-entropy over (score_0, score_1) with ties as 0.5/0.5. Optionally the labels
come from a frozen plain scorer on the clean images (win if p_w − p_l > margin, else tie), as the
SDXL SPM did. accelerate handles devices, mixed precision, gradient accumulation and multi-GPU;
checkpoints resume; accuracy is evaluated at fixed timesteps and written to ``report.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pycore.errors import HwError
from pycore.spo.preference import DEFAULT_BASE, EVAL_TIMESTEPS

MODEL_TYPES = ("auto", "sd15", "sdxl")
MIXED = ("no", "fp16", "bf16")


@dataclass
class SPMTrainConfig:
    """Everything `hw spm-train` needs; stored in every checkpoint and in the report."""

    pairs: str  #: pairs table (Pick-a-Pic Parquet or manifest form), or a folder of Parquet shards
    out: str  #: output folder: the final model (hw SPM folder), report.json, checkpoints/
    base_model: str  #: frozen diffusion model (diffusers folder or hub name): SD1.5 or SDXL
    init: str = DEFAULT_BASE  #: SPM or plain CLIP/PickScore to start from (hub name or path)
    init_base: str | None = None  #: CLIP config for a released .bin given as --init
    processor: str | None = None  #: tokenizer source (default: the init model's, else laion ViT-H/14)
    model_type: str = "auto"  #: sd15 | sdxl | auto (from the pipeline's class)
    vae: str | None = None  #: a replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)
    val: str | None = None  #: a separate validation pairs table; else --val-fraction of the prompts
    val_fraction: float = 0.05
    max_val_pairs: int | None = 500
    prompt_column: str | None = None  #: override the caption/prompt column name
    resolution: int | None = None  #: VAE resolution (default 512 for SD1.5, 1024 for SDXL)
    cfg_scale: float = 5.0
    batch_size: int = 4  #: pairs per device per micro-step
    grad_accum: int = 1
    max_steps: int = 8000  #: optimizer steps
    lr: float = 3e-6
    weight_decay: float = 0.3
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  #: no | fp16 | bf16 (autocast around the SPM; fp32 master weights)
    base_dtype: str = "auto"  #: frozen diffusion model dtype: auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    label_scorer: str | None = None  #: plain scorer whose labels replace the data's (e.g. yuvalkirstain/PickScore_v1)
    label_margin: float = 0.1
    eval_every: int = 500
    eval_timesteps: tuple[int, ...] = EVAL_TIMESTEPS
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    gradient_checkpointing: bool = False
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    cpu: bool = False  #: force CPU even when a GPU is present
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise HwError(f"model type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")
        if self.mixed_precision not in MIXED:
            raise HwError(f"mixed precision must be one of {', '.join(MIXED)}, got {self.mixed_precision!r}")
        if self.base_dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise HwError(f"base dtype must be auto, fp32, fp16 or bf16, got {self.base_dtype!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise HwError(f"{name.replace('_', '-')} must be at least 1")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise HwError("warmup-steps and num-workers must not be negative")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise HwError("lr must be a positive number")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.cfg_scale < 0:
            raise HwError("weight-decay, max-grad-norm and cfg-scale must not be negative")
        if not 0.0 < self.val_fraction < 1.0 and self.val is None:
            raise HwError("val-fraction must be between 0 and 1 (exclusive)")
        if self.max_val_pairs is not None and self.max_val_pairs < 1:
            raise HwError("max-val-pairs must be at least 1")
        if not 0.0 <= self.label_margin < 1.0:
            raise HwError("label-margin must be in [0, 1)")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise HwError("resolution must be a positive multiple of 8")
        ts = tuple(int(t) for t in self.eval_timesteps)
        if not ts or any(t < 0 or t > 999 for t in ts):
            raise HwError("eval timesteps must be integers in 0..999")
        self.eval_timesteps = ts
        if self.resume and self.overwrite:
            raise HwError("--resume and --overwrite exclude each other")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_timesteps"] = list(self.eval_timesteps)
        return d


# ----------------------------------------------------------------------------------- pure functions


def pair_loss(score_0, score_1, label_0):
    """PickScore's 2-way cross-entropy, mean over pairs; ties (0.5) have minimum 0 (log 0.5 added)."""
    import torch

    logp = torch.log_softmax(torch.stack([score_0.float(), score_1.float()], dim=-1), dim=-1)
    lab0 = label_0.to(logp)
    loss = -(lab0 * logp[:, 0] + (1 - lab0) * logp[:, 1])
    loss = loss + (lab0 == 0.5).to(logp) * math.log(0.5)
    return loss.mean()


def pair_correct(score_0, score_1, label_0):
    """Per pair: (decided, correct) — ties in the label are not decided and never count."""
    decided = label_0 != 0.5
    correct = ((score_0 > score_1) & (label_0 == 1)) | ((score_0 < score_1) & (label_0 == 0))
    return decided, correct & decided


def margin_labels(score_0, score_1, margin: float):
    """Labels from a plain scorer: 1 if p0 − p1 > margin, 0 if p1 − p0 > margin, else 0.5 (tie)."""
    import torch

    p = torch.softmax(torch.stack([score_0.float(), score_1.float()], dim=-1), dim=-1)
    lab = torch.full_like(p[:, 0], 0.5)
    lab[p[:, 0] - p[:, 1] > margin] = 1.0
    lab[p[:, 1] - p[:, 0] > margin] = 0.0
    return lab


def pred_original_sample(model_output, sample, timesteps, alphas_cumprod, prediction_type: str = "epsilon"):
    """DDIM's x̂0 for per-sample timesteps (fp32), for ε-, v- or sample-prediction models."""
    a = alphas_cumprod.to(sample.device)[timesteps.to(sample.device)].float().view(-1, 1, 1, 1)
    x, m = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * m) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * m
    if prediction_type == "sample":
        return m
    raise HwError(f"unsupported prediction type {prediction_type!r}")


# ------------------------------------------------------------------------------------ base diffusion


class BaseDiffusion:
    """The frozen SD1.5 / SDXL pieces the noising needs: VAE, UNet, text encoders, noise schedule."""

    def __init__(self, kind, unet, vae, text_encoders, tokenizers, scheduler, *, force_zeros: bool, resolution: int):
        self.kind = kind
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = text_encoders, tokenizers
        self.scheduler = scheduler
        self.force_zeros = force_zeros
        self.resolution = resolution
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type

    @classmethod
    def load(cls, name: str, *, model_type: str = "auto", vae: str | None = None, resolution: int | None = None,
             dtype=None, device=None) -> BaseDiffusion:  # fmt: skip
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        local = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        try:
            index = DiffusionPipeline.load_config(name, local_files_only=local)
        except Exception as e:
            raise HwError(f"cannot load diffusion model {name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        cls_name = index.get("_class_name", "")
        kind = model_type
        if kind == "auto":
            kind = "sdxl" if "XL" in cls_name or "text_encoder_2" in index else "sd15"
        if kind == "sdxl" and "text_encoder_2" not in index:
            raise HwError(f"{name} is not an SDXL pipeline (no text_encoder_2)")
        dtype = dtype or torch.float32
        kw = dict(local_files_only=local)
        try:
            unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=dtype, **kw)
            if vae:
                vae_m = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype, **kw)
            else:
                vae_m = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=dtype, **kw)
            tok = [CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)]
            enc = [CLIPTextModel.from_pretrained(name, subfolder="text_encoder", torch_dtype=dtype, **kw)]
            if kind == "sdxl":
                tok.append(CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw))
                enc.append(CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", torch_dtype=dtype, **kw))
            sched = DDIMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
        except (OSError, ValueError) as e:
            raise HwError(f"cannot load the {kind} components of {name}: {str(e).strip().splitlines()[0]}") from None
        for m in [unet, vae_m, *enc]:
            m.requires_grad_(False).eval()
            if device is not None:
                m.to(device)
        res = resolution or (1024 if kind == "sdxl" else 512)
        return cls(kind, unet, vae_m, enc, tok, sched, force_zeros=bool(index.get("force_zeros_for_empty_prompt", True)), resolution=res)

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    def _ids(self, tok, prompts):
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)  # fmt: skip

    def encode_prompts(self, prompts: list[str]) -> dict[str, Any]:
        """Conditional and unconditional UNet inputs for CFG (uncond first)."""
        import torch

        n = len(prompts)
        if self.kind == "sd15":
            enc, tok = self.text_encoders[0], self.tokenizers[0]
            cond = enc(self._ids(tok, prompts))[0]
            uncond = enc(self._ids(tok, [""]))[0].expand(n, -1, -1)
            return {"hidden": torch.cat([uncond, cond]), "added": None}

        def sdxl(ps):
            hs, pooled = [], None
            for enc, tok in zip(self.text_encoders, self.tokenizers, strict=True):
                out = enc(self._ids(tok, ps), output_hidden_states=True)
                hs.append(out.hidden_states[-2])
                pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
            return torch.cat(hs, dim=-1), pooled

        cond, pooled = sdxl(prompts)
        if self.force_zeros:
            uncond, upooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            uncond, upooled = sdxl([""])
            uncond, upooled = uncond.expand(n, -1, -1), upooled.expand(n, -1)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=self.device, dtype=cond.dtype).repeat(2 * n, 1)
        return {"hidden": torch.cat([uncond, cond]), "added": {"text_embeds": torch.cat([upooled, pooled]), "time_ids": time_ids}}

    def encode_images(self, pixels, generator=None):
        lat = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * self.vae.config.scaling_factor

    def noisy_predictions(self, pixels_0, pixels_1, prompts, timesteps, cfg_scale: float, generator=None):
        """The SPO noising: same noise on both images at t, CFG ε, x̂0 decoded → two image batches in [-1, 1]."""
        import torch

        from pycore.spo.preference import decode_latents

        n = len(prompts)
        lat = self.encode_images(torch.cat([pixels_0, pixels_1]), generator)
        noise = torch.randn(lat[:n].shape, generator=generator, device=lat.device, dtype=lat.dtype)
        noise = torch.cat([noise, noise])
        t2 = torch.cat([timesteps, timesteps]).to(self.device)
        x_t = _add_noise(lat, noise, t2, self.scheduler.alphas_cumprod)
        emb = self.encode_prompts(prompts)
        # UNet batch: [uncond img0, uncond img1, cond img0, cond img1]
        hidden = torch.cat([emb["hidden"][:n], emb["hidden"][:n], emb["hidden"][n:], emb["hidden"][n:]])
        added = None
        if emb["added"] is not None:
            te, ti = emb["added"]["text_embeds"], emb["added"]["time_ids"]
            added = {"text_embeds": torch.cat([te[:n], te[:n], te[n:], te[n:]]), "time_ids": torch.cat([ti, ti])}
        out = self.unet(torch.cat([x_t, x_t]), torch.cat([t2, t2]), encoder_hidden_states=hidden,
                        added_cond_kwargs=added).sample  # fmt: skip
        uncond, cond = out.float().chunk(2)
        eps = uncond + cfg_scale * (cond - uncond)
        x0 = pred_original_sample(eps, x_t, t2, self.scheduler.alphas_cumprod, self.prediction_type)
        images = decode_latents(self.vae, x0)
        return images[:n], images[n:]


def _add_noise(latents, noise, timesteps, alphas_cumprod):
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


# --------------------------------------------------------------------------------------------- loop


def _latest_checkpoint(folder: Path) -> Path | None:
    best, best_step = None, -1
    if folder.is_dir():
        for d in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", d.name)
            if m and (d / "trainer_state.json").is_file() and int(m.group(1)) > best_step:
                best, best_step = d, int(m.group(1))
    return best


def _write_json(path: Path, obj: Any) -> None:
    from pycore.io import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def train(cfg: SPMTrainConfig, *, log: Callable[[str], None] = print, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train; return the report (also written to ``<out>/report.json``)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader

    from pycore.spo.preference import StepAwarePreferenceModel, preprocess_images
    from pycore.spo.spm_data import PairDataset, collate_pairs, read_pairs, split_pairs

    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    latest = _latest_checkpoint(ckpt_dir)
    if not cfg.resume and not cfg.overwrite and ((out / "hw_spm.json").exists() or latest is not None):
        raise HwError(f"{out} already holds a model or checkpoints; pass --resume to continue or --overwrite to start over")
    if cfg.resume and latest is None:
        raise HwError(f"--resume: no checkpoint in {ckpt_dir}")

    # several processes without a GPU (torchrun / accelerate launch on CPU): accelerate only sets up
    # gloo (MULTI_CPU) when told cpu=True
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=cfg.cpu or multi_cpu,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))  # fmt: skip
    set_seed(cfg.seed)
    is_main = acc.is_main_process
    say = log if is_main else (lambda _m: None)

    if cfg.overwrite and is_main and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    acc.wait_for_everyone()

    # data
    pairs = read_pairs(cfg.pairs, prompt_column=cfg.prompt_column)
    if cfg.val:
        train_set, val_set = pairs, read_pairs(cfg.val, prompt_column=cfg.prompt_column)
        if cfg.max_val_pairs is not None:
            val_set = val_set.subset(list(range(min(len(val_set), cfg.max_val_pairs))))
    else:
        train_set, val_set = split_pairs(pairs, cfg.val_fraction, cfg.seed, cfg.max_val_pairs)
    say(f"pairs: {len(pairs)} usable of {pairs.total_rows} rows ({pairs.kind} form); train {len(train_set)}, validation {len(val_set)}")
    if pairs.skipped:
        say("skipped rows: " + ", ".join(f"{k} {v}" for k, v in pairs.skipped.items()))

    # models
    on_gpu = acc.device.type != "cpu"
    base_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.base_dtype, torch.float16 if on_gpu else torch.float32)
    base = BaseDiffusion.load(cfg.base_model, model_type=cfg.model_type, vae=cfg.vae, resolution=cfg.resolution,
                              dtype=base_dtype, device=acc.device)  # fmt: skip
    if base.kind == "sdxl" and base_dtype == torch.float16 and not cfg.vae:
        say("warning: the SDXL VAE overflows in fp16; pass --vae madebyollin/sdxl-vae-fp16-fix (as the SPO authors did)")
    spm = StepAwarePreferenceModel.from_pretrained(cfg.init, base=cfg.init_base, processor=cfg.processor, dtype=torch.float32)
    spm.train()
    spm.set_gradient_checkpointing(cfg.gradient_checkpointing)
    scorer = None
    if cfg.label_scorer:
        scorer = StepAwarePreferenceModel.from_pretrained(cfg.label_scorer, processor=cfg.processor,
                                                          dtype=base_dtype, device=acc.device)  # fmt: skip
        scorer.requires_grad_(False)
    size, mean, std = spm.image_size, spm.mean, spm.std
    tokenize = spm.tokenize

    opt = torch.optim.AdamW(spm.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(PairDataset(train_set, base.resolution), batch_size=cfg.batch_size, shuffle=True,
                              drop_last=len(train_set) >= cfg.batch_size * acc.num_processes, generator=gen,
                              collate_fn=collate_pairs, num_workers=cfg.num_workers)  # fmt: skip
    val_loader = DataLoader(PairDataset(val_set, base.resolution), batch_size=cfg.batch_size, shuffle=False,
                            collate_fn=collate_pairs, num_workers=cfg.num_workers)  # fmt: skip
    spm, opt, train_loader, val_loader = acc.prepare(spm, opt, train_loader, val_loader)
    acc.register_for_checkpointing(sched)
    raw = acc.unwrap_model(spm)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    report: dict[str, Any] = {"config": cfg.to_dict(), "base_kind": base.kind, "pairs_rows": pairs.total_rows,
                              "train_pairs": len(train_set), "val_pairs": len(val_set),
                              "skipped_rows": dict(pairs.skipped), "undecodable_rows": [], "evaluations": [],
                              "losses": []}  # fmt: skip
    if cfg.resume:
        acc.load_state(str(latest))
        saved = json.loads((latest / "trainer_state.json").read_text(encoding="utf-8"))
        state.update(saved["state"])
        report.update({k: saved["report"][k] for k in ("evaluations", "losses", "undecodable_rows") if k in saved["report"]})
        say(f"resumed from {latest} (step {state['step']})")

    def labels_for(batch) -> torch.Tensor:
        lab = batch["label_0"].to(acc.device)
        if scorer is None:
            return lab
        with torch.no_grad():
            txt = scorer.text_embeds(batch["prompts"])
            s0 = scorer.score(batch["pixels_0"], batch["prompts"], 0, text_embeds=txt)
            s1 = scorer.score(batch["pixels_1"], batch["prompts"], 0, text_embeds=txt)
        return margin_labels(s0, s1, cfg.label_margin)

    def spm_inputs(batch, t: torch.Tensor, generator=None, clean: bool = False):
        p0, p1 = batch["pixels_0"].to(acc.device), batch["pixels_1"].to(acc.device)
        with torch.no_grad():
            if not clean:
                p0, p1 = base.noisy_predictions(p0, p1, batch["prompts"], t, cfg.cfg_scale, generator)
            pix = preprocess_images(torch.cat([p0, p1]), size, mean, std)
        return pix, tokenize(batch["prompts"]), torch.cat([t, t])

    def evaluate() -> dict[str, Any]:
        spm.eval()
        res: dict[str, Any] = {"step": state["step"], "accuracy": {}, "pairs": {}}
        g = torch.Generator(device=acc.device)
        with torch.no_grad():
            for t_val in cfg.eval_timesteps:
                g.manual_seed(cfg.seed * 1000 + t_val + 1)
                dec_all, cor_all = [], []
                for batch in val_loader:
                    n = len(batch["prompts"])
                    t = torch.full((n,), t_val, device=acc.device, dtype=torch.long)
                    pix, ids, tt = spm_inputs(batch, t, g, clean=t_val == 0)
                    s = spm(pix, ids, tt)
                    dec, cor = pair_correct(s[:n], s[n:], labels_for(batch))
                    # per batch, so gather_for_metrics drops the samples padded into the last one
                    dec_all.append(acc.gather_for_metrics(dec))
                    cor_all.append(acc.gather_for_metrics(cor))
                dec, cor = torch.cat(dec_all), torch.cat(cor_all)
                n_dec = int(dec.sum())
                res["accuracy"][str(t_val)] = round(float(cor.sum()) / n_dec, 4) if n_dec else None
                res["pairs"][str(t_val)] = n_dec
        spm.train()
        return res

    def save_checkpoint() -> None:
        final = ckpt_dir / f"step-{state['step']}"
        tmp = ckpt_dir / f".step-{state['step']}.tmp"
        if is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if is_main:
            _write_json(tmp / "trainer_state.json", {"state": state, "config": cfg.to_dict(), "report": report})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            olds = sorted((d for d in ckpt_dir.iterdir() if re.fullmatch(r"step-\d+", d.name)), key=lambda d: int(d.name[5:]))
            for d in olds[: -cfg.keep_checkpoints]:
                shutil.rmtree(d, ignore_errors=True)
        acc.wait_for_everyone()

    def log_eval(ev: dict[str, Any]) -> None:
        accs = ", ".join(f"t={t}: {a:.3f}" if a is not None else f"t={t}: n/a" for t, a in ev["accuracy"].items())
        say(f"step {ev['step']}: held-out accuracy {accs}")

    T = base.num_train_timesteps
    running, n_running = 0.0, 0
    undecodable: set[int] = set(report["undecodable_rows"])
    while state["step"] < cfg.max_steps:
        train_loader.set_epoch(state["epoch"])
        loader = acc.skip_first_batches(train_loader, state["batch_in_epoch"]) if state["batch_in_epoch"] else train_loader
        for batch in loader:
            state["batch_in_epoch"] += 1
            undecodable.update(batch["skipped_rows"])
            n = len(batch["prompts"])
            with acc.accumulate(spm):
                t = torch.randint(0, T, (n,), device=acc.device)
                pix, ids, tt = spm_inputs(batch, t)
                lab = labels_for(batch)
                s = spm(pix, ids, tt)
                loss = pair_loss(s[:n], s[n:], lab)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(spm.parameters(), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            running += float(loss.detach())
            n_running += 1
            if not acc.sync_gradients:
                continue
            sched.step()
            state["step"] += 1
            step = state["step"]
            if on_step is not None:
                on_step(step, cfg.max_steps)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                avg = running / max(n_running, 1)
                report["losses"].append({"step": step, "loss": round(avg, 5), "lr": sched.get_last_lr()[0]})
                say(f"step {step}/{cfg.max_steps}: loss {avg:.4f}, lr {sched.get_last_lr()[0]:.2e}")
                running, n_running = 0.0, 0
            if step % cfg.eval_every == 0 and step < cfg.max_steps:
                ev = evaluate()
                report["evaluations"].append(ev)
                log_eval(ev)
            report["undecodable_rows"] = sorted(undecodable)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint()
                if is_main:
                    _write_json(out / "report.json", report)
            if step >= cfg.max_steps:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    final = evaluate()
    report["evaluations"].append(final)
    report["final"] = final
    log_eval(final)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        undecodable = set(gather_object(sorted(undecodable)))
    report["undecodable_rows"] = sorted(undecodable)
    if undecodable:
        say(f"{len(undecodable)} pair(s) with an undecodable image were skipped (rows in report.json)")
    report["steps"] = state["step"]
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    acc.wait_for_everyone()
    if is_main:
        raw.save_pretrained(out, extra={"train_config": cfg.to_dict(), "final_eval": final}, overwrite=True)
        _write_json(out / "report.json", report)
    acc.wait_for_everyone()
    acc.end_training()
    return report


__all__ = ["SPMTrainConfig", "BaseDiffusion", "train", "pair_loss", "pair_correct", "margin_labels", "pred_original_sample"]
