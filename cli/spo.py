"""`hw spo-train` and `hw spo-sample`: Step-aware Preference Optimization of SDXL / SD1.5 as a LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, print_json, progress
from pycore.limits import MAX_RESOLUTION

TRAIN_HELP = """Fine-tune SDXL (or SD1.5) with Step-aware Preference Optimization, as a LoRA.

Each epoch samples every prompt with stochastic DDIM, branching into k candidates at the
configured steps; the step-aware preference model (--spm) judges the candidates' x̂0 at their own
timestep, confident best/worst pairs train the LoRA with SPO's clamped-ratio DPO loss against the
LoRA-disabled model. Presets `sdxl` and `sd15` are the official settings (see --list-options);
change any option with --config FILE (JSON/TOML), the options below, or --set KEY=VALUE.

OUT receives spo_lora_diffusers.safetensors (pipe.load_lora_weights), spo_lora_kohya.safetensors
(ComfyUI/A1111), spo_config.json, checkpoints/ (continue with --resume), samples/ (fixed prompts
and seeds per epoch; epoch_0000 = the base model), logs/ (TensorBoard) and train_log.jsonl.
Several GPUs or nodes: `accelerate launch -m cli.app spo-train ...`. On CUDA, --memory auto picks
the fastest option set that fits the card; --plan prints it without loading weights.

Example: hw spo-train --base stabilityai/stable-diffusion-xl-base-1.0 --spm spo-sdxl --prompts prompts.txt --out spo_run
"""

SAMPLE_HELP = """Generate images with SPO's evaluation settings (DDIM 20 steps, CFG 5) for before/after comparisons.

Loads the LoRA with diffusers' own load_lora_weights (diffusers or kohya files). --compare renders
each prompt and seed without and with the LoRA (OUT/base, OUT/lora, grid.png); with --spm the images
are scored at t = 0 and the mean paired gain is reported with its standard error.

