"""The SPO training loop: rollouts, pair gathering, LoRA updates, checkpoints, exact resume, logging.

Randomness is derived from ``config.seed`` per (epoch, prompt batch, rank), so a run stopped after
an epoch and resumed from its checkpoint ends with the same LoRA as an uninterrupted run.
With an accelerate ``Accelerator`` the loop runs on one or many processes: each samples its share
of every prompt batch, the pairs are gathered, shuffled and split (:func:`gather_and_split`), the
UNet trains under DDP (gradient sync only on the accumulation boundary) with the accelerator's
mixed precision, and only the main process writes checkpoints, samples and the LoRA.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pycore.errors import HwError
from pycore.io import atomic_path, write_text_atomic
from pycore.diffusion.text import PromptEncoder
from pycore.io import latest_checkpoint as find_latest_checkpoint
from pycore.spo.config import SPOConfig
from pycore.spo.sampler import Scorer, Transitions, sample_latents, spo_rollout
from pycore.spo.train_step import NonFiniteError, add_spo_lora, clip_gradients, make_optimizer, spo_loss

CKPT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
LOG_FILE = "train_log.jsonl"
#: Options that may change between a checkpoint and its resumption (they don't change the math).
RESUMABLE_CHANGES = frozenset({"num_epochs", "checkpoint_every"})


class TrainLogger(Protocol):
    """Where the loop reports: scalars per prompt batch, images per epoch, one summary per epoch."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def images(self, tag: str, images: list[Any], captions: list[str], step: int) -> None: ...

    def epoch(self, summary: dict[str, Any]) -> None: ...

    def info(self, message: str) -> None: ...


@dataclass
class RunResult:
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    lora_paths: list[Path] = field(default_factory=list)
    resumed_from: int = 0


def _seed(config: SPOConfig, epoch: int, batch: int) -> int:
    return (config.seed * 1_000_003 + epoch * 10_007 + batch) % (2**63)


def _lora_state(unet: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}


def latest_checkpoint(out_dir: Path) -> Path | None:
    return find_latest_checkpoint(Path(out_dir) / CKPT_DIR, r"epoch_(\d+)\.pt")


def _save_checkpoint(path: Path, unet: Any, opt: Any, epoch: int, config: SPOConfig, history: list, world: int,
                     scaler: Any = None) -> None:  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"lora": _lora_state(unet), "optimizer": opt.state_dict(), "epoch": epoch, "config": config.to_dict(),
             "history": history, "world": world, "scaler": scaler.state_dict() if scaler is not None else None}  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _check_resumable(saved: dict[str, Any], config: SPOConfig, ckpt: Path) -> None:
    now = config.to_dict()
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        shown = ", ".join(f"{k} {saved.get(k)!r} → {now.get(k)!r}" for k in diff[:4])
        raise HwError(f"{ckpt} was written with a different configuration ({shown}); use the same settings to resume, or a new --out folder")


