"""`hw spo-sample`: images with SPO's evaluation settings (DDIM 20 steps, CFG 5) through diffusers' pipeline.

The LoRA is loaded with the pipeline's own ``load_lora_weights`` — what users will do — so a
successful run also proves the file loads in diffusers. ``compare`` renders every prompt and seed
twice, with the LoRA disabled (the base model) and enabled, so the pairs differ only by the LoRA.
With an SPM the images are scored at t = 0 and the paired difference is reported with its
standard error.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycore.errors import HwError, first_line
from pycore.io import atomic_path, write_text_atomic

OUTPUT_NAMES = ("base", "lora", "images.jsonl", "summary.json", "grid.png")


@dataclass
class SampleRequest:
    base: str
    prompts: str
    out: str
    lora: str | None = None
    lora_scale: float = 1.0
    compare: bool = False
    prompt_column: str | None = None
    vae: str | None = None
    base_config: str | None = None
    spm: str | None = None
    spm_base: str | None = None
    spm_processor: str | None = None
    steps: int = 20
    guidance: float = 5.0
    eta: float = 0.0
    resolution: int | None = None
    seed: int = 0
    images_per_prompt: int = 1
    limit: int | None = None
    batch_size: int = 4
    dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        from pycore.checks import check_float, check_int, check_output, parse_device
        from pycore.limits import MAX_RESOLUTION

        check_output(self.out, overwrite=True, folder=True)  # writable; existing samples are checked in sample()

        check_int("--steps", self.steps, 1, 1000)
        check_float("--guidance", self.guidance, 1.0, 100.0)
        check_float("--eta", self.eta, 0.0, 1.0)
        check_int("--images-per-prompt", self.images_per_prompt, 1, 10_000)
        check_int("--batch-size", self.batch_size, 1, 1024)
        if self.limit is not None:
            check_int("--limit", self.limit, 1, None)
        if self.resolution is not None:
            check_int("--resolution", self.resolution, 8, MAX_RESOLUTION)
            if self.resolution % 8:
                raise HwError(f"--resolution must be a multiple of 8 (the VAE works on 8×8 pixel cells), got {self.resolution}")
        self.device = parse_device(self.device)
        if self.compare and self.lora is None:
            raise HwError("--compare needs --lora (it renders each prompt without and with the LoRA)")


def ddim_scheduler(schedule: Any = None) -> Any:
    """diffusers' DDIMScheduler with SPO's sampler: leading spacing, steps_offset 1, no x̂0 clipping, ε-prediction."""
    from diffusers import DDIMScheduler

    n = getattr(schedule, "num_train_timesteps", 1000)
    b0 = getattr(schedule, "beta_start", 0.00085)
    b1 = getattr(schedule, "beta_end", 0.012)
    return DDIMScheduler(num_train_timesteps=n, beta_start=b0, beta_end=b1, beta_schedule="scaled_linear", timestep_spacing="leading",
                         steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")  # fmt: skip


def build_pipeline(base: Any) -> Any:
    """A diffusers pipeline from loaded components (SDXL or SD1.5) with the SPO DDIM scheduler."""
    sched = ddim_scheduler(getattr(base, "schedule", None))
    if base.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                                         tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=sched,
                                         force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt)  # fmt: skip
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_lora_into(pipe: Any, lora: str, scale: float) -> None:
    """``pipe.load_lora_weights`` with a one-line error when diffusers cannot read the file."""
    p = Path(lora)
    if not p.exists():
        raise HwError(f"LoRA {lora} not found")
    import logging

    class _Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    log = logging.getLogger("diffusers")
    seen, propagate, own = _Collect(), log.propagate, list(log.handlers)
    for h in own:  # diffusers' own stderr handler: its notes are collected, not printed
        log.removeHandler(h)
    log.addHandler(seen)
    log.propagate = False  # diffusers' notes about components the LoRA does not touch are not the user's concern
    try:
        pipe.load_lora_weights(str(p), adapter_name="spo")
        pipe.set_adapters(["spo"], adapter_weights=[scale])
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise HwError(f"diffusers cannot load the LoRA {lora}: {first_line(e)}") from e
    finally:
        log.removeHandler(seen)
        for h in own:
            log.addHandler(h)
        log.propagate = propagate
    partial = [m for m in seen.messages if "unexpected keys" in m]
    if partial:  # keys that matched no module: the LoRA would apply only in part
        raise HwError(f"diffusers loaded the LoRA {lora} only in part: {partial[0][:200]}")


def _device_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    import torch

    from pycore.checks import parse_dtype

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    dt = parse_dtype(dtype)
    if dev.type == "cpu" and dt == torch.float16:
        raise HwError("fp16 sampling needs a GPU; use --dtype fp32 or bf16 on the CPU")
    return dev, dt


def _grid(rows: list[tuple[Any, Any]]) -> Any:
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (2 * w, len(rows) * h), "white")
    for r, (a, b) in enumerate(rows):
        grid.paste(a.convert("RGB"), (0, r * h))
        grid.paste(b.convert("RGB"), (w, r * h))
    return grid


def sample(req: SampleRequest, say: Callable[[str], None] = print, on_image: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Render (and score) every prompt × seed for each variant; writes images, images.jsonl, summary.json (and grid.png)."""
    from pycore.diffusion.load import load_base
    from pycore.spo.prompts import load_prompts

    t0 = time.perf_counter()
    _check_lora(req.lora)
    ps = load_prompts(req.prompts, req.prompt_column)
    prompts = ps.prompts[: req.limit] if req.limit else ps.prompts
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise HwError(f"--out {out} exists and is not a folder")
    present = [n for n in OUTPUT_NAMES if (out / n).exists()]
    if present and not req.overwrite:
        raise HwError(f"{out} already holds samples ({', '.join(present[:3])}); pass --overwrite to replace them")
    device, dtype = _device_dtype(req.device, req.dtype)
    spm = None
    if req.spm is not None:
        from pycore.spm.model import StepAwarePreferenceModel

        spm = StepAwarePreferenceModel.from_pretrained(req.spm, base=req.spm_base, processor=req.spm_processor, device=device)
        spm.requires_grad_(False)
    base = load_base(req.base, vae=req.vae, dtype=dtype, vae_dtype=dtype, device=device, single_file_config=req.base_config)
    for w in getattr(base, "warnings", []) or []:
        say(f"warning: {w}")
    res = req.resolution or (1024 if base.family == "sdxl" else 512)
    base.latent_shape(res)  # validates the resolution against the VAE
    pipe = build_pipeline(base)
    if req.lora is not None:
        load_lora_into(pipe, req.lora, req.lora_scale)
    variants = (["base", "lora"] if req.compare else ["lora"]) if req.lora is not None else ["base"]
    jobs = [(i, p, req.seed + i * req.images_per_prompt + j) for i, p in enumerate(prompts) for j in range(req.images_per_prompt)]
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    images: dict[str, list[Any]] = {v: [] for v in variants}
    with _truncation_notes() as truncated:
        for v in variants:
            if req.lora is not None:
                pipe.enable_lora() if v == "lora" else pipe.disable_lora()
            _render(pipe, spm, req, v, jobs, res, out, rows, images[v], on_image)
    if truncated:
        say(f"note: CLIP's 77-token limit truncated some prompts, as in every SD pipeline ({truncated[0]} such warnings hidden)")
    write_text_atomic(out / "images.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if req.compare:
        grid = _grid(list(zip(images["base"], images["lora"], strict=True)))
        with atomic_path(out / "grid.png") as tmp:
            grid.save(tmp, format="PNG")
    summary = _summary(req, rows, variants, len(prompts), res, out, time.perf_counter() - t0, scored=spm is not None)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def _truncation_notes() -> Iterator[list[int]]:
    """Hide diffusers'/transformers' per-batch "truncated to 77 tokens" warnings; yields a list that receives their count."""
    import logging

    seen: set[str] = set()
    found: list[int] = []

    def hide(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "only handle sequences up to" in msg or "longer than the specified maximum sequence length" in msg:
            seen.add(msg)
            return False
        return True

    handlers = [h for name in ("diffusers", "transformers") for h in logging.getLogger(name).handlers]
    for h in handlers:
        h.addFilter(hide)
    try:
        yield found
    finally:
        for h in handlers:
            h.removeFilter(hide)
        if seen:
            found.append(len(seen))


def _check_lora(lora: str | None) -> None:
    if lora is not None:
        from pycore.lora.io import read_header

        if not Path(lora).is_file():
            raise HwError(f"LoRA {lora} not found")
        read_header(lora)  # a file that is not safetensors fails here, before any model loads


def _render(pipe: Any, spm: Any, req: SampleRequest, variant: str, jobs: list[tuple[int, str, int]], res: int, out: Path,
            rows: list[dict[str, Any]], keep: list[Any], on_image: Callable[[int], None] | None) -> None:  # fmt: skip
    """One variant's images, in batches of req.batch_size; rows appended; the first 8 images kept for the grid."""
    import torch

    (out / variant).mkdir(exist_ok=True)
    for k in range(0, len(jobs), req.batch_size):
        chunk = jobs[k : k + req.batch_size]
        gens = [torch.Generator("cpu").manual_seed(s) for _, _, s in chunk]
        with torch.no_grad():
            ims = pipe(prompt=[p for _, p, _ in chunk], num_inference_steps=req.steps, guidance_scale=req.guidance, eta=req.eta,
                       generator=gens, height=res, width=res, output_type="pil").images  # fmt: skip
        scores: list[float | None] = [None] * len(ims)
        if spm is not None:
            with torch.no_grad():
                scores = [float(s) for s in spm.score(ims, [p for _, p, _ in chunk], 0)]
        for (i, p, s), im, sc in zip(chunk, ims, scores, strict=True):
            name = f"{variant}/{i:05d}_{s}.png"
            with atomic_path(out / name) as tmp:
                im.save(tmp, format="PNG")
            rows.append({"variant": variant, "file": name, "prompt_index": i, "prompt": p, "seed": s, "score": sc})
            if len(keep) < 8:
                keep.append(im)
        if on_image is not None:
            on_image(len(chunk))


def _summary(req: SampleRequest, rows: list[dict[str, Any]], variants: list[str], n_prompts: int, res: int, out: Path, seconds: float,
             *, scored: bool) -> dict[str, Any]:  # fmt: skip
    summary: dict[str, Any] = {"out": str(out), "images": len(rows), "prompts": n_prompts, "variants": variants, "steps": req.steps,
                               "guidance": req.guidance, "eta": req.eta, "resolution": res, "lora": req.lora,
                               "lora_scale": req.lora_scale, "seconds": round(seconds, 1)}  # fmt: skip
    if scored:
        for v in variants:
            summary[f"score_{v}"] = _mean_se([r["score"] for r in rows if r["variant"] == v])
        if req.compare:
            b = {(r["prompt_index"], r["seed"]): r["score"] for r in rows if r["variant"] == "base"}
            summary["score_gain"] = _mean_se([r["score"] - b[(r["prompt_index"], r["seed"])] for r in rows if r["variant"] == "lora"])
    return summary


def _mean_se(vals: Sequence[float]) -> dict[str, float | None]:
    n = len(vals)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    m = sum(vals) / n
    se = math.sqrt(sum((x - m) ** 2 for x in vals) / (n - 1) / n) if n > 1 else None
    return {"mean": m, "se": se, "n": n}