Example: hw spo-sample --base stabilityai/stable-diffusion-xl-base-1.0 --prompts prompts.txt --lora spo_run/spo_lora_diffusers.safetensors --compare --spm spo-sdxl --out samples
"""

S_IO, S_MODELS, S_SAMPLING, S_RUN = "Prompts and output", "Models", "Sampling", "Run"

Base = Annotated[str, typer.Option("--base", help="SDXL/SD1.5 model: hub name (stabilityai/stable-diffusion-xl-base-1.0), diffusers folder, or single .safetensors file.", show_default=False, rich_help_panel=S_MODELS)]
Vae = Annotated[str | None, typer.Option("--vae", help="Replacement VAE (hub name, folder or file), e.g. madebyollin/sdxl-vae-fp16-fix for fp16 decoding.", rich_help_panel=S_MODELS)]
BaseConfig = Annotated[str | None, typer.Option("--base-config", help="For a single-file --base: the diffusers repo/folder whose configs describe it (default: the official SDXL/SD1.5 repo).", rich_help_panel=S_MODELS)]
Prompts = Annotated[Path, typer.Option("--prompts", help="Prompts: .txt (one per line), .jsonl (prompt/caption key), or a manifest/table .parquet/.csv.", show_default=False, rich_help_panel=S_IO)]
PromptColumn = Annotated[str | None, typer.Option("--prompt-column", help="Column/key holding the prompt (e.g. caption from hw caption).", rich_help_panel=S_IO)]
SpmBase = Annotated[str | None, typer.Option("--spm-base", help="CLIP config a released SPM .bin was trained from (default yuvalkirstain/PickScore_v1).", rich_help_panel=S_MODELS)]
SpmProcessor = Annotated[str | None, typer.Option("--spm-processor", help="Tokenizer source for the SPM.", rich_help_panel=S_MODELS)]


def register(app: typer.Typer) -> None:
    app.command("spo-train", help=TRAIN_HELP, no_args_is_help=True)(spo_train)
    app.command("spo-sample", help=SAMPLE_HELP, no_args_is_help=True)(spo_sample)


def _list_options() -> None:
    from rich.table import Table

    from pycore.spo.config import PRESETS
    from pycore.spo.settings import options_table

    t = Table(title="SPO options (--set KEY=VALUE or a --config file); defaults of the sdxl preset", show_lines=False)
    t.add_column("option")
    t.add_column("sdxl")
    t.add_column("sd15")
    t.add_column("meaning")
    sd15 = PRESETS["sd15"]
    for name, default, help_ in options_table():
        t.add_row(name, default, str(sd15.get(name, "")) if name in sd15 else "", help_)
    console.print(t)


REQ, TRAIN, MEM, MODELS, LOGS, RUN = ("Required (not needed with --plan, --print-config, --list-options)", "Training", "Memory and precision",
                                     "Models", "Samples and logs", "Run control")  # fmt: skip


def spo_train(
    base: Annotated[str | None, typer.Option("--base", help="[required] SDXL/SD1.5 model: hub name (stabilityai/stable-diffusion-xl-base-1.0), diffusers folder, or single .safetensors file.", show_default=False, rich_help_panel=REQ)] = None,
    spm: Annotated[str | None, typer.Option("--spm", help="[required] Step-aware preference model: spo-sdxl, spo-sd15, a .bin/.safetensors file, an hw spm-train folder, or a plain CLIP/PickScore model.", show_default=False, rich_help_panel=REQ)] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="[required] Training prompts: .txt (one per line), .jsonl, or a manifest/table .parquet/.csv.", show_default=False, rich_help_panel=REQ)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="[required] Output folder (LoRA, config, checkpoints, samples, logs).", show_default=False, rich_help_panel=REQ)] = None,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="Column/key holding the prompt (e.g. caption from hw caption).", rich_help_panel=MODELS)] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Official settings to start from: sdxl or sd15 (default: the base model's family).", rich_help_panel=TRAIN)] = None,
    config: Annotated[Path | None, typer.Option("--config", help="JSON or TOML file of SPO options (see --list-options); may name a preset.", rich_help_panel=TRAIN)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any option as KEY=VALUE (repeatable), e.g. --set threshold=0.3 --set logprob_reduction=sum.", rich_help_panel=TRAIN)] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the prompts (official 10).", min=1, rich_help_panel=TRAIN)] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="LoRA rank (official 64 SDXL, 4 SD1.5).", rich_help_panel=TRAIN)] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", "--lr", help="AdamW learning rate (official 1e-5 SDXL, 6e-5 SD1.5).", rich_help_panel=TRAIN)] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", help=f"Training resolution (official 1024 SDXL, 512 SD1.5; at most {MAX_RESOLUTION}).", rich_help_panel=TRAIN)] = None,
    sample_batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per process per rollout (official 2 SDXL, 10 SD1.5).", min=1, rich_help_panel=TRAIN)] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimiser step.", min=1, rich_help_panel=TRAIN)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of every random choice (official 42).", min=0, rich_help_panel=TRAIN)] = None,
    memory: Annotated[str, typer.Option("--memory", help="auto: on CUDA pick the fastest option set that fits the card (explicit options win); off: use the options as given.", rich_help_panel=MEM)] = "auto",
    gpu_memory: Annotated[float | None, typer.Option("--gpu-memory", help="Plan for a card of this many GiB instead of the detected card's free memory (works without a GPU with --plan).", rich_help_panel=MEM)] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the memory plan (per component and phase) without loading weights, and exit.", rich_help_panel=MEM)] = False,
    mixed_precision: Annotated[str | None, typer.Option("--mixed-precision", help="auto (fp16 on CUDA, as the official run; no on the CPU), no, fp16 or bf16: autocast around the policy UNet only, frozen weights in that dtype, LoRA and AdamW in fp32.", rich_help_panel=MEM)] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute UNet activations in backward (less memory, slower).", show_default=False, rich_help_panel=MEM)] = None,
    spm_dtype: Annotated[str | None, typer.Option("--spm-dtype", help="float32 (official), float16 or bfloat16; the SPM runs outside autocast.", rich_help_panel=MEM)] = None,
    vae_dtype: Annotated[str | None, typer.Option("--vae-dtype", help="auto (float16 on CUDA with an fp16-safe VAE, else float32), float32, float16 or bfloat16; the decode runs outside autocast.", rich_help_panel=MEM)] = None,
    vae_slicing: Annotated[bool | None, typer.Option("--vae-slicing/--no-vae-slicing", help="Decode one image at a time.", show_default=False, rich_help_panel=MEM)] = None,
    vae_tiling: Annotated[bool | None, typer.Option("--vae-tiling/--no-vae-tiling", help="Decode in tiles.", show_default=False, rich_help_panel=MEM)] = None,
    use_8bit_adam: Annotated[bool | None, typer.Option("--8bit-adam/--no-8bit-adam", help="bitsandbytes 8-bit AdamW (needs bitsandbytes and CUDA).", show_default=False, rich_help_panel=MEM)] = None,
    vae: Annotated[str | None, typer.Option("--vae", help="VAE that decodes x̂0 for the SPM (hub name, folder or file). SDXL default: madebyollin/sdxl-vae-fp16-fix (the official run's; finite in float16); --vae base keeps the base model's own VAE.", rich_help_panel=MODELS)] = None,
    base_config: Annotated[str | None, typer.Option("--base-config", help="For a single-file --base: the diffusers repo/folder whose configs describe it (default: the official SDXL/SD1.5 repo).", rich_help_panel=MODELS)] = None,
    spm_base: Annotated[str | None, typer.Option("--spm-base", help="CLIP config a released SPM .bin was trained from (default yuvalkirstain/PickScore_v1).", rich_help_panel=MODELS)] = None,
    spm_processor: Annotated[str | None, typer.Option("--spm-processor", help="Tokenizer source for the SPM.", rich_help_panel=MODELS)] = None,
    sample_prompts: Annotated[Path | None, typer.Option("--sample-prompts", help="Prompts for the per-epoch sample images (default: the first training prompts).", rich_help_panel=LOGS)] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Sample images per epoch (0 = none).", min=0, rich_help_panel=LOGS)] = 4,
    sample_every: Annotated[int, typer.Option("--sample-every", help="Write sample images every N epochs (and at the start and end).", min=1, rich_help_panel=LOGS)] = 1,
    no_tensorboard: Annotated[bool, typer.Option("--no-tensorboard", help="Do not write TensorBoard logs (train_log.jsonl is still written).", rich_help_panel=LOGS)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from its latest checkpoint (same settings).", rich_help_panel=RUN)] = False,
    stop_after_epochs: Annotated[int | None, typer.Option("--stop-after-epochs", help="Stop after this many epochs (checkpointed; continue later with --resume).", min=1, rich_help_panel=RUN)] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Run on the CPU even if a GPU is present.", rich_help_panel=RUN)] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved configuration as JSON and exit.", rich_help_panel=RUN)] = False,
    list_options: Annotated[bool, typer.Option("--list-options", help="List every SPO option with the official values and exit.", rich_help_panel=RUN)] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout instead of tables.", rich_help_panel=RUN)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an OUT that holds an earlier run (its checkpoints, samples, logs and LoRA are removed).", rich_help_panel=RUN)] = False,
) -> None:
    from pycore.spo.settings import explicit_fields, resolve_config

    if list_options:
        _list_options()
        return
    options = dict(num_epochs=epochs, lora_rank=lora_rank, learning_rate=learning_rate, resolution=resolution,
                   sample_batch_size=sample_batch_size, train_batch_size=sample_batch_size, gradient_accumulation_steps=grad_accum,
                   mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, spm_dtype=spm_dtype,
                   vae_dtype=vae_dtype, vae_slicing=vae_slicing, vae_tiling=vae_tiling, use_8bit_adam=use_8bit_adam, seed=seed)  # fmt: skip
    missing = [n for n, v in (("--base", base), ("--spm", spm), ("--prompts", prompts), ("--out", out)) if v is None]
    if missing and not (plan or print_config):
        raise typer.BadParameter("required, not given", param_hint=", ".join(missing))
    family = None
    if base is not None and (plan or not print_config):
        from pycore.diffusion.load import detect_family

        family = detect_family(base, single_file_config=base_config)
    cfg, _ = resolve_config(family=family, preset=preset, config_file=config, options=options, sets=set_ or [])
    explicit = explicit_fields(config_file=config, options=options, sets=set_ or [])
    if print_config:
        print_json(cfg.to_dict())
        return
    if plan:
        _print_plan(cfg, gpu_memory, explicit, memory, json_out)
        return
    from pycore.spo.run import TrainRequest, train

    req = TrainRequest(base=base, spm=spm, prompts=str(prompts), out=str(out), config=cfg, prompt_column=prompt_column, vae=vae,  # type: ignore[arg-type]
                       base_config=base_config, spm_base=spm_base, spm_processor=spm_processor,
                       sample_prompts=str(sample_prompts) if sample_prompts else None, num_samples=num_samples,
                       sample_every=sample_every, resume=resume, overwrite=overwrite, stop_after_epochs=stop_after_epochs, cpu=cpu,
                       log_with=() if no_tensorboard else ("tensorboard",), memory=memory, gpu_memory=gpu_memory, explicit=explicit)  # fmt: skip
    report = train(req, say=_quiet if json_out else _say)
    if "rank" not in report:  # only the main process reports
        _render_train(report, json_out)


def _say(msg: str) -> None:
    """pycore's progress messages of a run, as plain text on stderr."""
    console.print(msg, soft_wrap=True, highlight=False, markup=False)


