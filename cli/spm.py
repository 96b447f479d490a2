"""`hw spm-score` and `hw spm-train`: the step-aware preference model (SPO's reward model).

Thin: options → a request (pycore.spm.score.ScoreRequest / pycore.spm.config.SPMTrainConfig) →
one pycore call → a short summary or --json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import BarProgress, console, print_json
from cli.scale_options import Ray, RayWorkers
from pycore.errors import HwError

SCORE_HELP = """Score every image of a manifest against its prompt with a (step-aware) preference model.

Adds a score column (logit-scaled cosine similarity, PickScore scale) and a column with the reason
for rows that could not be scored; every earlier column and metadata key is kept. --model takes a
released SPO preference model (spo-sdxl, spo-sd15, a .bin file or a hub file owner/repo/file.bin),
a folder written by `hw spm-train`, or a plain CLIP/PickScore model (hub name or folder) — the
latter is a PickScore-style ranking.

Example: hw spm-score captioned.parquet --prompt-column caption --model spo-sdxl --timestep 0 --out scored.parquet
"""

TRAIN_HELP = """Train a step-aware preference model on preference pairs (SPO's noising procedure).

PAIRS is a Pick-a-Pic-style Parquet table (caption, jpg_0, jpg_1, label_0) or a folder of such
shards, or the manifest form (prompt, image_a, image_b, preferred = a/b/tie) as .parquet/.csv/.jsonl,
whose relative image paths are resolved against the pairs file's folder. Each step draws
t ~ U{0..999}, noises both images with the same noise, lets the frozen base model predict x̂0 with
CFG, decodes it and trains the SPM to prefer the right one at t. OUT receives the model
(hw_spm.json + model.safetensors + tokenizer), report.json (held-out accuracy per timestep) and
checkpoints/ (resume with --resume). Multi-GPU: `accelerate launch -m cli.app spm-train ...`.

Example: hw spm-train pairs.csv --base-model stabilityai/stable-diffusion-xl-base-1.0 --out runs/my_spm --max-steps 2000
"""

IO, MODEL, RUN, OUTPUT = "Input and output", "Model", "Run", "Output"
DATA, BASE, OPTIM, EVAL = "Data", "Base model and noising", "Optimisation", "Evaluation and checkpoints"


def register(app: typer.Typer) -> None:
    app.command("spm-score", help=SCORE_HELP, no_args_is_help=True)(spm_score)
    app.command("spm-train", help=TRAIN_HELP, no_args_is_help=True)(spm_train)


def spm_score(
    manifest: Annotated[Path, typer.Argument(help="Manifest .parquet (from hw bucket or any later command).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output manifest (.parquet), written atomically.", show_default=False, rich_help_panel=IO)],
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="Text column holding each image's prompt/caption.", rich_help_panel=IO)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One prompt for every image (instead of --prompt-column).", rich_help_panel=IO)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="spo-sdxl, spo-sd15, a .bin/.safetensors checkpoint, an hw spm-train folder, or a CLIP/PickScore model.", rich_help_panel=MODEL)] = "yuvalkirstain/PickScore_v1",
    base: Annotated[str | None, typer.Option("--base", help="CLIP config a released .bin was trained from (default yuvalkirstain/PickScore_v1).", rich_help_panel=MODEL)] = None,
    processor: Annotated[str | None, typer.Option("--processor", help="Tokenizer source (default: the model's own, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K).", rich_help_panel=MODEL)] = None,
    timestep: Annotated[int, typer.Option("--timestep", "-t", help="Timestep to score at, 0..999 (0 = clean images).", rich_help_panel=MODEL)] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16 (half precision needs a GPU to be fast).", rich_help_panel=RUN)] = "fp32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=RUN)] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.", rich_help_panel=RUN)] = 16,
    column: Annotated[str, typer.Option("--column", help="Name of the score column to add.", rich_help_panel=IO)] = "spm_score",
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout.", rich_help_panel=IO)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output file and existing score columns.", rich_help_panel=IO)] = False,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
) -> None:
    from pycore.spm.score import ScoreRequest, score_manifest

    req = ScoreRequest(manifest=manifest, out=out, prompt_column=prompt_column, prompt=prompt, model=model, base=base,
                       processor=processor, timestep=timestep, column=column, dtype=dtype, device=device,
                       batch_size=batch_size, overwrite=overwrite, ray=ray, ray_workers=ray_workers)  # fmt: skip
    with BarProgress(disable=json_out) as bar:
        result = score_manifest(req, progress=bar)
    if json_out:
        print_json(result.to_dict())
        return
    summary = f": mean {result.mean:.3f}, min {result.min:.3f}, max {result.max:.3f}" if result.scored else ""
    console.print(f"{result.scored:,} of {result.rows:,} images scored with {model} at t={timestep} in {result.seconds:.1f}s{summary}")
    if result.not_scored:
        reasons = ", ".join(f"{k} {v:,}" for k, v in result.not_scored_reasons.items())
        console.print(f"not scored: {reasons}  (see {result.error_column})")
    console.print(f"manifest → {out}")


def _timesteps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise HwError(f"--eval-timesteps must be comma-separated integers, got {text!r}") from None


def spm_train(
    pairs: Annotated[Path, typer.Argument(help="Pairs table (.parquet/.csv/.jsonl) or a folder of Parquet shards; relative image paths are resolved against its folder.", show_default=False)],
    base_model: Annotated[str, typer.Option("--base-model", help="Frozen diffusion model (diffusers folder, hub name or .safetensors), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0.", show_default=False, rich_help_panel=BASE)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (model, report.json, checkpoints/).", show_default=False, rich_help_panel=OUTPUT)],
    init: Annotated[str, typer.Option("--init", help="Start from this SPM or plain CLIP/PickScore (hub name or path).", rich_help_panel=MODEL)] = "yuvalkirstain/PickScore_v1",
    init_base: Annotated[str | None, typer.Option("--init-base", help="CLIP config for a released .bin passed as --init.", rich_help_panel=MODEL)] = None,
    processor: Annotated[str | None, typer.Option("--processor", help="Tokenizer source for the SPM.", rich_help_panel=MODEL)] = None,
    model_type: Annotated[str, typer.Option("--model-type", help="sd15, sdxl or auto (from the base model's configs).", rich_help_panel=BASE)] = "auto",
    vae: Annotated[str | None, typer.Option("--vae", help="Replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix.", rich_help_panel=BASE)] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", help="VAE resolution (default 512 SD1.5, 1024 SDXL).", rich_help_panel=BASE)] = None,
    cfg_scale: Annotated[float, typer.Option("--cfg-scale", help="Classifier-free guidance for the x̂0 prediction.", rich_help_panel=BASE)] = 5.0,
    base_dtype: Annotated[str, typer.Option("--base-dtype", help="Frozen diffusion model dtype: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16.", rich_help_panel=BASE)] = "auto",
    val: Annotated[Path | None, typer.Option("--val", help="Separate validation pairs (default: hold out --val-fraction of the prompts).", rich_help_panel=DATA)] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of prompts held out for evaluation.", rich_help_panel=DATA)] = 0.05,
    max_val_pairs: Annotated[int, typer.Option("--max-val-pairs", help="At most this many validation pairs.", rich_help_panel=DATA)] = 500,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="Name of the caption/prompt column if not caption/prompt.", rich_help_panel=DATA)] = None,
    label_scorer: Annotated[str | None, typer.Option("--label-scorer", help="Relabel pairs with this plain scorer on the clean images (e.g. yuvalkirstain/PickScore_v1).", rich_help_panel=DATA)] = None,
    label_margin: Annotated[float, typer.Option("--label-margin", help="With --label-scorer: a win needs p_w − p_l above this, else tie.", rich_help_panel=DATA)] = 0.1,
    num_workers: Annotated[int, typer.Option("--num-workers", help="DataLoader worker processes.", rich_help_panel=DATA)] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Pairs per device per micro-step.", rich_help_panel=OPTIM)] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.", rich_help_panel=OPTIM)] = 1,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.", rich_help_panel=OPTIM)] = 8000,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (SPO: 3e-6 SD1.5, 1e-6 SDXL).", rich_help_panel=OPTIM)] = 3e-6,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.", rich_help_panel=OPTIM)] = 0.3,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.", rich_help_panel=OPTIM)] = 500,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping (0 = off).", rich_help_panel=OPTIM)] = 1.0,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, fp16 or bf16.", rich_help_panel=OPTIM)] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute vision activations to save memory.", rich_help_panel=OPTIM)] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, shuffling, timesteps and noise.", rich_help_panel=OPTIM)] = 0,
    cpu: Annotated[bool, typer.Option("--cpu", help="Run on CPU even if a GPU is present.", rich_help_panel=OPTIM)] = False,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (and at the end).", rich_help_panel=EVAL)] = 500,
    eval_timesteps: Annotated[str, typer.Option("--eval-timesteps", help="Comma-separated timesteps for evaluation.", rich_help_panel=EVAL)] = "0,251,501,701,951",
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable checkpoint every N steps.", rich_help_panel=EVAL)] = 500,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="Checkpoints to keep.", rich_help_panel=EVAL)] = 2,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUT.", rich_help_panel=EVAL)] = False,
    log_every: Annotated[int, typer.Option("--log-every", help="Log the loss every N steps.", rich_help_panel=OUTPUT)] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.", rich_help_panel=OUTPUT)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an OUT that holds a model or checkpoints.", rich_help_panel=OUTPUT)] = False,
) -> None:
    from pycore.spm.config import SPMTrainConfig
    from pycore.spm.train import train

    cfg = SPMTrainConfig(
        pairs=str(pairs), out=str(out), base_model=base_model, init=init, init_base=init_base, processor=processor,
        model_type=model_type, vae=vae, val=str(val) if val else None, val_fraction=val_fraction,
        max_val_pairs=max_val_pairs, prompt_column=prompt_column, resolution=resolution, cfg_scale=cfg_scale,
        batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, max_grad_norm=max_grad_norm, mixed_precision=mixed_precision, base_dtype=base_dtype,
        label_scorer=label_scorer, label_margin=label_margin, eval_every=eval_every, eval_timesteps=_timesteps(eval_timesteps),
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume, overwrite=overwrite,
        gradient_checkpointing=gradient_checkpointing, num_workers=num_workers, seed=seed, log_every=log_every, cpu=cpu,
    )  # fmt: skip

    def log(msg: str) -> None:
        if not json_out:
            console.print(msg, soft_wrap=True)

    with BarProgress(disable=json_out) as bar:
        report = train(cfg, log=log, progress=bar)
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
