"""Loading a base diffusion model: SDXL or SD1.5, by hub name, diffusers folder or single file.

``name`` may be
* a hub name (``stabilityai/stable-diffusion-xl-base-1.0``) — downloaded into the Hugging Face
  cache, or read from it with ``HF_HUB_OFFLINE=1``;
* a diffusers pipeline folder (``model_index.json`` with unet/, vae/, text_encoder/, …);
* a single ``.safetensors`` checkpoint (A1111/ComfyUI layout), local or ``owner/repo/file.safetensors``
  on the hub, read with diffusers' ``from_single_file`` and the configs of ``single_file_config``
  (default: the official SDXL or SD1.5 repo).
Pickled single files (``.ckpt``) are refused: hw never unpickles a file it was handed.

The family (``sdxl``, ``sd15``, or another model hw refuses) comes from the model's own configs —
a second text encoder in ``model_index.json`` or SDXL's ``text_time`` added conditioning in the
UNet config; a single file from its tensor names — never from class names.

``vae`` replaces the VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``, which decodes in float16
without overflowing). The scheduler config is checked against the one SPO's DDIM math is written
for (ε-prediction, scaled-linear betas 0.00085 → 0.012, 1000 steps); another is an error, not a
silent mismatch (``strict_schedule=False`` accepts v-/sample-prediction and other scaled-linear
betas, for code that only needs x̂0, such as SPM training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.diffusion.schedule import NoiseSchedule
from pycore.errors import HwError, first_line
from pycore.hub import PICKLE_SUFFIXES, SAFE_SUFFIXES, check_local, hub_file, offline

OFFICIAL = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
FAMILIES = ("sdxl", "sd15")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class ModelLoadError(HwError):
    """A base model or VAE that cannot be found or loaded."""


@dataclass
class BaseModel:
    """The loaded components (SDXL: two tokenizers and text encoders; SD1.5: one)."""

    family: str
    unet: Any
    vae: Any
    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    force_zeros_for_empty_prompt: bool = False
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    prediction_type: str = "epsilon"
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> Any:
        return self.unet.device

    @property
    def dtype(self) -> Any:
        return self.unet.dtype

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents for a square ``resolution`` image."""
        f = self.vae_scale_factor
        if resolution < f or resolution % f:
            raise HwError(f"resolution {resolution} must be a positive multiple of the VAE's factor {f}")
        return (int(self.unet.config.in_channels), resolution // f, resolution // f)

    def prompt_encoder(self, resolution: int, **kw: Any) -> Any:
        """A :class:`~pycore.diffusion.text.PromptEncoder` for this model's text encoder(s)."""
        from pycore.diffusion.text import PromptEncoder

        return PromptEncoder(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2, resolution=resolution,
                             default_force_zeros=self.force_zeros_for_empty_prompt, **kw)  # fmt: skip


def _hub_json(repo: str, filename: str, local_files_only: bool) -> dict[str, Any] | None:
    """A JSON file of a hub repo (cached or downloaded); None when the repo has no such file."""
    path = hub_file(repo, filename, local_files_only=local_files_only, missing_ok=True)
    return None if path is None else _read_json(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def family_of_configs(index: dict[str, Any], unet_cfg: dict[str, Any] | None, where: str) -> str:
    """'sdxl' or 'sd15' from a pipeline's model_index.json and its UNet config (never class names)."""
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list | tuple)}
    if "text_encoder_2" in components or (unet_cfg or {}).get("addition_embed_type") == "text_time":
        return "sdxl"
    if {"unet", "vae", "text_encoder", "tokenizer"} <= components and (unet_cfg is None or unet_cfg.get("addition_embed_type") is None):
        return "sd15"
    kinds = ", ".join(sorted(components)) or "none"
    raise ModelLoadError(f"{where}: neither an SDXL nor an SD1.5 pipeline (components: {kinds}); hw trains and scores "
                         "with SDXL or SD1.5 (UNet + VAE + CLIP text encoder(s))")  # fmt: skip


def _family_of_file(path: Path) -> str:
    from pycore.lora.io import LoraError, read_header

    try:
        infos, _, _ = read_header(path)
    except LoraError as e:
        raise ModelLoadError(str(e)) from None
    keys = infos.keys()
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        ctx = infos.get("model.diffusion_model.input_blocks.1.1.proj_in.weight") or infos.get(
            "model.diffusion_model.input_blocks.4.1.proj_in.weight")
        return "sdxl" if "model.diffusion_model.label_emb.0.0.weight" in infos or ctx is None else "sd15"
    raise ModelLoadError(f"{path}: not an SDXL or SD1.5 checkpoint (no model.diffusion_model.* UNet weights)")


def resolve(name: str, local_files_only: bool, what: str = "model") -> tuple[str, Path | None]:
    """('folder' | 'file' | 'hub', local path or None) for a model or VAE name."""
    p = check_local(name, what)
    if p is not None:
        if p.is_dir():
            return "folder", p
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{p}: pickled checkpoints are not loaded (they can run code); convert it to .safetensors")
        if p.suffix.lower() not in SAFE_SUFFIXES:
            raise ModelLoadError(f"{p}: a single-file model must be a .safetensors file")
        return "file", p
    if Path(name).suffix.lower() in SAFE_SUFFIXES:  # owner/repo/path/in/repo.safetensors
        owner, repo, filename = name.split("/", 2)
        return "file", hub_file(f"{owner}/{repo}", filename, what=what, local_files_only=local_files_only)
    return "hub", None


