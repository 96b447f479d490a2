"""`hw spm-score` and `hw spm-train`: the step-aware preference model (SPO's reward model)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import Json, Out, Overwrite, console, print_json, progress, warn
from pycore.errors import HwError

SCORE_HELP = """Score every image of a manifest against its prompt with a (step-aware) preference model.

Adds a score column (logit-scaled cosine similarity, PickScore scale) and a column with the reason
for rows that could not be scored. --model takes a released SPO preference model (spo-sdxl,
spo-sd15, a .bin file or a hub file owner/repo/file.bin), a folder written by `hw spm-train`, or a
plain CLIP/PickScore model (hub name or folder) — the latter is a PickScore-style ranking.
"""

TRAIN_HELP = """Train a step-aware preference model on preference pairs (SPO's noising procedure).

PAIRS is a Pick-a-Pic-style Parquet table (caption, jpg_0, jpg_1, label_0) or a folder of such
shards, or the manifest form (prompt, image_a, image_b, preferred = a/b/tie). Each step draws
t ~ U{0..999}, noises both images with the same noise, lets the frozen base model predict x̂0 with
CFG, decodes it and trains the SPM to prefer the right one at t. OUT receives the model
(hw_spm.json + model.safetensors + tokenizer), report.json (held-out accuracy per timestep) and
checkpoints/ (resume with --resume). Multi-GPU: `accelerate launch -m cli.app spm-train ...`.
"""

#: Manifest statuses from reading the file: nothing to decode (too_large: a decompression bomb).
_UNREADABLE = {"empty", "truncated", "not_image", "corrupt", "unsupported", "too_large", "permission_denied",
               "not_found", "broken_symlink", "symlink_loop", "not_a_file", "io_error"}  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("spm-score", help=SCORE_HELP, no_args_is_help=True)(spm_score)
    app.command("spm-train", help=TRAIN_HELP, no_args_is_help=True)(spm_train)


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def spm_score(
    manifest: Annotated[Path, typer.Argument(help="Manifest .parquet (from hw bucket or any later command).", show_default=False)],
    out: Out,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="Column holding each image's prompt/caption.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One prompt for every image (instead of --prompt-column).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="spo-sdxl, spo-sd15, a .bin/.safetensors checkpoint, an hw spm-train folder, or a CLIP/PickScore model.")] = "yuvalkirstain/PickScore_v1",
    base: Annotated[str | None, typer.Option("--base", help="CLIP config a released .bin was trained from (default yuvalkirstain/PickScore_v1).")] = None,
    processor: Annotated[str | None, typer.Option("--processor", help="Tokenizer source (default: the model's own, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K).")] = None,
    timestep: Annotated[int, typer.Option("--timestep", "-t", help="Timestep to score at (0 = clean images).", min=0, max=999)] = 0,
    column: Annotated[str, typer.Option("--column", help="Name of the score column to add.")] = "spm_score",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16 (half precision needs a GPU to be fast).")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.", min=1)] = 16,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.manifest import fs_paths, read_manifest, write_manifest

    t0 = time.perf_counter()
    if (prompt_column is None) == (prompt is None):
        raise HwError("pass exactly one of --prompt-column and --prompt")
    if out.exists() and not overwrite:
        raise HwError(f"{out} exists; pass --overwrite to replace it")
    frame = read_manifest(manifest)
    if prompt_column is not None and prompt_column not in frame.columns:
        raise HwError(f"manifest {manifest} has no column {prompt_column!r} (columns: {', '.join(frame.columns)})")
    err_col = f"{column}_error"
    for c in (column, err_col):
        if c in frame.columns and not overwrite:
            raise HwError(f"manifest already has a column {c!r}; pass --column NAME or --overwrite to replace it")

    import polars as pl
    import torch

    from pycore.spo.preference import StepAwarePreferenceModel, parse_dtype
    from pycore.spo.spm_data import score_files

    dt = parse_dtype(dtype)
    dev = _device(device)
    if dev == "cpu" and dt == torch.float16:
        warn("fp16 on CPU is slow and not supported by every op; use fp32 or bf16 on CPU")
    spm = StepAwarePreferenceModel.from_pretrained(model, base=base, processor=processor, dtype=dt, device=dev)
    spm.requires_grad_(False)

    paths = fs_paths(frame)
    statuses = frame["status"].to_list()
    prompts = frame[prompt_column].cast(pl.String, strict=False).to_list() if prompt_column else [prompt] * frame.height
    idx = [i for i, s in enumerate(statuses) if s not in _UNREADABLE]
    scores: list[float | None] = [None] * frame.height
    errors: list[str | None] = [f"status {s}" if s in _UNREADABLE else None for s in statuses]
    with progress(disable=json_out) as bar:
        task = bar.add_task("scoring", total=len(idx), rate="")
        started = time.perf_counter()
        done = [0]

        def on_progress(n: int) -> None:
            done[0] += n
            bar.update(task, advance=n, rate=f"{done[0] / max(time.perf_counter() - started, 1e-9):,.1f} img/s")

        s, e = score_files(spm, [paths[i] for i in idx], [prompts[i] for i in idx], timestep=timestep,
                           batch_size=batch_size, progress=on_progress)  # fmt: skip
    for k, i in enumerate(idx):
        scores[i], errors[i] = s[k], e[k]
    frame = frame.with_columns(pl.Series(column, scores, dtype=pl.Float32), pl.Series(err_col, errors, dtype=pl.String))
    meta = {"spm_score": {"model": model, "timestep": timestep, "dtype": dtype, "column": column,
                          "prompt_column": prompt_column, "prompt": prompt}}  # fmt: skip
    write_manifest(frame, out, metadata=meta, overwrite=overwrite)
    scored = [v for v in scores if v is not None]
    report = {"out": str(out), "rows": frame.height, "scored": len(scored), "not_scored": frame.height - len(scored),
              "mean": sum(scored) / len(scored) if scored else None, "min": min(scored, default=None),
              "max": max(scored, default=None), "model": model, "timestep": timestep,
              "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    if json_out:
        print_json(report)
        return
    console.print(f"{len(scored):,} of {frame.height:,} images scored with {model} at t={timestep} in {report['seconds']:.1f}s"
                  + (f": mean {report['mean']:.3f}, min {report['min']:.3f}, max {report['max']:.3f}" if scored else ""))  # fmt: skip
    if report["not_scored"]:
        reasons: dict[str, int] = {}
        for v, r in zip(scores, errors, strict=True):
            if v is None:
                key = (r or "unknown").split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
        console.print("not scored: " + ", ".join(f"{k} {v:,}" for k, v in reasons.items()) + f"  (see {err_col})")
    console.print(f"manifest → {out}")


def spm_train(
    pairs: Annotated[Path, typer.Argument(help="Pairs table (.parquet/.csv/.jsonl) or a folder of Parquet shards.", show_default=False)],
    base_model: Annotated[str, typer.Option("--base-model", help="Frozen diffusion model (diffusers folder or hub name), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (model, report.json, checkpoints/).", show_default=False)],
    init: Annotated[str, typer.Option("--init", help="Start from this SPM or plain CLIP/PickScore (hub name or path).")] = "yuvalkirstain/PickScore_v1",
    init_base: Annotated[str | None, typer.Option("--init-base", help="CLIP config for a released .bin passed as --init.")] = None,
    processor: Annotated[str | None, typer.Option("--processor", help="Tokenizer source for the SPM.")] = None,
    model_type: Annotated[str, typer.Option("--model-type", help="sd15, sdxl or auto.")] = "auto",
    vae: Annotated[str | None, typer.Option("--vae", help="Replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix.")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Separate validation pairs (default: hold out --val-fraction of the prompts).")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of prompts held out for evaluation.")] = 0.05,
    max_val_pairs: Annotated[int, typer.Option("--max-val-pairs", help="At most this many validation pairs.", min=1)] = 500,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="Name of the caption/prompt column if not caption/prompt.")] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", help="VAE resolution (default 512 SD1.5, 1024 SDXL).")] = None,
    cfg_scale: Annotated[float, typer.Option("--cfg-scale", help="Classifier-free guidance for the x̂0 prediction.")] = 5.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Pairs per device per micro-step.", min=1)] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.", min=1)] = 1,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.", min=1)] = 8000,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (SPO: 3e-6 SD1.5, 1e-6 SDXL).")] = 3e-6,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.3,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.", min=0)] = 500,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping (0 = off).", min=0.0)] = 1.0,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, fp16 or bf16.")] = "no",
    base_dtype: Annotated[str, typer.Option("--base-dtype", help="Frozen diffusion model dtype: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16.")] = "auto",
    label_scorer: Annotated[str | None, typer.Option("--label-scorer", help="Relabel pairs with this plain scorer on the clean images (e.g. yuvalkirstain/PickScore_v1).")] = None,
    label_margin: Annotated[float, typer.Option("--label-margin", help="With --label-scorer: a win needs p_w − p_l above this, else tie.")] = 0.1,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (and at the end).", min=1)] = 500,
    eval_timesteps: Annotated[str, typer.Option("--eval-timesteps", help="Comma-separated timesteps for evaluation.")] = "0,251,501,701,951",
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable checkpoint every N steps.", min=1)] = 500,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="Checkpoints to keep.", min=1)] = 2,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUT.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute vision activations to save memory.")] = False,
    num_workers: Annotated[int, typer.Option("--num-workers", help="DataLoader worker processes.", min=0)] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, shuffling, timesteps and noise.", min=0)] = 0,
    log_every: Annotated[int, typer.Option("--log-every", help="Log the loss every N steps.", min=1)] = 10,
    cpu: Annotated[bool, typer.Option("--cpu", help="Run on CPU even if a GPU is present.")] = False,
    json_out: Json = False,
    overwrite: Overwrite = False,
) -> None:
    from pycore.spo.spm_train import SPMTrainConfig, train

    try:
        ts = tuple(int(x) for x in eval_timesteps.split(",") if x.strip())
    except ValueError:
        raise HwError(f"--eval-timesteps must be comma-separated integers, got {eval_timesteps!r}") from None
    cfg = SPMTrainConfig(
        pairs=str(pairs), out=str(out), base_model=base_model, init=init, init_base=init_base, processor=processor,
        model_type=model_type, vae=vae, val=str(val) if val else None, val_fraction=val_fraction,
        max_val_pairs=max_val_pairs, prompt_column=prompt_column, resolution=resolution, cfg_scale=cfg_scale,
        batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, mixed_precision=mixed_precision, base_dtype=base_dtype,
        label_scorer=label_scorer, label_margin=label_margin, eval_every=eval_every, eval_timesteps=ts,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume, overwrite=overwrite,
        gradient_checkpointing=gradient_checkpointing, num_workers=num_workers, seed=seed, log_every=log_every, cpu=cpu,
    )  # fmt: skip

    def log(msg: str) -> None:
        if not json_out:
            console.print(msg, soft_wrap=True)

    with progress(disable=json_out) as bar:
        task = bar.add_task("training", total=cfg.max_steps, rate="")

        def on_step(step: int, total: int) -> None:
            bar.update(task, completed=step, rate=f"step {step}")

        report = train(cfg, log=log, on_step=on_step)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch / torchrun: one process reports
        return
    if json_out:
        print_json(report)
        return
    final = report["final"]
    console.print("held-out accuracy by timestep: " + ", ".join(
        f"t={t} {a:.1%} ({final['pairs'][t]} pairs)" if a is not None else f"t={t} n/a" for t, a in final["accuracy"].items()))  # fmt: skip
    console.print(f"model → {out} (load with --model {out}); report → {out / 'report.json'}")
