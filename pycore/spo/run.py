"""What `hw spo-train` does end to end: accelerator, models, prompts, logging, the loop, the report.

Kept out of the CLI module so it can be driven from Python (and tested) the same way.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.errors import HwError, first_line
from pycore.spo.config import SPOConfig

#: What a finished or started run leaves in its output folder (the only names --overwrite removes).
RUN_FILES = ("checkpoints", "samples", "logs", "train_log.jsonl", "spo_config.json", "spo_lora_diffusers.safetensors",
             "spo_lora_kohya.safetensors")  # fmt: skip
HALF = {"fp16": "float16", "bf16": "bfloat16"}
#: The SDXL preset's VAE for decoding x̂0: the decoder the official run and the released SDXL SPM used; it stays
#: finite in float16, where SDXL's own VAE overflows. ``--vae base`` keeps the base model's VAE.
SDXL_FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
BASE_VAE = "base"


def resolve_vae(vae: str | None, family: str) -> str | None:
    """The VAE to load: the user's, the preset's default (SDXL: the fp16-fix VAE), or None for the base model's own."""
    if vae == BASE_VAE:
        return None
    if vae is None and family == "sdxl":
        return SDXL_FP16_FIX_VAE
    return vae


def vae_fp16_safe(vae: str | None, family: str) -> bool:
    """Whether a VAE decodes in float16 without overflowing: SD1.5's, and SDXL's fp16-fix (by name)."""
    return family == "sd15" or (vae is not None and "fp16-fix" in vae.lower())


