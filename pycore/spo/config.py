"""SPO training configuration: one validated dataclass, with the official presets.

Every field carries its help text (``field(metadata={"help": ...})``); every quirk of the official
code is an explicit option whose default is the official behaviour. Presets ``sdxl`` and ``sd15``
reproduce the official configurations (RockeyCoss/SPO; see shared/reference/SPO.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pycore.errors import HwError
from pycore.limits import MAX_RESOLUTION


class SPOConfigError(HwError):
    """An SPO configuration value that is out of range or inconsistent."""


def _opt(default: Any, help: str) -> Any:  # noqa: A002
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class SPOConfig:
    """All knobs of one SPO run; validated on construction (raises SPOConfigError)."""

    model_family: str = _opt("sdxl", "Base model family: 'sdxl' (two text encoders, add_time_ids) or 'sd15'.")
    resolution: int = _opt(1024, "Sample height and width in pixels (1024 for SDXL, 512 for SD1.5); multiple of 8.")
    # sampler
    num_inference_steps: int = _opt(20, "DDIM steps of the rollout ('leading' spacing, steps_offset 1: t = 951 … 1).")
    eta: float = _opt(1.0, "DDIM eta; 1.0 (official) makes every step a Gaussian with DDPM variance.")
    guidance_scale: float = _opt(5.0, "Classifier-free guidance in sampling and in the training forward passes.")
    divert_start_step: int = _opt(4, "Steps before the first branch: plain stochastic DDIM steps, not trained on.")
    num_candidates: int = _opt(2, "k: candidates sampled from the shared x_t at each branch.")
    num_inner_step: int = _opt(3, "Extra single steps each candidate runs after branching (SDXL variant; 0 = SD1.5).")
    threshold: float = _opt(0.4, "Keep a pair only if softmax([best, worst]) gap exceeds this (strict).")
    force_zeros_for_empty_prompt: bool | None = _opt(None, "Negative embeddings all zeros (official SDXL); None = the model's own setting.")
    negative_prompt: str = _opt("", "Negative prompt when negatives are not forced to zeros.")
    # loss
    beta: float = _opt(10.0, "DPO β on the per-step log-ratio.")
    clip_range: float = _opt(0.1, "Ratios exp(logp − logp_ref) are clamped to [1 − clip, 1 + clip] (official 0.1).")
    logprob_reduction: str = _opt("mean", "Reduce the per-element Gaussian log-prob over C,H,W: 'mean' (official) or 'sum'.")
    # LoRA and optimiser
    lora_rank: int = _opt(64, "LoRA rank r.")
    lora_alpha: float | None = _opt(None, "LoRA alpha; None = rank (official alpha = r).")
    lora_init: str = _opt("gaussian", "LoRA init: 'gaussian' (official; up = 0, so the run starts at the base) or 'default'.")
    lora_targets: list[str] = _opt(LORA_TARGETS, "UNet module names the LoRA wraps (official: attention q, k, v, out).")
    learning_rate: float = _opt(1e-5, "AdamW learning rate (constant schedule).")
    adam_beta1: float = _opt(0.9, "AdamW β1.")
    adam_beta2: float = _opt(0.999, "AdamW β2.")
    adam_weight_decay: float = _opt(1e-4, "AdamW weight decay.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = _opt(False, "Use bitsandbytes' 8-bit AdamW (needs bitsandbytes and CUDA).")
    max_grad_norm: float | None = _opt(1.0, "Clip the LoRA gradient norm to this. Differs from the official run, whose clip was a silent no-op: "
                                        "--set max_grad_norm=null reproduces it.")
    # batching
    sample_batch_size: int = _opt(2, "Prompts per process per rollout (official: sample batch = train batch).")
    train_batch_size: int = _opt(2, "Transitions per process per optimiser micro-step.")
    gradient_accumulation_steps: int = _opt(2, "Micro-steps accumulated per optimiser step, counted across rollout batches as in the "
                                            "official loop; hw also steps at each epoch's end (official: leftovers carry into the next "
                                            "epoch) so that checkpoints resume exactly.")
    num_epochs: int = _opt(10, "Passes over the prompt list.")
    shuffle_pairs: bool = _opt(True, "Shuffle the gathered pairs before splitting them across processes (official).")
    # engineering
    seed: int = _opt(42, "Seed of every generator (rollouts, continuation choice, shuffles, LoRA init).")
    mixed_precision: str = _opt("auto", "accelerate mixed precision around the policy UNet: 'auto' (fp16 on CUDA as the official run, "
                                "'no' elsewhere), 'no', 'fp16' or 'bf16'; frozen weights in that half dtype, LoRA and AdamW in fp32.")
    gradient_checkpointing: bool = _opt(False, "Recompute UNet activations in the backward pass (less memory, ~30% slower).")
    spm_dtype: str = _opt("float32", "dtype of the step-aware preference model, outside autocast ('float32' official, 'float16', 'bfloat16').")
    vae_dtype: str = _opt("auto", "dtype of the VAE decoding x̂0, outside autocast: 'auto' (float16 on CUDA when the VAE is fp16-safe: "
                          "SDXL's fp16-fix or SD1.5's, as the official run; else float32), 'float32', 'float16', 'bfloat16'.")
    vae_slicing: bool = _opt(False, "Decode one image at a time.")
    vae_tiling: bool = _opt(False, "Decode in tiles (for large resolutions on small cards).")
    cache_prompt_embeddings: bool = _opt(True, "Encode each prompt once and keep the embeddings on the CPU.")
    offload_scorer: bool = _opt(False, "Move the step-aware preference model and the VAE to the CPU for the training micro-steps and "
                                "back for each rollout (frees their memory while training; same results; ~2 × their bytes over PCIe "
                                "per prompt batch).")
    checkpoint_every: int = _opt(1, "Save a resumable checkpoint every this many epochs.")

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise SPOConfigError(f"invalid SPO config: {msg}")

        if self.model_family not in ("sdxl", "sd15"):
            bad(f"model_family must be 'sdxl' or 'sd15', got {self.model_family!r}")
        if not 8 <= self.resolution <= MAX_RESOLUTION or self.resolution % 8:
            bad(f"resolution must be a multiple of 8 in 8..{MAX_RESOLUTION} (pycore.limits.MAX_RESOLUTION), got {self.resolution}")
        if not 2 <= self.num_inference_steps <= 1000:
            bad(f"num_inference_steps must be in 2..1000, got {self.num_inference_steps}")
        if not 0.0 < self.eta <= 1.0:
            bad(f"eta must be in (0, 1] (the log-prob needs a positive variance), got {self.eta}")
        if self.guidance_scale < 1.0:
            bad(f"guidance_scale must be ≥ 1, got {self.guidance_scale}")
        if self.num_candidates < 2:
            bad(f"num_candidates (k) must be ≥ 2, got {self.num_candidates}")
        if self.num_inner_step < 0:
            bad(f"num_inner_step must be ≥ 0, got {self.num_inner_step}")
        if not 0 <= self.divert_start_step or self.divert_start_step + self.num_inner_step >= self.num_inference_steps:
            bad(f"divert_start_step {self.divert_start_step} + num_inner_step {self.num_inner_step} must be below num_inference_steps {self.num_inference_steps}")
        if not 0.0 <= self.threshold < 1.0:
            bad(f"threshold must be in [0, 1), got {self.threshold}")
        if self.beta <= 0:
            bad(f"beta must be positive, got {self.beta}")
        if not 0.0 < self.clip_range < 1.0:
            bad(f"clip_range must be in (0, 1), got {self.clip_range}")
        if self.logprob_reduction not in ("mean", "sum"):
            bad(f"logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}")
        if self.lora_rank < 1:
            bad(f"LoRA rank must be at least 1, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            bad(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.lora_init not in ("gaussian", "default"):
            bad(f"lora_init must be 'gaussian' or 'default', got {self.lora_init!r}")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            bad("lora_targets must be a non-empty list of module names")
        if self.learning_rate <= 0:
            bad(f"learning_rate must be positive, got {self.learning_rate}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            bad("adam betas must be in [0, 1)")
        if self.adam_weight_decay < 0 or self.adam_epsilon <= 0:
            bad("adam_weight_decay must be ≥ 0 and adam_epsilon > 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            bad(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        for name in ("sample_batch_size", "train_batch_size", "gradient_accumulation_steps", "num_epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            bad(f"mixed_precision must be 'auto', 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.spm_dtype not in ("float32", "float16", "bfloat16"):
            bad(f"spm_dtype must be 'float32', 'float16' or 'bfloat16', got {self.spm_dtype!r}")
        if self.vae_dtype not in ("auto", "float32", "float16", "bfloat16"):
            bad(f"vae_dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {self.vae_dtype!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def alpha(self) -> float:
        """The effective LoRA alpha (official: alpha = r)."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def step_ratio(self) -> int:
        return 1000 // self.num_inference_steps

    def branch_steps(self) -> list[int]:
        """Step indices where the rollout branches (SDXL official: 4, 8, 12, 16; SD1.5: 4 … 19)."""
        seg = self.num_inner_step + 1
        return list(range(self.divert_start_step, self.num_inference_steps - self.num_inner_step, seg))

    def for_device(self, device_type: str, *, vae_fp16_safe: bool) -> SPOConfig:
        """Resolve the 'auto' precisions for a device: CUDA → fp16 mixed precision (official) and, when the VAE
        is fp16-safe, a float16 VAE; anything else → no mixed precision, float32 VAE."""
        cuda = device_type == "cuda"
        mp = self.mixed_precision if self.mixed_precision != "auto" else ("fp16" if cuda else "no")
        vd = self.vae_dtype if self.vae_dtype != "auto" else ("float16" if cuda and vae_fp16_safe else "float32")
        return self.replace(mixed_precision=mp, vae_dtype=vd)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SPOConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise SPOConfigError(f"unknown SPO config option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SPOConfig:
        """Build from a dict (e.g. a resolved-config JSON); a 'preset' key starts from that preset."""
        data = dict(data)
        preset = data.pop("preset", None)
        base = from_preset(preset) if preset is not None else cls()
        return base.replace(**data)

    @staticmethod
    def help() -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(SPOConfig)}


# Official values (shared/reference/SPO.md, "SPO training (official configs)").
PRESETS: dict[str, dict[str, Any]] = {
    "sdxl": dict(model_family="sdxl", resolution=1024, num_candidates=2, num_inner_step=3, threshold=0.4,
                 divert_start_step=4, lora_rank=64, learning_rate=1e-5, sample_batch_size=2, train_batch_size=2,
                 gradient_accumulation_steps=2, num_epochs=10, force_zeros_for_empty_prompt=True),  # fmt: skip
    "sd15": dict(model_family="sd15", resolution=512, num_candidates=4, num_inner_step=0, threshold=0.3,
                 divert_start_step=4, lora_rank=4, learning_rate=6e-5, sample_batch_size=10, train_batch_size=10,
                 gradient_accumulation_steps=1, num_epochs=10, force_zeros_for_empty_prompt=False),  # fmt: skip
}


def from_preset(name: str, **overrides: Any) -> SPOConfig:
    """The official configuration ``name`` ('sdxl' or 'sd15') with ``overrides`` applied."""
    if name not in PRESETS:
        raise SPOConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return SPOConfig().replace(**{**PRESETS[name], **overrides})