def _quiet(msg: str) -> None:
    """--json: the report on stdout is all the output."""


def _print_plan(cfg, gpu_memory: float | None, explicit: frozenset[str], memory: str, json_out: bool) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    from pycore.spo.memory import GiB, MemoryPlan, estimate, plan_run

    p = plan_run(cfg, gpu_memory, explicit=explicit, memory=memory)
    if p is None:  # no card: the estimate of the options as given
        est = estimate(cfg)
        data = {"family": cfg.model_family, "resolution": cfg.resolution, "card_gib": None,
                "card_source": "no CUDA device (pass --gpu-memory GIB to plan for a card)", **est.to_dict()}  # fmt: skip
    else:
        data, est = p.to_dict(), p.estimate
    if json_out:
        print_json(data)
        return
    t = Table(title=f"SPO memory plan: {cfg.model_family} at {cfg.resolution}², card {data['card_gib'] and round(data['card_gib'], 1)} GiB "
                    f"({data['card_source']})")  # fmt: skip
    t.add_column("component / phase")
    t.add_column("GiB", justify="right")
    for k, v in est.components.items():
        t.add_row(k, f"{v / GiB:.2f}")
    for k, v in est.activations.items():
        t.add_row(f"activations: {k}", f"{v / GiB:.2f}")
    for k, v in est.phases.items():
        t.add_row(f"[b]{k}[/b] (total)", f"{v / GiB:.2f}")
    console.print(t)
    if isinstance(p, MemoryPlan):
        console.print(f"chosen: {', '.join(p.steps) or 'no memory-saving options needed'}; flags: {' '.join(p.flags) or '(none)'}; "
                      f"peak {est.peak / GiB:.1f} GiB in the {est.peak_phase} — {'fits' if p.fits else 'does NOT fit'}", highlight=False)  # fmt: skip


