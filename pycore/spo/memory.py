"""Accelerator memory of `hw spo-train`, planned before any weight is loaded (`--plan`, `--memory auto`).

A closed-form model, calibrated on the meta-device simulation of bench/spo_memory_budget.py by
bench/spo_memory_calibrate.py (stored in memory_calibration.json next to this file):

* **weights** — exact parameter counts of the real architectures × bytes per parameter: the UNet
  and text encoders in the frozen-weight dtype (half under fp16/bf16 mixed precision), the VAE in
  ``vae_dtype``, the step-aware preference model in ``spm_dtype``; the LoRA, its gradients and its
  AdamW state in fp32 (8-bit AdamW: 2 bytes per parameter);
* **activations** per phase — ``a + n·c + n·b·P`` bytes for a phase batch n (latents, images or
  transitions) and P latent pixels: one rollout UNet call (k × sample batch latents, CFG doubling
  them), the decode of the candidates' x̂0 (batched, sliced, tiled), the SPM scoring, one training
  micro-step (reference and policy forward, backward; with or without gradient checkpointing).

The peak of a run is the largest phase total (resident weights + LoRA state + that phase's
activations; with ``offload_scorer`` the training micro-step's total leaves out the SPM and the VAE,
which the trainer keeps on the CPU while it trains). Not included: the CUDA context and library workspaces (CONTEXT_GIB is reserved for
them) and allocator fragmentation (MARGIN of the peak is kept free).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pycore.errors import HwError
from pycore.spo.config import SPOConfig

CALIBRATION_FILE = Path(__file__).with_name("memory_calibration.json")
GiB = 2**30
#: Reserved for the CUDA context, cuBLAS/cuDNN workspaces (not in the model).
CONTEXT_GIB = 1.0
#: Share of the modelled peak kept free for the caching allocator's fragmentation and rounding.
MARGIN = 0.05
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
HALF = {"fp16": "float16", "bf16": "bfloat16"}

#: SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json; diffusers' defaults otherwise).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)  # fmt: skip


def sample_key(dtype: str) -> str:
    return f"sample/{dtype}"


def train_key(dtype: str, checkpointing: bool) -> str:
    return f"train/{dtype}/{'checkpointing' if checkpointing else 'full'}"


def decode_key(vae_dtype: str, mode: str) -> str:
    return f"decode/{vae_dtype}/{mode}"


def spm_key(spm_dtype: str) -> str:
    return f"spm/{spm_dtype}"


#: The VAE tile vae_tiling sets (pycore.spo.run): at or below it nothing is tiled.
TILE = 512


def effective_key(key: str, resolution: int) -> str:
    """A tiled decode at or below the tile size decodes untiled: use those figures."""
    if key.startswith("decode/") and key.endswith("tiled") and resolution <= TILE:
        return key.replace("sliced_tiled", "sliced").replace("/tiled", "/batched")
    return key


def activation(coef: dict[str, float], n: int, pixels: int) -> float:
    """``a + n·c + n·b·P`` bytes."""
    return coef["a"] + n * coef["c"] + n * coef["b"] * pixels


@lru_cache(maxsize=1)
def calibration() -> dict[str, Any]:
    try:
        return json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HwError(f"the SPO memory calibration {CALIBRATION_FILE} is missing or broken ({e}); "
                      "run python bench/spo_memory_calibrate.py") from None  # fmt: skip


def _half(dt: str) -> str:
    return "float16" if dt in ("float16", "bfloat16") else "float32"


def decode_mode(config: SPOConfig) -> str:
    return ("sliced_" if config.vae_slicing else "") + "tiled" if config.vae_tiling else ("sliced" if config.vae_slicing else "batched")


@dataclass
class Estimate:
    """Modelled bytes of one configuration: per component and per phase; ``peak`` is the largest phase."""

    components: dict[str, float]
    phases: dict[str, float]
    activations: dict[str, float]

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    def to_dict(self) -> dict[str, Any]:
        g = lambda d: {k: round(v / GiB, 3) for k, v in d.items()}  # noqa: E731
        return {"components_gib": g(self.components), "phases_gib": g(self.phases), "activations_gib": g(self.activations),
                "peak_gib": round(self.peak / GiB, 3), "peak_phase": self.peak_phase}  # fmt: skip


def estimate(config: SPOConfig, *, text_encoders_resident: bool | None = None) -> Estimate:
    """The model's figures for ``config`` on a CUDA device ('auto' precisions resolved as on CUDA)."""
    cal = calibration()[config.model_family]
    cfg = config.for_device("cuda", vae_fp16_safe=True) if "auto" in (config.mixed_precision, config.vae_dtype) else config
    frozen = HALF.get(cfg.mixed_precision, "float32")
    p = cal["params"]
    resident = (not cfg.cache_prompt_embeddings) if text_encoders_resident is None else text_encoders_resident
    lora_n = p["lora_per_rank"] * cfg.lora_rank
    comp = {
        "unet": p["unet"] * BYTES[frozen],
        "text_encoders": p["text_encoders"] * BYTES[frozen] if resident else 0.0,
        "vae": p["vae"] * BYTES[cfg.vae_dtype],
        "spm": p["spm"] * BYTES[cfg.spm_dtype],
        "lora_params": lora_n * 4.0,
        "lora_grads": lora_n * 4.0,
        "optimizer": lora_n * (2.0 if cfg.use_8bit_adam else 8.0),
    }
    static = sum(comp.values())
    px = (cfg.resolution // 8) ** 2
    nk = cfg.sample_batch_size * cfg.num_candidates
    act = cal["activations"]
    images = nk * 3 * cfg.resolution**2 * BYTES[cfg.vae_dtype]  # the decoded candidates held while the SPM scores them
    a = {
        "rollout": activation(act[sample_key(_half(frozen))], nk, px),
        "decode": activation(act[effective_key(decode_key(_half(cfg.vae_dtype), decode_mode(cfg)), cfg.resolution)], nk, px),
        "score": images + activation(act[spm_key(_half(cfg.spm_dtype))], nk, px),
        "training": activation(act[train_key(_half(frozen), cfg.gradient_checkpointing)], cfg.train_batch_size, px),
    }
    # offload_scorer: the SPM and the VAE are on the CPU during the training micro-steps (pycore.spo.trainer moves them)
    scorer = comp["vae"] + comp["spm"] if cfg.offload_scorer else 0.0
    phases = {"rollout": static + a["rollout"], "decode + score": static + max(a["decode"], a["score"]),
              "training micro-step": static - scorer + a["training"]}  # fmt: skip
    return Estimate(components=comp, phases=phases, activations=a)


def fits(peak: float, card_gib: float) -> bool:
    return peak * (1 + MARGIN) + CONTEXT_GIB * GiB <= card_gib * GiB


@dataclass(frozen=True)
class Step:
    """One rung of the ladder: what it changes, the flags a user would pass, the config fields it sets."""

    name: str
    changes: dict[str, Any]
    flags: str
    needs_bitsandbytes: bool = False


def ladder(config: SPOConfig) -> list[Step]:
    """Option sets from fastest to leanest (the budget table's order); each adds to the previous."""
    accum = config.gradient_accumulation_steps * config.train_batch_size
    return [
        Step("cached prompt embeddings", {"cache_prompt_embeddings": True}, "--set cache_prompt_embeddings=true"),
        Step("gradient checkpointing", {"gradient_checkpointing": True}, "--gradient-checkpointing"),
        Step("SPM in half precision", {"spm_dtype": "float16"}, "--spm-dtype float16"),
        Step("VAE slicing", {"vae_slicing": True}, "--vae-slicing"),
        Step("VAE tiling", {"vae_tiling": True}, "--vae-tiling"),
        # exact (no change to any value) and cheap: ~2 × (SPM + VAE) bytes over PCIe per prompt batch (bench/README.md)
        Step("SPM and VAE on the CPU while training", {"offload_scorer": True}, "--set offload_scorer=true"),
        Step("8-bit AdamW", {"use_8bit_adam": True}, "--8bit-adam", needs_bitsandbytes=True),
        Step(f"micro-batch 1 × accumulation {accum}", {"train_batch_size": 1, "gradient_accumulation_steps": accum},
             f"--set train_batch_size=1 --set gradient_accumulation_steps={accum}"),
    ]  # fmt: skip


@dataclass
class MemoryPlan:
    """What `--memory auto` chose (or what `--plan` shows): the config, its estimate, the card."""

    config: SPOConfig
    estimate: Estimate
    card_gib: float
    card_source: str
    steps: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # steps skipped because an explicit option set the field

    @property
    def fits(self) -> bool:
        return fits(self.estimate.peak, self.card_gib)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {"family": c.model_family, "resolution": c.resolution, "card_gib": self.card_gib, "card_source": self.card_source,
                "fits": self.fits, "context_reserve_gib": CONTEXT_GIB, "fragmentation_margin": MARGIN, "chosen": self.steps,
                "flags": " ".join(self.flags), "explicit_kept": self.kept, **self.estimate.to_dict(),
                "options": {k: getattr(c, k) for k in PLANNED_FIELDS}}  # fmt: skip


PLANNED_FIELDS = ("mixed_precision", "vae_dtype", "spm_dtype", "cache_prompt_embeddings", "gradient_checkpointing", "vae_slicing",
                  "vae_tiling", "use_8bit_adam", "train_batch_size", "gradient_accumulation_steps", "offload_scorer")  # fmt: skip


class MemoryError_(HwError):  # noqa: N801 - not the builtin MemoryError
    """No option set hw knows brings the run within the card."""


def plan(config: SPOConfig, card_gib: float, *, explicit: Iterable[str] = (), bitsandbytes: bool | None = None,
         card_source: str = "--gpu-memory") -> MemoryPlan:  # fmt: skip
    """The fastest option set that fits ``card_gib``: climb the ladder, never changing an ``explicit`` field and
    skipping a rung that does not lower the peak.

    Raises :class:`MemoryError_` with the smallest reachable peak and its flags when nothing fits.
    """
    if not card_gib > 0:
        raise HwError(f"--gpu-memory must be a positive number of GiB, got {card_gib}")
    explicit = set(explicit)
    if bitsandbytes is None:
        bitsandbytes = _bitsandbytes_importable()
    cfg = config.for_device("cuda", vae_fp16_safe=True) if "auto" in (config.mixed_precision, config.vae_dtype) else config
    best = MemoryPlan(cfg, estimate(cfg), card_gib, card_source)
    if best.fits:
        return best
    steps: list[str] = []
    flags: list[str] = []
    kept: list[str] = []
    for st in ladder(config):
        if st.needs_bitsandbytes and not bitsandbytes:
            continue
        if any(k in explicit for k in st.changes):
            kept.append(st.name)
            continue
        if all(getattr(cfg, k) == v for k, v in st.changes.items()):
            continue
        trial = cfg.replace(**st.changes)
        est = estimate(trial)
        if est.peak >= best.estimate.peak:  # no gain here (e.g. tiling at or below the tile size): not worth its cost
            continue
        cfg = trial
        steps.append(st.name)
        flags.append(st.flags)
        best = MemoryPlan(cfg, est, card_gib, card_source, list(steps), list(flags), list(kept))
        if best.fits:
            return best
    need = best.estimate.peak * (1 + MARGIN) / GiB + CONTEXT_GIB
    how = " ".join(best.flags) or "the options given"
    why = f" (explicit options kept: {', '.join(kept)})" if kept else ""
    bnb = "" if bitsandbytes else "; installing bitsandbytes adds 8-bit AdamW"
    raise MemoryError_(f"SPO at {cfg.resolution}² does not fit a {card_gib:g} GiB card: the smallest peak hw reaches is "
                       f"{best.estimate.peak / GiB:.1f} GiB ({need:.1f} GiB with the CUDA context and margin) with {how}{why}{bnb}; "
                       "lower --resolution or --batch-size, or use a larger card")  # fmt: skip


def plan_run(config: SPOConfig, gpu_memory: float | None, *, explicit: Iterable[str] = (), memory: str = "auto") -> MemoryPlan | None:
    """The plan for a run or for `--plan`: None without a card to plan for (CPU and no --gpu-memory).

    ``memory='off'`` keeps the options as given and only estimates them (no ladder, no error).
    """
    if memory not in ("auto", "off"):
        raise HwError(f"--memory must be auto or off, got {memory!r}")
    card, source = card_memory(gpu_memory)
    if card is None:
        return None
    if memory == "off":
        cfg = config.for_device("cuda", vae_fp16_safe=True) if "auto" in (config.mixed_precision, config.vae_dtype) else config
        return MemoryPlan(cfg, estimate(cfg), card, source)
    return plan(config, card, explicit=explicit, card_source=source)


def _bitsandbytes_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def card_memory(gpu_memory: float | None, device_index: int = 0) -> tuple[float | None, str]:
    """The card's memory to plan for: ``--gpu-memory`` if given, else the CUDA device's free memory, else None."""
    if gpu_memory is not None:
        return float(gpu_memory), "--gpu-memory"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    free, total = torch.cuda.mem_get_info(device_index)
    return free / GiB, f"free memory of cuda:{device_index} ({torch.cuda.get_device_name(device_index)}, {total / GiB:.0f} GiB)"
