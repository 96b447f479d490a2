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

from pycore.errors import HwError, NothingDone
from pycore.io import atomic_path, write_text_atomic
from pycore.diffusion.text import PromptEncoder
from pycore.io import latest_checkpoint as find_latest_checkpoint
from pycore.spo.config import SPOConfig
from pycore.spo.sampler import Scorer, Transitions, sample_latents, spo_rollout
from pycore.spo.losses import NONFINITE_FIXES, NonFiniteError
from pycore.spo.train_step import add_spo_lora, clip_gradients, make_optimizer, spo_loss

CKPT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
LOG_FILE = "train_log.jsonl"
#: Options that may change between a checkpoint and its resumption (they don't change the math).
RESUMABLE_CHANGES = frozenset({"num_epochs", "checkpoint_every", "offload_scorer"})


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
    def render(self, unet: Any, encoder: PromptEncoder, config: SPOConfig, latent_shape: Sequence[int], device: Any, *,
               unet_context: Callable[[], Any] = contextlib.nullcontext) -> list[Any]:  # fmt: skip
        """The preview images; ``unet_context`` (autocast) around the sampling only, the decode outside it."""
        from PIL import Image

        images = []
        for prompt, seed in zip(self.prompts, self.seeds, strict=True):
            noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))
            with unet_context():
                lat = sample_latents(unet, encoder([prompt], device=device), config, latent_shape, eta=self.eta, noise=noise)
            with torch.autocast(device_type=lat.device.type, enabled=False):
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
    scorer_modules: Sequence[Any] = (),
    offload_device: Any = "cpu",
    overwrite: bool = False,
    run_record: dict[str, Any] | None = None,
) -> RunResult:
    """Train the SPO LoRA on ``prompts``; resume from ``out_dir``'s last checkpoint if there is one.

    ``scorer_for(batch_prompts)`` returns the step-aware scorer for one prompt batch.
    ``stop_after_epochs`` ends the run early (after its checkpoint) — for tests and time limits.
    ``offload_text_encoders``: after every prompt is encoded once (cache on), move the text
    encoders to the CPU to free accelerator memory. ``run_record`` is written into spo_config.json
    next to the options (e.g. the memory plan). With ``config.offload_scorer`` the ``scorer_modules``
    (the SPM and the VAE) are moved to ``offload_device`` for every training pass and back to the UNet's
    device for every rollout and preview. Raises :class:`NothingDone` (and writes no
    LoRA) when the whole run kept no pair to train on.
    """
    if not prompts:
        raise HwError("no prompts to train on")
    loop = _Loop.start(unet, encoder, prompts, config, Path(out_dir), latent_shape, accelerator, logger, preview)
    if config.offload_scorer:
        loop.offload, loop.offload_device = list(scorer_modules), offload_device
    if encoder.use_cache:  # encode in a fixed grouping, so a resumed run sees bit-identical embeddings
        for i in range(0, len(prompts), config.sample_batch_size):
            encoder(list(prompts[i : i + config.sample_batch_size]))
        for p in preview.prompts if preview is not None else []:
            encoder([p])
        if offload_text_encoders:
            encoder.offload("cpu")
    if loop.main and preview is not None and loop.start_epoch == 0 and not (loop.out / SAMPLES_DIR / "epoch_0000").exists():
        loop.write_preview(0)
    for epoch in range(loop.start_epoch, config.num_epochs):
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            return RunResult(epochs_done=epoch, history=loop.history, resumed_from=loop.start_epoch)
        loop.epoch(epoch, scorer_for)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not loop.main:
        return RunResult(epochs_done=config.num_epochs, history=loop.history, resumed_from=loop.start_epoch)
    if not any(h.get("trained") for h in loop.history):
        raise NothingDone(_nothing_trained(loop.history, config))
    return loop.finish(save_formats, overwrite, run_record or {})


