"""A single-process SPO training loop with per-epoch checkpoints and exact resume.

Randomness is derived from ``config.seed`` per (epoch, prompt batch), so a run stopped after an
epoch and resumed from its checkpoint ends with the same LoRA as an uninterrupted run.
Multi-process (accelerate: gather/split of pairs, mixed precision) is not wired in yet.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pycore.errors import HwError
from pycore.io import atomic_path, write_text_atomic
from pycore.spo.conditioning import PromptEncoder
from pycore.spo.config import SPOConfig
from pycore.spo.sampler import Scorer, Transitions, spo_rollout
from pycore.spo.train_step import NonFiniteError, add_spo_lora, clip_gradients, make_optimizer, spo_loss

CKPT_DIR = "checkpoints"


@dataclass
class RunResult:
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    lora_paths: list[Path] = field(default_factory=list)


def _seed(config: SPOConfig, epoch: int, batch: int) -> int:
    return (config.seed * 1_000_003 + epoch * 10_007 + batch) % (2**63)


def _lora_state(unet: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((out_dir / CKPT_DIR).glob("epoch_*.pt"))
    return found[-1] if found else None


def _save_checkpoint(path: Path, unet: Any, opt: torch.optim.Optimizer, epoch: int, config: SPOConfig, history: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"lora": _lora_state(unet), "optimizer": opt.state_dict(), "epoch": epoch, "config": config.to_dict(), "history": history}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
) -> RunResult:
    """Train the SPO LoRA on ``prompts``; resume from ``out_dir``'s last checkpoint if there is one.

    ``scorer_for(batch_prompts)`` returns the step-aware scorer for one prompt batch.
    ``stop_after_epochs`` ends the run early (after its checkpoint) — for tests and time limits.
    With an ``accelerator`` (several processes): each process samples its own share of every prompt
    batch, the pairs are gathered, shuffled and split (:func:`gather_and_split`), the UNet trains
    under DDP, and only the main process writes checkpoints and the LoRA.
    """
    if not prompts:
        raise HwError("no prompts to train on")
    out = Path(out_dir)
    params = add_spo_lora(unet, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = make_optimizer(params, config)
    start, history = 0, []
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["config"] != config.to_dict():
            raise HwError(f"{ckpt} was written with a different configuration; use a new --out folder")
        named = dict(unet.named_parameters())
        with torch.no_grad():
            for n, t in state["lora"].items():
                named[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    world, rank, main = 1, 0, True
    model = unet
    if accelerator is not None:
        world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
        model, opt = accelerator.prepare(unet, opt)
    device = next(unet.parameters()).device
    if encoder.use_cache:  # encode in a fixed grouping, so a resumed run sees bit-identical embeddings
        for i in range(0, len(prompts), config.sample_batch_size):
            encoder(list(prompts[i : i + config.sample_batch_size]))
    for epoch in range(start, config.num_epochs):
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            return RunResult(epochs_done=epoch, history=history)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(_seed(config, epoch, 0)))
        for b, all_rows in enumerate(order.split(config.sample_batch_size * world)):
            rows = all_rows[rank::world]
            if len(rows) == 0:  # fewer prompts than processes in the last batch: reuse the first
                rows = all_rows[:1]
            batch_prompts = [prompts[int(i)] for i in rows]
            g = torch.Generator(device=device).manual_seed(_seed(config, epoch, b + 1) + 7919 * rank)
            cond = encoder(batch_prompts, device=device)
            roll = spo_rollout(unet, cond, scorer_for(batch_prompts), config, latent_shape, g)
            rec: dict[str, float] = {"epoch": epoch, "batch": b, "pairs": len(roll.transitions), "acceptance": roll.stats.acceptance_rate}
            tr = roll.transitions
            tr.prompt_idx = rows.to(tr.prompt_idx.device)[tr.prompt_idx]  # global prompt ids
            if accelerator is not None:
                tr = gather_and_split(tr, accelerator, _seed(config, epoch, b + 1))
            if len(tr) == 0:
                history.append(rec)
                continue
            tr = tr.index(torch.randperm(len(tr), generator=torch.Generator().manual_seed(_seed(config, epoch, b + 1))).to(tr.t.device))
            uniq, local = tr.prompt_idx.unique(return_inverse=True)
            tr.prompt_idx = local
            cond = encoder([prompts[int(i)] for i in uniq], device=device)
            chunks = list(torch.arange(len(tr)).split(config.train_batch_size))
            losses = []
            for c, idx in enumerate(chunks):
                try:
                    loss, _ = spo_loss(model, tr.index(idx), cond, config)
                except NonFiniteError as e:
                    bad = out / CKPT_DIR / "nonfinite.pt"
                    if main:
                        _save_checkpoint(bad, unet, opt, epoch, config, history)
                    raise NonFiniteError(f"{e}; state saved to {bad}") from e
                scaled = loss / config.gradient_accumulation_steps
                if accelerator is not None:
                    accelerator.backward(scaled)
                else:
                    scaled.backward()
                losses.append(float(loss.detach()))
                if (c + 1) % config.gradient_accumulation_steps == 0 or c == len(chunks) - 1:
                    norm = clip_gradients(params, config.max_grad_norm, accelerator)
                    if not math.isfinite(norm):
                        raise NonFiniteError("non-finite gradient norm in the SPO step")
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            rec["loss"] = sum(losses) / len(losses)
            history.append(rec)
        if main and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.num_epochs):
            _save_checkpoint(out / CKPT_DIR / f"epoch_{epoch + 1:04d}.pt", unet, opt, epoch + 1, config, history)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        return RunResult(epochs_done=config.num_epochs, history=history)
    from pycore.lora.convert import save_lora

    meta = {"hw_spo_config": json.dumps(config.to_dict())}
    paths = []
    for fmt in save_formats:
        p = out / f"spo_lora_{fmt}.safetensors"
        save_lora(unet, p, fmt, metadata=meta, overwrite=False)
        paths.append(p)
    write_text_atomic(out / "spo_config.json", json.dumps(config.to_dict(), indent=2) + "\n", overwrite=False)
    return RunResult(epochs_done=config.num_epochs, history=history, lora_paths=paths)


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