def _render_train(report: dict, json_out: bool) -> None:
    if json_out:
        print_json(report)
        return
    if not report["finished"]:
        console.print(f"stopped after epoch {report['epochs_done']} of {report['num_epochs']}; continue with the same command and --resume")
        return
    rewards = report["reward_final_by_epoch"]
    if rewards:
        first, last = next(iter(rewards.items())), list(rewards.items())[-1]
        console.print(f"final-image reward during training: epoch {first[0]} {first[1]:.3f} → epoch {last[0]} {last[1]:.3f}")
    console.print(f"{report['pairs_kept']:,} pairs kept over {report['epochs_done']} epochs in {report['seconds']:.0f}s")
    console.print("LoRA → " + ", ".join(report["lora"]) + f"; config → {report['config']}")
    console.print(f"precision: mixed {report['mixed_precision']}, VAE {report['vae']} in {report['vae_dtype']}, SPM in {report['spm_dtype']}")
    mp = report.get("memory_plan")
    if mp:
        console.print(f"memory plan: {', '.join(mp['chosen']) or 'no memory-saving options needed'}; estimated peak {mp['peak_gib']:.1f} GiB "
                      f"of {mp['card_gib']:.1f} GiB")  # fmt: skip
    if report["samples"]:
        console.print(f"samples → {report['samples']}")
    console.print(f"TensorBoard: tensorboard --logdir {Path(report['out']) / 'logs'}")