def detect_family(name: str, *, single_file_config: str | None = None, local_files_only: bool | None = None) -> str:
    """'sdxl' or 'sd15' for a base model name (reads only configs or a safetensors header)."""
    off = offline(local_files_only)
    kind, path = resolve(str(name), off)
    if kind == "file":
        return _family_of_file(path)  # type: ignore[arg-type]
    if kind == "folder":
        idx = path / "model_index.json"  # type: ignore[operator]
        if not idx.is_file():
            raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json); pass a folder saved with "
                                 "save_pretrained, a hub name or a .safetensors file")  # fmt: skip
        ucfg = path / "unet" / "config.json"  # type: ignore[operator]
        return family_of_configs(_read_json(idx), _read_json(ucfg) if ucfg.is_file() else None, str(path))
    index = _hub_json(name, "model_index.json", off)
    if index is None:
        raise ModelLoadError(f"{name}: the hub repo has no model_index.json (not a diffusers pipeline); for a single file pass "
                             "owner/repo/file.safetensors")  # fmt: skip
    return family_of_configs(index, _hub_json(name, "unet/config.json", off), name)


def check_schedule(config: dict[str, Any], where: str, *, strict: bool = True) -> tuple[NoiseSchedule, str]:
    """The noise schedule and prediction type of a scheduler config. ``strict``: only the one SPO's
    DDIM math is written for (ε-prediction, SD's 1000 scaled-linear betas 0.00085 → 0.012)."""
    pred = str(config.get("prediction_type", "epsilon"))
    if pred not in PREDICTION_TYPES or (strict and pred != "epsilon"):
        raise ModelLoadError(f"{where}: prediction_type {pred!r}; SPO's DDIM log-probabilities are written for ε-prediction models")
    sched = str(config.get("beta_schedule", "scaled_linear"))
    if sched != "scaled_linear" or config.get("trained_betas") is not None:
        raise ModelLoadError(f"{where}: beta_schedule {sched!r}; SPO's DDIM math uses SD's scaled_linear betas")
    try:
        ns = NoiseSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                           beta_start=float(config.get("beta_start", 0.00085)), beta_end=float(config.get("beta_end", 0.012)))  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: unusable scheduler config ({e})") from None
    if strict and ns != NoiseSchedule():
        raise ModelLoadError(f"{where}: noise schedule {ns} differs from SD/SDXL's (1000 steps, betas 0.00085 → 0.012) that "
                             "SPO's sampler uses")  # fmt: skip
    return ns, pred


