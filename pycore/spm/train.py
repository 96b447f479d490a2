"""Training the step-aware preference model on preference pairs (``hw spm-train``).

The noising procedure of the SPO paper (:mod:`pycore.spm.noising`): for each pair draw
t ~ U{0..T-1}; VAE-encode both images, add the *same* noise at t; the frozen base diffusion model
(SD1.5 or SDXL) predicts ε with classifier-free guidance; x̂0 is decoded and scored at t. Loss:
PickScore's 2-way cross-entropy over (score_0, score_1) with ties as 0.5/0.5
(:mod:`pycore.spm.losses`). Optionally the labels come from a frozen plain scorer on the clean
images (win if p_w − p_l > margin, else tie), as the SDXL SPM did. accelerate handles devices,
mixed precision, gradient accumulation and multi-GPU; checkpoints resume; accuracy is evaluated
at fixed timesteps and written to ``report.json``.

    from pycore.spm.config import SPMTrainConfig
    from pycore.spm.train import train
    report = train(SPMTrainConfig(pairs="pairs.parquet", out="runs/spm", base_model="stabilityai/stable-diffusion-xl-base-1.0"))
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pycore.errors import HwError, NothingDone
from pycore.io import latest_checkpoint, write_text_atomic
from pycore.progress import NO_PROGRESS, Progress
from pycore.spm.config import SPMTrainConfig
from pycore.spm.losses import margin_labels, pair_correct, pair_loss

_LOG = logging.getLogger("hw.spm")
CHECKPOINT_PATTERN = r"step-(\d+)"
CHECKPOINT_MARKER = "trainer_state.json"


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def _quiet(_msg: str) -> None:
    pass


def check_run_folder(cfg: SPMTrainConfig) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); an error when OUT holds a run and neither
    --resume nor --overwrite was given, or --resume finds nothing."""
    out = Path(cfg.out)
    latest = latest_checkpoint(out / "checkpoints", CHECKPOINT_PATTERN, marker=CHECKPOINT_MARKER)
    if not cfg.resume and not cfg.overwrite and ((out / "hw_spm.json").exists() or latest is not None):
        raise HwError(f"{out} already holds a model or checkpoints; pass --resume to continue or --overwrite to start over")
    if cfg.resume and latest is None:
        raise HwError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    return latest if cfg.resume else None