@dataclass
class TrainRequest:
    """Inputs of one `hw spo-train` run (paths and names as the user gave them)."""

    base: str
    spm: str
    prompts: str
    out: str
    config: SPOConfig
    prompt_column: str | None = None
    vae: str | None = None
    base_config: str | None = None
    spm_base: str | None = None
    spm_processor: str | None = None
    sample_prompts: str | None = None
    num_samples: int = 4
    sample_every: int = 1
    resume: bool = False
    overwrite: bool = False
    stop_after_epochs: int | None = None
    cpu: bool = False
    log_with: Sequence[str] = ("tensorboard",)
    memory: str = "auto"
    gpu_memory: float | None = None
    explicit: frozenset[str] = frozenset()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pycore.checks import check_float, check_output

        check_output(self.out, overwrite=True, folder=True)  # writable; an existing OUT is prepare_out's to judge
        if self.memory not in ("auto", "off"):
            raise HwError(f"--memory must be auto or off, got {self.memory!r}")
        if self.gpu_memory is not None:
            check_float("--gpu-memory", self.gpu_memory, 0.0, 4096.0, lo_open=True)
        if self.num_samples < 0 or self.sample_every < 1:
            raise HwError("--num-samples must be ≥ 0 and --sample-every ≥ 1")


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check the output folder before anything heavy runs. Returns True when resuming.

    A folder with an earlier run needs --resume (continue it) or --overwrite (start over: only the
    run's own files are removed); a finished run's LoRA is never replaced silently.
    """
    from pycore.spo.trainer import latest_checkpoint

    if out.exists() and not out.is_dir():
        raise HwError(f"--out {out} exists and is not a folder")
    present = [n for n in RUN_FILES if (out / n).exists()]
    if resume and overwrite:
        raise HwError("--resume and --overwrite contradict each other; pass one")
    if resume:
        if latest_checkpoint(out) is None:
            raise HwError(f"nothing to resume in {out}: no checkpoints/epoch_*.pt")
        done = [n for n in ("spo_lora_diffusers.safetensors", "spo_lora_kohya.safetensors") if (out / n).exists()]
        if done:
            raise HwError(f"the run in {out} already finished ({done[0]} exists); raise num_epochs with --epochs to train further "
                          "into a new --out, or pass --overwrite to start over")  # fmt: skip
        return True
    if present and not overwrite:
        raise HwError(f"{out} holds an earlier SPO run ({', '.join(present[:3])}); pass --resume to continue it or --overwrite to start over")
    for n in present:
        p = out / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return False


def make_accelerator(config: SPOConfig, out: Path, *, cpu: bool = False, log_with: Sequence[str] = ("tensorboard",)) -> Any:
    """An Accelerator with the run's mixed precision and trackers (works under `accelerate launch`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import ProjectConfiguration

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # a single process that already made an Accelerator (in-process use, tests): its settings may differ
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    import torch

    # Without a GPU, accelerate only sets up the process group (MULTI_CPU over gloo, e.g. under
    # `accelerate launch --multi_gpu` on a CPU machine) when told cpu=True; otherwise each process trains alone.
    mps = getattr(torch.backends, "mps", None)
    cpu = cpu or not (torch.cuda.is_available() or (mps is not None and mps.is_available()))
    mixed = config.for_device("cpu" if cpu or not torch.cuda.is_available() else "cuda", vae_fp16_safe=False).mixed_precision
    try:
        return Accelerator(mixed_precision=mixed, cpu=cpu, log_with=list(log_with) or None,
                           project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise HwError(f"cannot set up accelerate with mixed_precision={config.mixed_precision!r}: {first_line(e)}") from e


class RunLogger:
    """Scalars and images to the accelerate trackers (TensorBoard by default) and to train_log.jsonl; lines to ``say``."""

    def __init__(self, accelerator: Any, out: Path, config: SPOConfig, say: Callable[[str], None], *, trackers: bool = True):
        self.acc, self.out, self.say = accelerator, out, say
        self.main = accelerator.is_main_process
        self.trackers = trackers and bool(accelerator.log_with)
        if self.trackers:
            hp = {k: (",".join(v) if isinstance(v, list) else ("none" if v is None else v)) for k, v in config.to_dict().items()}
            accelerator.init_trackers("spo", config=hp)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.main:
            return
        if self.trackers:
            self.acc.log(values, step=step)
        with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def images(self, tag: str, images: list[Any], captions: list[str], step: int) -> None:
        if not (self.main and self.trackers):
            return
        import numpy as np

        try:
            writer = self.acc.get_tracker("tensorboard", unwrap=True)
        except (ValueError, KeyError, AttributeError):
            return
        if not hasattr(writer, "add_image"):
            return
        for i, (im, cap) in enumerate(zip(images, captions, strict=True)):
            writer.add_image(f"{tag}/{i:02d}", np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
            writer.add_text(f"{tag}/{i:02d}/prompt", cap, global_step=step)

    def epoch(self, s: dict[str, Any]) -> None:
        def f(v: Any, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        self.say(f"epoch {s['epoch']}: {s['pairs']} pairs kept (acceptance {f(s['acceptance'], '.0%')}), loss {f(s['loss'], '.4f')}, "
                 f"implicit accuracy {f(s['implicit_acc'], '.0%')}, final-image reward {f(s['reward_final'], '.3f')}, "
                 f"{s['seconds']:.1f}s")  # fmt: skip

    def info(self, message: str) -> None:
        if self.main:
            self.say(message)

    def close(self) -> None:
        if self.trackers:
            self.acc.end_training()


def train(req: TrainRequest, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `hw spo-train`; returns the report (main process; other ranks return {"rank": n})."""
    from pycore.diffusion.text import PromptEncoder
    from pycore.diffusion.load import load_base
    from pycore.checks import parse_dtype
    from pycore.diffusion.vae import decode_latents
    from pycore.spm.model import StepAwarePreferenceModel
    from pycore.spo.prompts import load_prompts
    from pycore.spo.sampler import spm_scorer
    from pycore.spo.trainer import Preview, run_spo

    t_start = time.perf_counter()
    cfg, out = req.config, Path(req.out)
    prompt_set = load_prompts(req.prompts, req.prompt_column)  # cheap checks first
    prompts = prompt_set.prompts
    if req.sample_prompts is not None:
        preview_prompts = load_prompts(req.sample_prompts, req.prompt_column).prompts[: req.num_samples]
    else:
        preview_prompts = list(dict.fromkeys(prompts))[: req.num_samples]
    resuming = prepare_out(out, resume=req.resume, overwrite=req.overwrite)
    vae = resolve_vae(req.vae, cfg.model_family)
    device_type = _device_type(req.cpu)
    cfg = cfg.for_device(device_type, vae_fp16_safe=vae_fp16_safe(vae, cfg.model_family))
    memory_plan = _plan_memory(req, cfg, device_type, say)
    if memory_plan is not None:
        cfg = memory_plan.config
    acc = make_accelerator(cfg, out, cpu=req.cpu, log_with=req.log_with)
    device = acc.device
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    if prompt_set.skipped:
        say(f"{len(prompt_set.skipped)} prompt rows skipped (first: row {prompt_set.skipped[0][0]}: {prompt_set.skipped[0][1]})")
    weight_dtype = parse_dtype(HALF.get(cfg.mixed_precision, "float32"))
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        raise HwError("fp16 mixed precision needs a GPU; use bf16 or no on the CPU")
    spm = StepAwarePreferenceModel.from_pretrained(req.spm, base=req.spm_base, processor=req.spm_processor,
                                                   dtype=cfg.spm_dtype, device=device)  # fmt: skip
    spm.requires_grad_(False)
    try:
        base = load_base(req.base, vae=vae, family=cfg.model_family, dtype=weight_dtype, vae_dtype=parse_dtype(cfg.vae_dtype),
                         device=device, single_file_config=req.base_config)  # fmt: skip
    except HwError as e:
        if vae == SDXL_FP16_FIX_VAE and req.vae is None and SDXL_FP16_FIX_VAE in str(e):
            raise HwError(f"{e} (the SDXL preset decodes with {SDXL_FP16_FIX_VAE}; pass --vae base to use the base model's VAE)") from e
        raise
    for w in getattr(base, "warnings", []) or []:
        say(f"warning: {w}")
    if cfg.vae_tiling:  # 512² tiles (diffusers' default tile is the VAE's sample_size: 1024² for SDXL, i.e. no tiling at 1024²)
        base.vae.enable_tiling()
        factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
        base.vae.tile_sample_min_size, base.vae.tile_latent_min_size = 512, 512 // factor
    decode_bs = 1 if cfg.vae_slicing else None
    latent_shape = base.latent_shape(cfg.resolution)
    encoder = PromptEncoder(base.tokenizer, base.text_encoder, base.tokenizer_2, base.text_encoder_2, resolution=cfg.resolution,
                            force_zeros_for_empty_prompt=cfg.force_zeros_for_empty_prompt,
                            default_force_zeros=base.force_zeros_for_empty_prompt, negative_prompt=cfg.negative_prompt,
                            cache=cfg.cache_prompt_embeddings)  # fmt: skip
    logger = RunLogger(acc, out, cfg, say, trackers=bool(req.log_with))
    preview = None
    if req.num_samples > 0 and preview_prompts:
        preview = Preview(prompts=preview_prompts, seeds=[cfg.seed + i for i in range(len(preview_prompts))],
                          decode=lambda lat: decode_latents(base.vae, lat, batch_size=decode_bs), every=req.sample_every)  # fmt: skip
    if acc.is_main_process:
        say(f"SPO on {len(prompts):,} prompts ({prompt_set.unique:,} unique) × {cfg.num_epochs} epochs, {acc.num_processes} process(es) "
            f"on {device.type}, mixed precision {cfg.mixed_precision}; latents {tuple(latent_shape)}; out {out}")  # fmt: skip
    try:
        result = run_spo(base.unet, encoder, prompts, lambda ps: spm_scorer(spm, base.vae, ps, decode_batch_size=decode_bs), cfg, out,
                         latent_shape, stop_after_epochs=req.stop_after_epochs, accelerator=acc, logger=logger, preview=preview,
                         offload_text_encoders=cfg.cache_prompt_embeddings and device.type != "cpu", scorer_modules=(spm, base.vae),
                         overwrite=False,
                         run_record={"memory_plan": memory_plan.to_dict()} if memory_plan is not None else None)  # fmt: skip
    finally:
        logger.close()
    if not acc.is_main_process:
        return {"rank": acc.process_index}
    report = _report(result, cfg, out, resuming, prompts, prompt_set, acc.num_processes, preview is not None, t_start, vae)
    report["memory_plan"] = memory_plan.to_dict() if memory_plan is not None else None
    return report


def _plan_memory(req: TrainRequest, cfg: SPOConfig, device_type: str, say: Callable[[str], None]) -> Any:
    """On CUDA: the fastest option set that fits the card (explicit options win); None elsewhere."""
    if device_type != "cuda":
        return None
    from pycore.spo.memory import plan_run

    p = plan_run(cfg, req.gpu_memory, explicit=req.explicit, memory=req.memory)
    if p is not None:
        chosen = ", ".join(p.steps) or "no memory-saving options needed"
        say(f"memory ({req.memory}): {chosen}; estimated peak {p.estimate.peak / 2**30:.1f} GiB of {p.card_gib:.1f} GiB ({p.card_source})")
        if not p.fits:
            say("warning: the estimated peak does not fit this card with the CUDA context and margin; expect an out-of-memory "
                "error (--memory auto picks options that fit)")  # fmt: skip
    return p


def _device_type(cpu: bool) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


def _report(result: Any, cfg: SPOConfig, out: Path, resuming: bool, prompts: Sequence[str], prompt_set: Any, processes: int,
            previews: bool, t_start: float, vae: str | None) -> dict[str, Any]:  # fmt: skip
    """The run's summary (the CLI's table and --json)."""
    hist = result.history
    per_epoch: dict[int, list[float]] = {}
    for h in hist:
        if h.get("reward_final") is not None:
            per_epoch.setdefault(int(h["epoch"]), []).append(h["reward_final"])
    judged = [h for h in hist if "acceptance" in h]
    report = {
        "out": str(out), "finished": result.epochs_done >= cfg.num_epochs, "epochs_done": result.epochs_done,
        "num_epochs": cfg.num_epochs, "resumed_from_epoch": result.resumed_from if resuming else None,
        "prompts": len(prompts), "prompts_skipped": len(prompt_set.skipped), "processes": processes,
        "mixed_precision": cfg.mixed_precision, "vae": vae or "base", "vae_dtype": cfg.vae_dtype, "spm_dtype": cfg.spm_dtype,
        "pairs_kept": sum(int(h["pairs"]) for h in hist),
        "acceptance": sum(h["acceptance"] for h in judged) / len(judged) if judged else None,
        "reward_final_by_epoch": {e + 1: sum(v) / len(v) for e, v in sorted(per_epoch.items())},
        "lora": [str(p) for p in result.lora_paths], "config": str(out / "spo_config.json") if result.lora_paths else None,
        "samples": str(out / "samples") if previews else None, "seconds": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    losses = [h["loss"] for h in hist if h.get("loss") is not None and math.isfinite(h["loss"])]
    report["mean_loss"] = sum(losses) / len(losses) if losses else None
    return report