@dataclass
class Preview:
    """Sample images per epoch for fixed prompts and seeds (deterministic DDIM, the config's steps and CFG).

    Written to ``<out>/samples/epoch_NNNN/NN.png`` (epoch 0 = the base model, before training) and
    sent to the logger. ``decode`` maps latents to images in [-1, 1] (the VAE decode).
    """

    prompts: list[str]
    seeds: list[int]
    decode: Callable[[torch.Tensor], torch.Tensor]
    every: int = 1
    eta: float = 0.0

    def due(self, epoch: int, num_epochs: int) -> bool:
        return epoch == 0 or epoch == num_epochs or epoch % self.every == 0

    @torch.no_grad()
    def render(self, unet: Any, encoder: PromptEncoder, config: SPOConfig, latent_shape: Sequence[int], device: Any) -> list[Any]:
        from PIL import Image

        images = []
        for prompt, seed in zip(self.prompts, self.seeds, strict=True):
            noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))
            lat = sample_latents(unet, encoder([prompt], device=device), config, latent_shape, eta=self.eta, noise=noise)
            img = self.decode(lat)[0].float().clamp(-1, 1)
            arr = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            images.append(Image.fromarray(arr[..., :3] if arr.shape[-1] >= 3 else arr[..., 0]))
        return images

    def write(self, images: list[Any], folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            p = folder / f"{i:02d}.png"
            with atomic_path(p) as tmp:
                im.save(tmp, format="PNG")
            paths.append(p)
        lines = [json.dumps({"file": p.name, "prompt": pr, "seed": s}) for p, pr, s in zip(paths, self.prompts, self.seeds, strict=True)]
        write_text_atomic(folder / "prompts.jsonl", "\n".join(lines) + "\n")
        return paths


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_spo(
    unet: Any,
    encoder: PromptEncoder,
    prompts: Sequence[str],
    scorer_for: Callable[[Sequence[str]], Scorer],
    config: SPOConfig,
    out_dir: str | Path,
    latent_shape: Sequence[int],
    *,
    stop_after_epochs: int | None = None,
    save_formats: Sequence[str] = ("diffusers", "kohya"),
    accelerator: Any = None,
    logger: TrainLogger | None = None,
    preview: Preview | None = None,
    offload_text_encoders: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Train the SPO LoRA on ``prompts``; resume from ``out_dir``'s last checkpoint if there is one.

    ``scorer_for(batch_prompts)`` returns the step-aware scorer for one prompt batch.
    ``stop_after_epochs`` ends the run early (after its checkpoint) — for tests and time limits.
    ``offload_text_encoders``: after every prompt is encoded once (cache on), move the text
    encoders to the CPU to free accelerator memory.
    """
    if not prompts:
        raise HwError("no prompts to train on")
    out = Path(out_dir)
    world, rank, main = 1, 0, True
    if accelerator is not None:
        world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    torch.manual_seed(config.seed)  # the LoRA's random init (DDP also broadcasts rank 0's weights)
    params = add_spo_lora(unet, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = make_optimizer(params, config)
    start, history = 0, []
    ckpt = latest_checkpoint(out)
    saved: dict[str, Any] | None = None
    if ckpt is not None:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        _check_resumable(saved["config"], config, ckpt)
        named = dict(unet.named_parameters())
        with torch.no_grad():
            for n, t in saved["lora"].items():
                named[n].copy_(t)
        opt.load_state_dict(saved["optimizer"])
        start, history = int(saved["epoch"]), list(saved["history"])
        if logger is not None:
            logger.info(f"resuming from {ckpt} (epoch {start} of {config.num_epochs})")
            if int(saved.get("world", world)) != world:
                logger.info(f"the checkpoint was written by {saved.get('world')} processes, now {world}: "
                            "the run continues correctly but will not match an uninterrupted run exactly")  # fmt: skip
    model = unet
    if accelerator is not None:
        model, opt = accelerator.prepare(unet, opt)
        if saved is not None and saved.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
    scaler = accelerator.scaler if accelerator is not None else None
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    device = next(unet.parameters()).device
    if encoder.use_cache:  # encode in a fixed grouping, so a resumed run sees bit-identical embeddings
        for i in range(0, len(prompts), config.sample_batch_size):
            encoder(list(prompts[i : i + config.sample_batch_size]))
        if preview is not None:
            for p in preview.prompts:
                encoder([p])
        if offload_text_encoders:
            encoder.offload("cpu")
    n_batches = math.ceil(len(prompts) / (config.sample_batch_size * world))
    if main and preview is not None and start == 0 and not (out / SAMPLES_DIR / "epoch_0000").exists():
        with autocast():
            _write_preview(preview, unet, encoder, config, latent_shape, device, out, 0, logger)

    for epoch in range(start, config.num_epochs):
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            return RunResult(epochs_done=epoch, history=history, resumed_from=start)
        t_epoch = time.perf_counter()
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(_seed(config, epoch, 0)))
        for b, all_rows in enumerate(order.split(config.sample_batch_size * world)):
            t0 = time.perf_counter()
            rows = all_rows[rank::world]
            if len(rows) == 0:  # fewer prompts than processes in the last batch: reuse the first
                rows = all_rows[:1]
            batch_prompts = [prompts[int(i)] for i in rows]
            g = torch.Generator(device=device).manual_seed(_seed(config, epoch, b + 1) + 7919 * rank)
            cond = encoder(batch_prompts, device=device)
            timed = _TimedScorer(scorer_for(batch_prompts))
            with autocast():
                roll = spo_rollout(unet, cond, timed, config, latent_shape, g)
            t_roll = time.perf_counter() - t0
            st = roll.stats
            rec: dict[str, Any] = {
                "epoch": epoch, "batch": b, "pairs": len(roll.transitions), "acceptance": st.acceptance_rate,
                "reward_final": _mean(st.final_scores), "reward_kept": _mean(st.kept_scores), "reward_all": _mean(st.all_scores),
                "reward_win": _mean(st.win_scores), "reward_lose": _mean(st.lose_scores),
            }  # fmt: skip
            tr = roll.transitions
            tr.prompt_idx = rows.to(tr.prompt_idx.device)[tr.prompt_idx]  # global prompt ids
            if accelerator is not None:
                tr = gather_and_split(tr, accelerator, _seed(config, epoch, b + 1))
            t1 = time.perf_counter()
            rec["trained"] = len(tr)
            if len(tr):
                rec.update(_train_on(tr, model, unet, opt, params, encoder, prompts, config, epoch, b, device, out,
                                     accelerator, scaler, main, history, world))  # fmt: skip
            history.append(rec)
            if logger is not None:
                step = epoch * n_batches + b
                timing = {"time/step": time.perf_counter() - t0, "time/sampling": t_roll - timed.seconds,
                          "time/decode_score": timed.seconds, "time/training": time.perf_counter() - t1}  # fmt: skip
                logger.scalars({**_scalars(rec), **timing}, step)
        if main and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.num_epochs):
            _save_checkpoint(out / CKPT_DIR / f"epoch_{epoch + 1:04d}.pt", unet, opt, epoch + 1, config, history, world, scaler)
        if main and preview is not None and preview.due(epoch + 1, config.num_epochs):
            with autocast():
                _write_preview(preview, unet, encoder, config, latent_shape, device, out, epoch + 1, logger)
        if logger is not None and main:
            logger.epoch(_epoch_summary(history, epoch, time.perf_counter() - t_epoch))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        return RunResult(epochs_done=config.num_epochs, history=history, resumed_from=start)
    from pycore.lora.convert import save_lora

    meta = {"hw_spo_config": json.dumps(config.to_dict())}
    paths = []
    for fmt in save_formats:
        p = out / f"spo_lora_{fmt}.safetensors"
        save_lora(unet, p, fmt, metadata=meta, overwrite=overwrite)
        paths.append(p)
    write_text_atomic(out / "spo_config.json", json.dumps(config.to_dict(), indent=2) + "\n", overwrite=True)
    return RunResult(epochs_done=config.num_epochs, history=history, lora_paths=paths, resumed_from=start)


class _TimedScorer:
    """Wraps a scorer and adds up the seconds spent in it (VAE decode + SPM)."""

    def __init__(self, scorer: Scorer):
        self.scorer, self.seconds = scorer, 0.0

    def __call__(self, x0: torch.Tensor, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.scorer(x0, idx, t)
        finally:
            self.seconds += time.perf_counter() - t0


def _train_on(tr: Transitions, model: Any, unet: Any, opt: Any, params: list[torch.nn.Parameter], encoder: PromptEncoder,
              prompts: Sequence[str], config: SPOConfig, epoch: int, b: int, device: Any, out: Path, accelerator: Any,
              scaler: Any, main: bool, history: list, world: int) -> dict[str, float]:  # fmt: skip
    """One pass over this process's transitions: micro-batches, accumulation, clipping, steps."""
    tr = tr.index(torch.randperm(len(tr), generator=torch.Generator().manual_seed(_seed(config, epoch, b + 1))).to(tr.t.device))
    uniq, local = tr.prompt_idx.unique(return_inverse=True)
    tr.prompt_idx = local
    cond = encoder([prompts[int(i)] for i in uniq], device=device)
    chunks = list(torch.arange(len(tr)).split(config.train_batch_size))
    losses, accs, norms, skipped = [], [], [], 0
    for c, idx in enumerate(chunks):
        boundary = (c + 1) % config.gradient_accumulation_steps == 0 or c == len(chunks) - 1
        sync = accelerator.no_sync(model) if accelerator is not None and not boundary else contextlib.nullcontext()
        with sync:
            try:
                loss, st = spo_loss(model, tr.index(idx), cond, config)
            except NonFiniteError as e:
                bad = out / CKPT_DIR / "nonfinite.pt"
                if main:
                    _save_checkpoint(bad, unet, opt, epoch, config, history, world, scaler)
                last = latest_checkpoint(out)
                hint = f"; the last good checkpoint is {last}" if last is not None else ""
                raise NonFiniteError(f"{e} (epoch {epoch + 1}, batch {b + 1}); state saved to {bad}{hint}") from e
            scaled = loss / config.gradient_accumulation_steps
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                scaled.backward()
        losses.append(float(loss.detach()))
        accs.append(float(st["implicit_acc"].mean()))
        if boundary:
            norm = clip_gradients(params, config.max_grad_norm, accelerator)
            if not math.isfinite(norm):
                if scaler is None:  # fp16's loss scaler skips such steps and lowers its scale; otherwise it is fatal
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteError(f"non-finite gradient norm in the SPO step (epoch {epoch + 1}, batch {b + 1})")
                skipped += 1
            else:
                norms.append(norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    rec = {"loss": sum(losses) / len(losses), "implicit_acc": sum(accs) / len(accs)}
    if norms:
        rec["grad_norm"] = sum(norms) / len(norms)
    if skipped:
        rec["skipped_steps"] = skipped
    return rec


_SCALAR_NAMES = {
    "loss": "train/loss", "implicit_acc": "train/implicit_accuracy", "grad_norm": "train/grad_norm",
    "pairs": "pairs/kept", "acceptance": "pairs/acceptance_rate", "trained": "pairs/trained",
    "reward_final": "reward/final", "reward_kept": "reward/kept", "reward_all": "reward/all_candidates",
    "reward_win": "reward/win", "reward_lose": "reward/lose", "skipped_steps": "train/skipped_steps",
}  # fmt: skip


def _scalars(rec: dict[str, Any]) -> dict[str, float]:
    return {name: float(rec[k]) for k, name in _SCALAR_NAMES.items() if rec.get(k) is not None}


def _epoch_summary(history: list[dict[str, Any]], epoch: int, seconds: float) -> dict[str, Any]:
    recs = [h for h in history if h["epoch"] == epoch]

    def avg(key: str) -> float | None:
        return _mean([h[key] for h in recs if h.get(key) is not None])

    return {"epoch": epoch + 1, "pairs": sum(h["pairs"] for h in recs), "acceptance": avg("acceptance"), "loss": avg("loss"),
            "implicit_acc": avg("implicit_acc"), "reward_final": avg("reward_final"), "seconds": seconds}  # fmt: skip


def _write_preview(preview: Preview, unet: Any, encoder: PromptEncoder, config: SPOConfig, latent_shape: Sequence[int],
                   device: Any, out: Path, epoch: int, logger: TrainLogger | None) -> None:  # fmt: skip
    images = preview.render(unet, encoder, config, latent_shape, device)
    preview.write(images, out / SAMPLES_DIR / f"epoch_{epoch:04d}")
    if logger is not None:
        logger.images("samples", images, preview.prompts, epoch)


def gather_and_split(tr: Transitions, accelerator: Any, seed: int) -> Transitions:
    """Gather every process's pairs, shuffle them with a shared seed, give each process an equal share.

    As the official code (gather, shuffle, split); the share is ``total // num_processes`` so every
    process runs the same number of backward passes (DDP needs that); the remainder is dropped.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return tr
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([len(tr)], device=device)).cpu()
    width = int(counts.max())
    parts = {}
    for f in Transitions.fields():
        v = getattr(tr, f).to(device)
        pad = torch.zeros((width - v.shape[0], *v.shape[1:]), dtype=v.dtype, device=device)
        parts[f] = accelerator.gather(torch.cat([v, pad])).view(world, width, *v.shape[1:])
    valid = torch.cat([torch.arange(int(c)) + r * width for r, c in enumerate(counts)])
    full = Transitions(*(parts[f].flatten(0, 1)[valid.to(device)] for f in Transitions.fields()))
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    share = len(full) // world
    return full.index(perm[rank * share : (rank + 1) * share].to(device))