class SPMTrainer:
    """One training run: data, frozen base model and noiser, the SPM, optimizer, evaluation and checkpoints."""

    def __init__(self, cfg: SPMTrainConfig, *, log: Callable[[str], None] | None = None, progress: Progress = NO_PROGRESS):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        self.cfg = cfg
        self.t_start = time.perf_counter()
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.resume_from = check_run_folder(cfg)
        # several processes without a GPU (torchrun / accelerate launch on CPU): accelerate only sets up
        # gloo (MULTI_CPU) when told cpu=True
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                               cpu=cfg.cpu or multi_cpu, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))  # fmt: skip
        set_seed(cfg.seed)
        self.is_main = self.acc.is_main_process
        self.say = (log or _LOG.info) if self.is_main else _quiet
        self.progress = progress
        if cfg.overwrite and self.is_main and self.ckpt_dir.exists():
            shutil.rmtree(self.ckpt_dir)
        self.acc.wait_for_everyone()
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        self._load_data()
        self._load_models()
        self._prepare()

    # ---- set-up

    def _load_data(self) -> None:
        from pycore.spm.data import read_pairs, split_pairs

        cfg = self.cfg
        self.pairs = read_pairs(cfg.pairs, prompt_column=cfg.prompt_column)
        if cfg.val:
            self.train_set, self.val_set = self.pairs, read_pairs(cfg.val, prompt_column=cfg.prompt_column)
            if cfg.max_val_pairs is not None:
                self.val_set = self.val_set.subset(list(range(min(len(self.val_set), cfg.max_val_pairs))))
        else:
            self.train_set, self.val_set = split_pairs(self.pairs, cfg.val_fraction, cfg.seed, cfg.max_val_pairs)
        self.say(f"pairs: {len(self.pairs)} usable of {self.pairs.total_rows} rows ({self.pairs.kind} form); "
                 f"train {len(self.train_set)}, validation {len(self.val_set)}")  # fmt: skip
        if self.pairs.skipped:
            self.say("skipped rows: " + ", ".join(f"{k} {v}" for k, v in self.pairs.skipped.items()))

    def _load_models(self) -> None:
        from pycore.checks import parse_dtype
        from pycore.spm.checkpoints import load_spm
        from pycore.spm.noising import load_noiser

        cfg, acc = self.cfg, self.acc
        on_gpu = acc.device.type != "cpu"
        base_dtype = parse_dtype(cfg.base_dtype, "--base-dtype") if cfg.base_dtype != "auto" else \
            (torch.float16 if on_gpu else torch.float32)  # fmt: skip
        self.noiser, base, self.resolution = load_noiser(cfg.base_model, model_type=cfg.model_type, vae=cfg.vae,
                                                         resolution=cfg.resolution, cfg_scale=cfg.cfg_scale, dtype=base_dtype,
                                                         device=acc.device)  # fmt: skip
        self.base_family = base.family
        for w in base.warnings:
            self.say(f"warning: {w}")
        self.spm = load_spm(cfg.init, base=cfg.init_base, processor=cfg.processor, dtype=torch.float32)
        self.spm.train()
        self.spm.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.scorer = None
        if cfg.label_scorer:
            self.scorer = load_spm(cfg.label_scorer, processor=cfg.processor, dtype=base_dtype, device=acc.device)
            self.scorer.requires_grad_(False)

    def _prepare(self) -> None:
        from torch.utils.data import DataLoader

        from pycore.spm.data import PairDataset, collate_pairs

        cfg, acc = self.cfg, self.acc
        self.raw = self.spm
        self.size, self.mean, self.std = self.spm.image_size, self.spm.mean, self.spm.std
        opt = torch.optim.AdamW(self.spm.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
        warm = cfg.warmup_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        gen = torch.Generator().manual_seed(cfg.seed)
        train_loader = DataLoader(PairDataset(self.train_set, self.resolution), batch_size=cfg.batch_size, shuffle=True,
                                  drop_last=len(self.train_set) >= cfg.batch_size * acc.num_processes, generator=gen,
                                  collate_fn=collate_pairs, num_workers=cfg.num_workers)  # fmt: skip
        val_loader = DataLoader(PairDataset(self.val_set, self.resolution), batch_size=cfg.batch_size, shuffle=False,
                                collate_fn=collate_pairs, num_workers=cfg.num_workers)  # fmt: skip
        self.spm, self.opt, self.train_loader, self.val_loader = acc.prepare(self.spm, opt, train_loader, val_loader)
        acc.register_for_checkpointing(self.sched)
        self.raw = acc.unwrap_model(self.spm)
        self.report: dict[str, Any] = {"config": cfg.to_dict(), "base_kind": self.base_family, "pairs_rows": self.pairs.total_rows,
                                       "train_pairs": len(self.train_set), "val_pairs": len(self.val_set),
                                       "skipped_rows": dict(self.pairs.skipped), "undecodable_rows": [], "evaluations": [],
                                       "losses": []}  # fmt: skip
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
            saved = json.loads((self.resume_from / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
            self.state.update(saved["state"])
            self.report.update({k: saved["report"][k] for k in ("evaluations", "losses", "undecodable_rows") if k in saved["report"]})
            self.say(f"resumed from {self.resume_from} (step {self.state['step']})")
        self.undecodable: set[int] = set(self.report["undecodable_rows"])

    # ---- one batch

    def labels_for(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's labels, or a frozen plain scorer's margin labels on the clean images."""
        lab = batch["label_0"].to(self.acc.device)
        if self.scorer is None:
            return lab
        with torch.no_grad():
            txt = self.scorer.text_embeds(batch["prompts"])
            s0 = self.scorer.score(batch["pixels_0"], batch["prompts"], 0, text_embeds=txt)
            s1 = self.scorer.score(batch["pixels_1"], batch["prompts"], 0, text_embeds=txt)
        return margin_labels(s0, s1, self.cfg.label_margin)

    def spm_inputs(self, batch: dict[str, Any], t: torch.Tensor, generator: torch.Generator | None = None,
                   clean: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Preprocessed pixels of [x̂0 of image 0; x̂0 of image 1] at t (the clean images with ``clean``), token ids, timesteps."""
        from pycore.spm.model import preprocess_images

        p0, p1 = batch["pixels_0"].to(self.acc.device), batch["pixels_1"].to(self.acc.device)
        with torch.no_grad():
            if not clean:
                p0, p1 = self.noiser(p0, p1, batch["prompts"], t, generator)
            pix = preprocess_images(torch.cat([p0, p1]), self.size, self.mean, self.std)
        return pix, self.raw.tokenize(batch["prompts"]), torch.cat([t, t])

    def train_batch(self, batch: dict[str, Any]) -> float:
        """One micro-step (forward, backward, and the optimizer step when gradients sync); the loss."""
        acc, n = self.acc, len(batch["prompts"])
        with acc.accumulate(self.spm):
            t = torch.randint(0, self.noiser.num_train_timesteps, (n,), device=acc.device)
            pix, ids, tt = self.spm_inputs(batch, t)
            lab = self.labels_for(batch)
            s = self.spm(pix, ids, tt)
            loss = pair_loss(s[:n], s[n:], lab)
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.spm.parameters(), self.cfg.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ---- evaluation and checkpoints

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out accuracy at each evaluation timestep (ties in the labels are not counted)."""
        self.spm.eval()
        res: dict[str, Any] = {"step": self.state["step"], "accuracy": {}, "pairs": {}}
        g = torch.Generator(device=self.acc.device)
        for t_val in self.cfg.eval_timesteps:
            g.manual_seed(self.cfg.seed * 1000 + t_val + 1)
            dec, cor = self._eval_at(t_val, g)
            n_dec = int(dec.sum())
            res["accuracy"][str(t_val)] = round(float(cor.sum()) / n_dec, 4) if n_dec else None
            res["pairs"][str(t_val)] = n_dec
        self.spm.train()
        return res

    def _eval_at(self, t_val: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        dec_all, cor_all = [], []
        for batch in self.val_loader:
            n = len(batch["prompts"])
            t = torch.full((n,), t_val, device=self.acc.device, dtype=torch.long)
            pix, ids, tt = self.spm_inputs(batch, t, g, clean=t_val == 0)
            s = self.spm(pix, ids, tt)
            dec, cor = pair_correct(s[:n], s[n:], self.labels_for(batch))
            # per batch, so gather_for_metrics drops the samples padded into the last one
            dec_all.append(self.acc.gather_for_metrics(dec))
            cor_all.append(self.acc.gather_for_metrics(cor))
        return torch.cat(dec_all), torch.cat(cor_all)

    def log_eval(self, ev: dict[str, Any]) -> None:
        accs = ", ".join(f"t={t}: {a:.3f}" if a is not None else f"t={t}: n/a" for t, a in ev["accuracy"].items())
        self.say(f"step {ev['step']}: held-out accuracy {accs}")

    def save_checkpoint(self) -> None:
        """accelerate state + trainer_state.json into checkpoints/step-N (atomically renamed); keep the newest few."""
        import re

        acc, step = self.acc, self.state["step"]
        final, tmp = self.ckpt_dir / f"step-{step}", self.ckpt_dir / f".step-{step}.tmp"
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.is_main:
            _write_json(tmp / CHECKPOINT_MARKER, {"state": self.state, "config": self.cfg.to_dict(), "report": self.report})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            olds = sorted((d for d in self.ckpt_dir.iterdir() if re.fullmatch(CHECKPOINT_PATTERN, d.name)), key=lambda d: int(d.name[5:]))
            for d in olds[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(d, ignore_errors=True)
        acc.wait_for_everyone()

    # ---- the loop

    def after_step(self, running: float, n_running: int) -> bool:
        """Bookkeeping after an optimizer step: log, evaluate, checkpoint. True when the running loss was logged."""
        cfg, step = self.cfg, self.state["step"]
        self.progress.advance(1)
        logged = step % cfg.log_every == 0 or step == cfg.max_steps
        if logged:
            avg, lr = running / max(n_running, 1), self.sched.get_last_lr()[0]
            self.report["losses"].append({"step": step, "loss": round(avg, 5), "lr": lr})
            self.say(f"step {step}/{cfg.max_steps}: loss {avg:.4f}, lr {lr:.2e}")
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            ev = self.evaluate()
            self.report["evaluations"].append(ev)
            self.log_eval(ev)
        self.report["undecodable_rows"] = sorted(self.undecodable)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            self.save_checkpoint()
            if self.is_main:
                _write_json(self.out / "report.json", self.report)
        return logged

    def run_epoch(self, running: float, n_running: int) -> tuple[float, int, bool]:
        """Train through (the rest of) one epoch; returns the running loss and whether max_steps was reached."""
        acc, state = self.acc, self.state
        self.train_loader.set_epoch(state["epoch"])
        skip = state["batch_in_epoch"]
        loader = acc.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        for batch in loader:
            state["batch_in_epoch"] += 1
            self.undecodable.update(batch["skipped_rows"])
            running += self.train_batch(batch)
            n_running += 1
            if not acc.sync_gradients:
                continue
            self.sched.step()
            state["step"] += 1
            if self.after_step(running, n_running):
                running, n_running = 0.0, 0
            if state["step"] >= self.cfg.max_steps:
                return running, n_running, True
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        return running, n_running, False

    def finish(self) -> dict[str, Any]:
        """Final evaluation, the model and report.json; returns the report."""
        final = self.evaluate()
        self.report["evaluations"].append(final)
        self.report["final"] = final
        self.log_eval(final)
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            self.undecodable = set(gather_object(sorted(self.undecodable)))
        self.report["undecodable_rows"] = sorted(self.undecodable)
        if self.undecodable:
            self.say(f"{len(self.undecodable)} pair(s) with an undecodable image were skipped (rows in report.json)")
        self.report["steps"] = self.state["step"]
        self.report["seconds"] = round(time.perf_counter() - self.t_start, 2)
        self.acc.wait_for_everyone()
        if self.is_main:
            self.raw.save_pretrained(self.out, extra={"train_config": self.cfg.to_dict(), "final_eval": final}, overwrite=True)
            _write_json(self.out / "report.json", self.report)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return self.report

    def fit(self) -> dict[str, Any]:
        """Train to max_steps (from the resumed step), then finish."""
        running, n_running, done = 0.0, 0, self.state["step"] >= self.cfg.max_steps
        self.progress.stage("training", self.cfg.max_steps - self.state["step"], "step")
        while not done:
            fresh_epoch, step_before = self.state["batch_in_epoch"] == 0, self.state["step"]
            running, n_running, done = self.run_epoch(running, n_running)
            if fresh_epoch and not done and self.state["step"] == step_before and n_running == 0:
                raise NothingDone("the training data loader yields no batches; add pairs or lower --batch-size")
        return self.finish()


def train(cfg: SPMTrainConfig, *, log: Callable[[str], None] | None = None, progress: Progress = NO_PROGRESS) -> dict[str, Any]:
    """Train; return the report (also written to ``<out>/report.json``).

    ``log`` receives the run's messages (default: the ``hw.spm`` logger); ``progress`` one step per optimizer step.
    """
    return SPMTrainer(cfg, log=log, progress=progress).fit()