def spo_sample(
    base: Base,
    prompts: Prompts,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the images, images.jsonl and summary.json.", show_default=False, rich_help_panel=S_IO)],
    lora: Annotated[str | None, typer.Option("--lora", help="LoRA file (diffusers or kohya), e.g. OUT/spo_lora_diffusers.safetensors.", rich_help_panel=S_MODELS)] = None,
    lora_scale: Annotated[float, typer.Option("--lora-scale", help="LoRA strength.", rich_help_panel=S_MODELS)] = 1.0,
    compare: Annotated[bool, typer.Option("--compare", help="Also render the base model with the same seeds (before/after).", rich_help_panel=S_IO)] = False,
    prompt_column: PromptColumn = None,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps (SPO evaluation: 20).", min=1, rich_help_panel=S_SAMPLING)] = 20,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance (SPO evaluation: 5).", min=1.0, rich_help_panel=S_SAMPLING)] = 5.0,
    eta: Annotated[float, typer.Option("--eta", help="DDIM eta (0 = deterministic, diffusers' default; training uses 1).", min=0.0, max=1.0, rich_help_panel=S_SAMPLING)] = 0.0,
    resolution: Annotated[int | None, typer.Option("--resolution", help="Image size (default 1024 SDXL, 512 SD1.5).", min=8, rich_help_panel=S_SAMPLING)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first image; image n uses seed + n.", min=0, rich_help_panel=S_SAMPLING)] = 0,
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", help="Images per prompt (consecutive seeds).", min=1, rich_help_panel=S_SAMPLING)] = 1,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first N prompts.", min=1, rich_help_panel=S_IO)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per pipeline call.", min=1, rich_help_panel=S_RUN)] = 4,
    spm: Annotated[str | None, typer.Option("--spm", help="Score the images with this (step-aware) preference model at t = 0.", rich_help_panel=S_MODELS)] = None,
    vae: Vae = None,
    base_config: BaseConfig = None,
    spm_base: SpmBase = None,
    spm_processor: SpmProcessor = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.", rich_help_panel=S_RUN)] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...", rich_help_panel=S_RUN)] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report on stdout instead of tables.", rich_help_panel=S_IO)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the samples of an earlier run in OUT.", rich_help_panel=S_IO)] = False,
) -> None:
    from pycore.spo.sample import SampleRequest, sample

    req = SampleRequest(base=base, prompts=str(prompts), out=str(out), lora=lora, lora_scale=lora_scale, compare=compare,
                        prompt_column=prompt_column, vae=vae, base_config=base_config, spm=spm, spm_base=spm_base,
                        spm_processor=spm_processor, steps=steps, guidance=guidance, eta=eta, resolution=resolution, seed=seed,
                        images_per_prompt=images_per_prompt, limit=limit, batch_size=batch_size, dtype=dtype, device=device,
                        overwrite=overwrite)  # fmt: skip
    with progress(disable=json_out) as bar:
        task = bar.add_task("sampling", total=None, rate="")
        summary = sample(req, say=lambda m: console.print(m, soft_wrap=True, markup=False), on_image=lambda n: bar.update(task, advance=n))
    if json_out:
        print_json(summary)
        return
    console.print(f"{summary['images']:,} images ({', '.join(summary['variants'])}) for {summary['prompts']:,} prompts, "
                  f"DDIM {summary['steps']} steps, CFG {summary['guidance']:g}, eta {summary['eta']:g}, {summary['resolution']}² "
                  f"in {summary['seconds']:.0f}s → {summary['out']}")  # fmt: skip
    for v in summary["variants"]:
        s = summary.get(f"score_{v}")
        if s and s["mean"] is not None:
            console.print(f"{v}: mean SPM score {s['mean']:.3f}" + (f" ± {s['se']:.3f}" if s["se"] is not None else ""))
    g = summary.get("score_gain")
    if g and g["mean"] is not None:
        console.print(f"LoRA − base (paired, {g['n']} images): {g['mean']:+.3f}" + (f" ± {g['se']:.3f}" if g["se"] is not None else ""))