def _call(what: str, where: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except HwError:
        raise
    except Exception as e:  # diffusers/transformers raise many types (SingleFileComponentError, HFValidationError, ...)
        raise ModelLoadError(f"cannot load the {what} of {where}: {first_line(e)}") from None


def _load_vae(name: str, dtype: Any, local_files_only: bool, sdxl: bool) -> Any:
    from diffusers import AutoencoderKL

    kind, path = resolve(name, local_files_only, "VAE")
    if kind == "file":
        return _call("VAE", name, AutoencoderKL.from_single_file, str(path), torch_dtype=dtype,
                     config=OFFICIAL["sdxl" if sdxl else "sd15"], subfolder="vae", local_files_only=local_files_only)  # fmt: skip
    sub = None
    if kind == "folder" and (path / "vae" / "config.json").is_file():  # type: ignore[operator]
        sub = "vae"  # a whole pipeline folder: take its VAE
    elif kind == "hub" and _hub_json(name, "config.json", local_files_only) is None:
        sub = "vae"
    return _call("VAE", name, AutoencoderKL.from_pretrained, str(path) if path else name, subfolder=sub, torch_dtype=dtype,
                 local_files_only=local_files_only)  # fmt: skip


def _load_single_file(name: str, path: Path, family: str, vae: str | None, dtype: Any, vae_dtype: Any, off: bool,
                      single_file_config: str | None) -> tuple[dict[str, Any], dict[str, Any], bool]:  # fmt: skip
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = family == "sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra: dict[str, Any] = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    if vae is not None:  # a checkpoint saved without its VAE loads with vae=
        extra["vae"] = _load_vae(vae, vae_dtype, off, sdxl)
    config = single_file_config or OFFICIAL[family]
    pipe = _call("pipeline", name, cls.from_single_file, str(path), config=config, torch_dtype=dtype, local_files_only=off, **extra)
    parts = {k: getattr(pipe, k, None) for k in ("unet", "vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = parts.get(comp)
        unset = [n for n, t in m.state_dict().items() if t.is_meta] if m is not None else []
        if unset:  # diffusers' conversion left weights unset: the file does not match the configs
            raise ModelLoadError(f"{name}: the {comp} weights do not match the configs of {config} "
                                 f"({len(unset)} tensors unset, e.g. {unset[0]}); pass the right --base-config")  # fmt: skip
    force_zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True)) if sdxl else False
    return parts, dict(pipe.scheduler.config), force_zeros


def _load_components(name: str, kind: str, path: Path | None, family: str, vae: str | None, dtype: Any, vae_dtype: Any,
                     off: bool) -> tuple[dict[str, Any], dict[str, Any], bool]:  # fmt: skip
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = family == "sdxl"
    src = str(path) if path is not None else name
    if kind == "folder":
        index = _read_json(path / "model_index.json")  # type: ignore[operator]
        sp = path / "scheduler" / "scheduler_config.json"  # type: ignore[operator]
        sched_cfg = _read_json(sp) if sp.is_file() else {}
    else:
        index = _hub_json(name, "model_index.json", off) or {}
        sched_cfg = _hub_json(name, "scheduler/scheduler_config.json", off) or {}
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", True)) if sdxl else False
    common = dict(local_files_only=off)
    parts = {
        "unet": _call("UNet", name, UNet2DConditionModel.from_pretrained, src, subfolder="unet", torch_dtype=dtype, **common),
        "tokenizer": _call("tokenizer", name, CLIPTokenizer.from_pretrained, src, subfolder="tokenizer", **common),
        "text_encoder": _call("text encoder", name, CLIPTextModel.from_pretrained, src, subfolder="text_encoder", torch_dtype=dtype, **common),
    }  # fmt: skip
    if sdxl:
        parts["tokenizer_2"] = _call("second tokenizer", name, CLIPTokenizer.from_pretrained, src, subfolder="tokenizer_2", **common)
        parts["text_encoder_2"] = _call("second text encoder", name, CLIPTextModelWithProjection.from_pretrained, src,
                                        subfolder="text_encoder_2", torch_dtype=dtype, **common)  # fmt: skip
    if vae is None:
        from diffusers import AutoencoderKL

        parts["vae"] = _call("VAE", name, AutoencoderKL.from_pretrained, src, subfolder="vae", torch_dtype=vae_dtype, **common)
    else:
        parts["vae"] = _load_vae(vae, vae_dtype, off, sdxl)
    return parts, sched_cfg, force_zeros


def load_base(
    name: str,
    *,
    vae: str | None = None,
    family: str | None = None,
    dtype: Any = None,
    vae_dtype: Any = None,
    device: Any = None,
    single_file_config: str | None = None,
    local_files_only: bool | None = None,
    strict_schedule: bool = True,
) -> BaseModel:
    """Load ``name``'s UNet, VAE, tokenizer(s) and text encoder(s) in ``dtype`` (VAE in ``vae_dtype``) on ``device``.

    Frozen weights only: nothing here requires gradients. ``family`` (if given) must match the model.
    """
    import torch

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()  # per-file "Loading weights" bars; hw reports what it loads itself
    dlog.disable_progress_bar()
    dtype = dtype or torch.float32
    vae_dtype = vae_dtype or dtype
    off = offline(local_files_only)
    name = str(name)
    found = detect_family(name, single_file_config=single_file_config, local_files_only=off)
    if family is not None and family != found:
        raise ModelLoadError(f"{name} is an {found} model but the configuration is for {family}; use --preset {found}")
    sdxl = found == "sdxl"
    kind, path = resolve(name, off)
    if kind == "file":
        parts, sched_cfg, force_zeros = _load_single_file(name, path, found, vae, dtype, vae_dtype, off, single_file_config)  # type: ignore[arg-type]
    else:
        parts, sched_cfg, force_zeros = _load_components(name, kind, path, found, vae, dtype, vae_dtype, off)
    schedule, prediction = check_schedule(sched_cfg, f"{name} scheduler", strict=strict_schedule)
    warnings: list[str] = []
    v = parts["vae"]
    if v.dtype != vae_dtype:
        v.to(dtype=vae_dtype)
    if sdxl and vae_dtype == torch.float16 and getattr(v.config, "force_upcast", False):
        warnings.append("the SDXL VAE overflows in float16 (black or NaN decodes); use --vae madebyollin/sdxl-vae-fp16-fix "
                        "or --vae-dtype float32")  # fmt: skip
    unet = parts["unet"]
    if strict_schedule and unet.config.get("prediction_type") not in (None, "epsilon"):
        raise ModelLoadError(f"{name}: the UNet is configured for {unet.config.prediction_type}; SPO needs ε-prediction")
    if sdxl and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ModelLoadError(f"{name}: an SDXL pipeline whose UNet lacks text_time conditioning")
    for m in (unet, v, parts["text_encoder"], parts.get("text_encoder_2")):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
            if device is not None:
                m.to(device)
    return BaseModel(family=found, unet=unet, vae=v, tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                     tokenizer_2=parts.get("tokenizer_2"), text_encoder_2=parts.get("text_encoder_2"),
                     force_zeros_for_empty_prompt=force_zeros, schedule=schedule, prediction_type=prediction, source=name,
                     warnings=warnings)  # fmt: skip
