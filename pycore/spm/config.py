"""`hw spm-train`'s configuration: one validated dataclass, stored in every checkpoint and the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pycore.checks import check_float, check_int, check_output, dtype_name
from pycore.errors import HwError
from pycore.limits import MAX_RESOLUTION, cpu_count
from pycore.spm.model import DEFAULT_BASE, EVAL_TIMESTEPS

MODEL_TYPES = ("auto", "sd15", "sdxl")
MIXED = ("no", "fp16", "bf16")
#: Upper bounds of counts (beyond them a run cannot finish or memory, not quality, grows).
MAX_STEPS = 10_000_000
MAX_BATCH = 4096


@dataclass
class SPMTrainConfig:
    """Everything `hw spm-train` needs; stored in every checkpoint and in the report."""

    pairs: str  #: pairs table (Pick-a-Pic Parquet or manifest form), or a folder of Parquet shards
    out: str  #: output folder: the final model (hw SPM folder), report.json, checkpoints/
    base_model: str  #: frozen diffusion model (diffusers folder, hub name or .safetensors): SD1.5 or SDXL
    init: str = DEFAULT_BASE  #: SPM or plain CLIP/PickScore to start from (hub name or path)
    init_base: str | None = None  #: CLIP config for a released .bin given as --init
    processor: str | None = None  #: tokenizer source (default: the init model's, else laion ViT-H/14)
    model_type: str = "auto"  #: sd15 | sdxl | auto (from the base model's configs)
    vae: str | None = None  #: a replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)
    val: str | None = None  #: a separate validation pairs table; else --val-fraction of the prompts
    val_fraction: float = 0.05
    max_val_pairs: int | None = 500
    prompt_column: str | None = None  #: override the caption/prompt column name
    resolution: int | None = None  #: VAE resolution (default 512 for SD1.5, 1024 for SDXL)
    cfg_scale: float = 5.0
    batch_size: int = 4  #: pairs per device per micro-step
    grad_accum: int = 1
    max_steps: int = 8000  #: optimizer steps
    lr: float = 3e-6
    weight_decay: float = 0.3
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  #: no | fp16 | bf16 (autocast around the SPM; fp32 master weights)
    base_dtype: str = "auto"  #: frozen diffusion model dtype: auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    label_scorer: str | None = None  #: plain scorer whose labels replace the data's (e.g. yuvalkirstain/PickScore_v1)
    label_margin: float = 0.1
    eval_every: int = 500
    eval_timesteps: tuple[int, ...] = EVAL_TIMESTEPS
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    gradient_checkpointing: bool = False
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    cpu: bool = False  #: force CPU even when a GPU is present
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_dtype != "auto":
            self.base_dtype = dtype_name(self.base_dtype, "--base-dtype")
        for name, allowed in (("model-type", MODEL_TYPES), ("mixed-precision", MIXED)):
            value = getattr(self, name.replace("-", "_"))
            if value not in allowed:
                raise HwError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
        check_int("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_int("--max-steps", self.max_steps, 1, MAX_STEPS)
        for name in ("grad_accum", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), 1, MAX_STEPS)
        check_int("--warmup-steps", self.warmup_steps, 0, MAX_STEPS)
        check_int("--num-workers", self.num_workers, 0, 4 * cpu_count(), "DataLoader processes: a few per core at most")
        check_int("--seed", self.seed, 0, 2**63 - 1)
        check_float("--lr", self.lr, 0.0, 1.0, lo_open=True)
        check_float("--weight-decay", self.weight_decay, 0.0)
        check_float("--max-grad-norm", self.max_grad_norm, 0.0)
        check_float("--cfg-scale", self.cfg_scale, 0.0, 100.0)
        if self.val is None:
            check_float("--val-fraction", self.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.max_val_pairs is not None:
            check_int("--max-val-pairs", self.max_val_pairs, 1)
        check_float("--label-margin", self.label_margin, 0.0, 1.0, hi_open=True)
        if self.resolution is not None:
            check_int("--resolution", self.resolution, 8, MAX_RESOLUTION)
            if self.resolution % 8:
                raise HwError(f"--resolution must be a multiple of 8 (the VAE's factor), not {self.resolution}")
        ts = tuple(self.eval_timesteps)
        if not ts:
            raise HwError("--eval-timesteps needs at least one timestep")
        self.eval_timesteps = tuple(check_int("--eval-timesteps", t, 0, 999) for t in ts)
        if self.resume and self.overwrite:
            raise HwError("--resume and --overwrite exclude each other")
        self._check_out()
        self._check_local_names()

    def _check_local_names(self) -> None:
        """A model name that can only be a local path and does not exist fails now, not after loading the data."""
        from pycore.hub import check_local

        for option, name in (("--base-model", self.base_model), ("--vae", self.vae), ("--init", self.init),
                             ("--label-scorer", self.label_scorer), ("--init-base", self.init_base)):  # fmt: skip
            if name:
                check_local(name, option)

    def _check_out(self) -> None:
        """The output folder, before any work: not a file, not containing the pairs, its folder writable."""
        out = Path(self.out)
        if out.parent.exists() or out.exists():  # a missing parent is created with the run folder
            check_output(out, inputs=[self.pairs, self.val], overwrite=True, folder=True)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_timesteps"] = list(self.eval_timesteps)
        return d