def _nothing_trained(history: list[dict[str, Any]], config: SPOConfig) -> str:
    gaps = [h["best_gap"] for h in history if h.get("best_gap") is not None]
    best = f"; the largest softmax gap seen was {max(gaps):.3f}" if gaps else ""
    return (f"no pair passed the threshold {config.threshold} in {len({h['epoch'] for h in history})} epoch(s), so nothing was "
            f"trained and no LoRA was written{best}: lower it (--set threshold=…), raise num_candidates, or check that --spm "
            "tells the candidates apart")  # fmt: skip


@dataclass
class _Loop:
    """The state of one run: models, optimizer, process layout, history; one method per stage."""

    unet: Any
    model: Any
    opt: Any
    params: list[torch.nn.Parameter]
    encoder: PromptEncoder
    prompts: Sequence[str]
    config: SPOConfig
    out: Path
    latent_shape: Sequence[int]
    accelerator: Any
    logger: TrainLogger | None
    preview: Preview | None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    world: int = 1
    rank: int = 0
    main: bool = True
    micro: int = 0  # micro-steps accumulated since the last optimizer step (carried across rollout batches)
    norms: list[float] = field(default_factory=list)  # gradient norms of this batch's optimizer steps
    skipped: int = 0  # optimizer steps of this batch the fp16 loss scaler skipped (non-finite gradients)
    offload: list[Any] = field(default_factory=list)  # modules kept off the accelerator while training (offload_scorer)
    offload_device: Any = "cpu"

    @classmethod
    def start(cls, unet: Any, encoder: PromptEncoder, prompts: Sequence[str], config: SPOConfig, out: Path, latent_shape: Sequence[int],
              accelerator: Any, logger: TrainLogger | None, preview: Preview | None) -> _Loop:  # fmt: skip
        torch.manual_seed(config.seed)  # the LoRA's random init (DDP also broadcasts rank 0's weights)
        params = add_spo_lora(unet, config)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        loop = cls(unet, unet, make_optimizer(params, config), params, encoder, prompts, config, out, latent_shape, accelerator,
                   logger, preview)  # fmt: skip
        if accelerator is not None:
            loop.world, loop.rank, loop.main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
        saved = loop._resume()
        if accelerator is not None:
            loop.model, loop.opt = accelerator.prepare(unet, loop.opt)
            if saved is not None and saved.get("scaler") is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(saved["scaler"])
        return loop

    def _resume(self) -> dict[str, Any] | None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return None
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        _check_resumable(saved["config"], self.config, ckpt)
        named = dict(self.unet.named_parameters())
        with torch.no_grad():
            for n, t in saved["lora"].items():
                named[n].copy_(t)
        self.opt.load_state_dict(saved["optimizer"])
        self.start_epoch, self.history = int(saved["epoch"]), list(saved["history"])
        if self.logger is not None:
            self.logger.info(f"resuming from {ckpt} (epoch {self.start_epoch} of {self.config.num_epochs})")
            if int(saved.get("world", self.world)) != self.world:
                self.logger.info(f"the checkpoint was written by {saved.get('world')} processes, now {self.world}: "
                                 "the run continues correctly but will not match an uninterrupted run exactly")  # fmt: skip
        return saved

    @property
    def scaler(self) -> Any:
        return self.accelerator.scaler if self.accelerator is not None else None

    @property
    def autocast(self) -> Callable[[], Any]:
        return self.accelerator.autocast if self.accelerator is not None else contextlib.nullcontext

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def epoch(self, epoch: int, scorer_for: Callable[[Sequence[str]], Scorer]) -> None:
        config, t_epoch = self.config, time.perf_counter()
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(_seed(config, epoch, 0)))
        n_batches = math.ceil(len(self.prompts) / (config.sample_batch_size * self.world))
        for b, all_rows in enumerate(order.split(config.sample_batch_size * self.world)):
            self.batch(epoch, b, all_rows, scorer_for, epoch * n_batches + b)
        if self.micro:  # the epoch's last accumulated micro-steps: step now, so every checkpoint holds no pending gradients
            if self.world > 1:  # they were accumulated under no_sync: average them over the processes as DDP would
                for p in self.params:
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
            self.optimizer_step(epoch, n_batches - 1)
        if self.main and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.num_epochs):
            _save_checkpoint(self.out / CKPT_DIR / f"epoch_{epoch + 1:04d}.pt", self.unet, self.opt, epoch + 1, config, self.history,
                             self.world, self.scaler)  # fmt: skip
        if self.main and self.preview is not None and self.preview.due(epoch + 1, config.num_epochs):
            self.write_preview(epoch + 1)
        if self.logger is not None and self.main:
            self.logger.epoch(_epoch_summary(self.history, epoch, time.perf_counter() - t_epoch))

    def batch(self, epoch: int, b: int, all_rows: torch.Tensor, scorer_for: Callable[[Sequence[str]], Scorer], step: int) -> None:
        config, device, t0 = self.config, self.device, time.perf_counter()
        rows = all_rows[self.rank :: self.world]
        if len(rows) == 0:  # fewer prompts than processes in the last batch: reuse the first
            rows = all_rows[:1]
        batch_prompts = [self.prompts[int(i)] for i in rows]
        g = torch.Generator(device=device).manual_seed(_seed(config, epoch, b + 1) + 7919 * self.rank)
        cond = self.encoder(batch_prompts, device=device)
        self.place_scorer(device)
        timed = _TimedScorer(scorer_for(batch_prompts))
        roll = spo_rollout(self.unet, cond, timed, config, self.latent_shape, g, unet_context=self.autocast)
        t_roll = time.perf_counter() - t0
        st = roll.stats
        rec: dict[str, Any] = {
            "epoch": epoch, "batch": b, "pairs": len(roll.transitions), "acceptance": st.acceptance_rate,
            "reward_final": _mean(st.final_scores), "reward_kept": _mean(st.kept_scores), "reward_all": _mean(st.all_scores),
            "reward_win": _mean(st.win_scores), "reward_lose": _mean(st.lose_scores), "best_gap": _best_gap(st.all_scores, config),
        }  # fmt: skip
        tr = roll.transitions
        tr.prompt_idx = rows.to(tr.prompt_idx.device)[tr.prompt_idx]  # global prompt ids
        if self.accelerator is not None:
            tr = gather_and_split(tr, self.accelerator, _seed(config, epoch, b + 1))
        t1 = time.perf_counter()
        rec["trained"] = len(tr)
        if len(tr):
            self.place_scorer(self.offload_device)
            rec.update(self.train_on(tr, epoch, b))
        self.history.append(rec)
        if self.logger is not None:
            timing = {"time/step": time.perf_counter() - t0, "time/sampling": t_roll - timed.seconds,
                      "time/decode_score": timed.seconds, "time/training": time.perf_counter() - t1}  # fmt: skip
            self.logger.scalars({**_scalars(rec), **timing}, step)

    def train_on(self, tr: Transitions, epoch: int, b: int) -> dict[str, float]:
        """One pass over this process's transitions in micro-batches; the optimizer steps every
        ``gradient_accumulation_steps`` micro-steps, counted across rollout batches (as the official loop's accelerate
        ``accumulate``), and at the end of each epoch."""
        config, accelerator = self.config, self.accelerator
        tr = tr.index(torch.randperm(len(tr), generator=torch.Generator().manual_seed(_seed(config, epoch, b + 1))).to(tr.t.device))
        uniq, local = tr.prompt_idx.unique(return_inverse=True)
        tr.prompt_idx = local
        cond = self.encoder([self.prompts[int(i)] for i in uniq], device=self.device)
        losses: list[float] = []
        accs: list[float] = []
        self.norms, self.skipped = [], 0
        for idx in torch.arange(len(tr)).split(config.train_batch_size):
            boundary = self.micro + 1 == config.gradient_accumulation_steps
            no_sync = accelerator is not None and not boundary
            with accelerator.no_sync(self.model) if no_sync else contextlib.nullcontext():
                try:
                    loss, st = spo_loss(self.model, tr.index(idx), cond, config)
                except NonFiniteError as e:
                    raise self._saved_nonfinite(e, epoch, b) from e
                scaled = loss / config.gradient_accumulation_steps
                accelerator.backward(scaled) if accelerator is not None else scaled.backward()
            self.micro += 1
            losses.append(float(loss.detach()))
            accs.append(float(st["implicit_acc"].mean()))
            if boundary:
                self.optimizer_step(epoch, b)
        rec = {"loss": sum(losses) / len(losses), "implicit_acc": sum(accs) / len(accs)}
        if self.norms:
            rec["grad_norm"] = sum(self.norms) / len(self.norms)
        if self.skipped:
            rec["skipped_steps"] = self.skipped
        return rec

    def optimizer_step(self, epoch: int, b: int) -> None:
        norm = clip_gradients(self.params, self.config.max_grad_norm, self.accelerator)
        self.micro = 0
        if not math.isfinite(norm):
            if self.scaler is None:  # fp16's loss scaler skips such steps and lowers its scale; otherwise it is fatal
                self.opt.zero_grad(set_to_none=True)
                raise self._saved_nonfinite(NonFiniteError(f"non-finite gradient norm in the SPO step: {NONFINITE_FIXES['gradient']}"),
                                            epoch, b)  # fmt: skip
            self.skipped += 1
        else:
            self.norms.append(norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _saved_nonfinite(self, e: Exception, epoch: int, b: int) -> NonFiniteError:
        bad = self.out / CKPT_DIR / "nonfinite.pt"
        if self.main:
            _save_checkpoint(bad, self.unet, self.opt, epoch, self.config, self.history, self.world, self.scaler)
        last = latest_checkpoint(self.out)
        hint = f"; the last good checkpoint is {last}" if last is not None else ""
        return NonFiniteError(f"{e} (epoch {epoch + 1}, batch {b + 1}); state saved to {bad}{hint}")

    def place_scorer(self, device: Any) -> None:
        """Phase boundary of offload_scorer: the SPM and VAE onto ``device`` (no-op when already there or not offloading)."""
        for m in self.offload:
            m.to(device)
        if self.offload and torch.device(device).type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the freed blocks back, so the training step can use them

    def write_preview(self, epoch: int) -> None:
        assert self.preview is not None
        self.place_scorer(self.device)  # the preview decodes with the VAE
        images = self.preview.render(self.unet, self.encoder, self.config, self.latent_shape, self.device, unet_context=self.autocast)
        self.preview.write(images, self.out / SAMPLES_DIR / f"epoch_{epoch:04d}")
        if self.logger is not None:
            self.logger.images("samples", images, self.preview.prompts, epoch)

    def finish(self, save_formats: Sequence[str], overwrite: bool, run_record: dict[str, Any]) -> RunResult:
        from pycore.lora.convert import save_lora

        meta = {"hw_spo_config": json.dumps(self.config.to_dict())}
        paths = []
        for fmt in save_formats:
            p = self.out / f"spo_lora_{fmt}.safetensors"
            save_lora(self.unet, p, fmt, metadata=meta, overwrite=overwrite)
            paths.append(p)
        record = {**self.config.to_dict(), **run_record}
        write_text_atomic(self.out / "spo_config.json", json.dumps(record, indent=2) + "\n", overwrite=True)
        return RunResult(epochs_done=self.config.num_epochs, history=self.history, lora_paths=paths, resumed_from=self.start_epoch)


def _gap(win: float, lose: float) -> float:
    p = torch.softmax(torch.tensor([win, lose]), 0)
    return float(p[0] - p[1])


def _best_gap(scores: list[float], config: SPOConfig) -> float | None:
    """The largest softmax gap of any (best, worst) candidate group of this batch (diagnoses 'nothing kept')."""
    k = config.num_candidates
    groups = [scores[i : i + k] for i in range(0, len(scores) - k + 1, k)]
    return max((_gap(max(g), min(g)) for g in groups), default=None)


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
