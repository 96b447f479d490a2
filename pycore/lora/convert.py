"""Load and save LoRAs in any supported format; lossless format conversion.

* ``kohya``: one .safetensors with lora_unet_/lora_te1_/lora_te2_ keys, .alpha per module and the
  ss_* metadata webui tools read (SGM layout by default, as ComfyUI/A1111/Forge expect).
* ``diffusers``: one .safetensors with unet./text_encoder./text_encoder_2. prefixes and
  .lora.down/.lora.up weights (what diffusers' training scripts write), every rank and alpha
  kept exactly in the ``lora_adapter_metadata`` PEFT config diffusers' load_lora_weights reads.
* ``peft``: a folder with one PEFT adapter per component (OUT/unet, OUT/text_encoder,
  OUT/text_encoder_2: adapter_model.safetensors + adapter_config.json), each loadable with
  ``PeftModel.from_pretrained(component_model, OUT/unet)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycore.lora import formats as fm
from pycore.io import atomic_dir
from pycore.lora.io import LoraError, load_tensors, save_tensors
from pycore.lora.layers import FORMATS, LoraLayer, LoraSet, peft_config_for, to_state_dict
from pycore.lora.read import parse_lora

if TYPE_CHECKING:
    import torch

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def load_lora(path: str | os.PathLike[str], *, trust_pickle: bool = False, component: str | None = None) -> LoraSet:
    """Read a LoRA file (kohya, diffusers, PEFT state dict) or a PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        return _load_peft_dir(path, trust_pickle)
    if not path.exists():
        raise LoraError(f"{path} does not exist")
    sd, meta = load_tensors(path, trust_pickle=trust_pickle)
    cfg = None
    side = path.parent / PEFT_CONFIG
    if side.is_file() and path.name.startswith("adapter_model"):
        cfg = _read_json(side)
    lora = parse_lora(sd, meta, peft_config=cfg, component=component, name=str(path))
    lora.check_finite(str(path))
    return lora


def _read_json(p: Path) -> dict[str, Any]:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{p}: cannot read JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LoraError(f"{p}: expected a JSON object")
    return obj


def _load_peft_dir(path: Path, trust_pickle: bool) -> LoraSet:
    dirs = [(c, path / c) for c in fm.COMPONENTS if (path / c / PEFT_CONFIG).is_file()]
    if not dirs and (path / PEFT_CONFIG).is_file():
        comp = path.name if path.name in fm.COMPONENTS else None
        dirs = [(comp, path)]
    if not dirs:
        raise LoraError(f"{path}: a folder must hold a PEFT adapter ({PEFT_CONFIG}) or unet/, text_encoder/, text_encoder_2/ adapters")
    out = LoraSet(source_format="peft")
    for comp, d in dirs:
        weights = d / PEFT_WEIGHTS
        if not weights.is_file():
            pickled = d / "adapter_model.bin"
            if not pickled.is_file():
                raise LoraError(f"{d}: no {PEFT_WEIGHTS}")
            weights = pickled
        sd, meta = load_tensors(weights, trust_pickle=trust_pickle)
        part = parse_lora(sd, meta, peft_config=_read_json(d / PEFT_CONFIG), component=comp, name=str(weights))
        out.layers.update(part.layers)
        out.notes.extend(part.notes)
    out.check_finite(str(path))
    return out


@dataclass
class SaveReport:
    path: Path
    format: str
    layers: int
    components: dict[str, int]


def save_lora(lora: LoraSet | Mapping[str, Any] | Any, path: str | os.PathLike[str], format: str = "kohya", *,  # noqa: A002
              alpha: float | Mapping[str, float] | None = None, metadata: Mapping[str, str] | None = None,
              layout: str = "sgm", dtype: torch.dtype | None = None, component: str = "unet",
              adapter_name: str = "default", overwrite: bool = False) -> SaveReport:  # fmt: skip
    """Save a LoRA as kohya, diffusers or peft, atomically; never overwrites unless asked.

    ``lora`` may be a :class:`LoraSet`; a PEFT/diffusers/kohya state dict (keys with or without a
    unet./text_encoder./text_encoder_2. prefix); a model carrying PEFT adapters (its LoraConfig
    gives the alphas); or a dict ``{"unet": model, "text_encoder": model, ...}`` of such models.
    ``alpha`` (one number, or canonical module -> alpha) sets alphas a plain state dict lacks
    (default: alpha = rank). ``metadata`` is added to the file's metadata (e.g. the training config).
    """
    if format not in FORMATS:
        raise LoraError(f"unknown LoRA format {format!r}; choose {', '.join(FORMATS)}")
    if layout not in ("sgm", "diffusers"):
        raise LoraError(f"kohya layout must be sgm or diffusers, not {layout!r}")
    ls = as_lora_set(lora, alpha=alpha, component=component, adapter_name=adapter_name)
    ls.check_finite()
    if ls.base == "unknown":
        from pycore.lora.read import detect_base

        ls.base, ls.base_evidence = detect_base(ls, [], ls.metadata)
    path = Path(path)
    import warnings

    from pycore.errors import HwWarning
    from pycore.lora.info import write_warnings

    for w in write_warnings(ls, format, layout):
        warnings.warn(w, HwWarning, stacklevel=2)
    if format == "peft" and not ls.is_plain():
        bad = next(k for k, v in ls.layers.items() if not isinstance(v, LoraLayer))
        raise LoraError(f"{bad}: a {ls.families.get(bad, 'non-LoRA')} layer has no PEFT LoRA form here; write --to kohya or convert with --rank/--energy")
    if format == "peft":
        _save_peft_dir(ls, path, metadata, dtype, overwrite)
    else:
        tensors, meta = to_state_dict(ls, format, layout=layout, dtype=dtype)
        if metadata:
            meta.update({str(k): str(v) for k, v in metadata.items()})
        save_tensors(path, tensors, meta, overwrite=overwrite)
    return SaveReport(path, format, len(ls.layers), ls.components())


def as_lora_set(obj: Any, *, alpha: float | Mapping[str, float] | None = None, component: str = "unet", adapter_name: str = "default") -> LoraSet:
    import torch

    if isinstance(obj, LoraSet):
        return obj
    if isinstance(obj, torch.nn.Module):
        return _from_peft_model(obj, component, adapter_name)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.nn.Module) for v in obj.values()):
        out = LoraSet(source_format="peft")
        for comp, model in obj.items():
            if comp not in fm.COMPONENTS:
                raise LoraError(f"component must be one of {', '.join(fm.COMPONENTS)}, not {comp!r}")
            out.layers.update(_from_peft_model(model, comp, adapter_name).layers)
        return out
    if isinstance(obj, Mapping):
        sd = {k.replace(f".{adapter_name}.weight", ".weight"): v for k, v in obj.items()}
        ls = parse_lora(sd, component=component, name="state dict")
        if alpha is not None:
            for k, layer in ls.layers.items():
                a = alpha.get(k) if isinstance(alpha, Mapping) else alpha
                if a is not None:
                    ls.layers[k] = LoraLayer(layer.down, layer.up, float(a))
        return ls
    raise LoraError(f"cannot save a {type(obj).__name__} as a LoRA")


def _from_peft_model(model: Any, component: str, adapter_name: str) -> LoraSet:
    from peft import get_peft_model_state_dict

    cfgs = getattr(model, "peft_config", None)
    if not cfgs or adapter_name not in cfgs:
        raise LoraError(f"the {component} model has no PEFT adapter named {adapter_name!r}")
    cfg = cfgs[adapter_name]
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    cfg_d = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "rank_pattern": dict(cfg.rank_pattern or {}),
             "alpha_pattern": dict(cfg.alpha_pattern or {}), "use_rslora": bool(cfg.use_rslora)}  # fmt: skip
    sd = {k.replace(f".{adapter_name}.weight", ".weight"): v.detach().to("cpu") for k, v in sd.items()}
    return parse_lora(sd, peft_config=cfg_d, component=component, name=f"{component} adapter")


def _save_peft_dir(ls: LoraSet, path: Path, metadata: Mapping[str, str] | None, dtype: Any, overwrite: bool) -> None:
    with atomic_dir(path, overwrite=overwrite) as tmp:
        for comp in fm.COMPONENTS:
            layers = {k: v for k, v in ls.layers.items() if fm.split_canonical(k)[0] == comp}
            if not layers:
                continue
            d = tmp / comp
            d.mkdir()
            tensors = {}
            for canon, layer in sorted(layers.items()):
                p = fm.split_canonical(canon)[1]
                tensors[f"base_model.model.{p}.lora_A.weight"] = (layer.down.to(dtype) if dtype else layer.down).contiguous()
                tensors[f"base_model.model.{p}.lora_B.weight"] = (layer.up.to(dtype) if dtype else layer.up).contiguous()
            meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
            save_tensors(d / PEFT_WEIGHTS, tensors, meta)
            cfg = {"peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
                   "modules_to_save": None, "inference_mode": True, **peft_config_for(layers, comp)}  # fmt: skip
            (d / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")


@dataclass
class ConvertRequest:
    """``hw convert-lora SRC --to FORMAT --out OUT`` (validated on creation)."""

    src: Path
    out: Path
    to: str = "kohya"
    layout: str = "sgm"
    rank: int | None = None  # SVD rank for families with no exact LoRA form (LoHa, LoKr, full diff)
    energy: float | None = None  # … or the fraction of each layer's Frobenius norm to keep
    max_rank: int | None = None
    svd: str = "auto"
    dtype: str | None = None
    trust_pickle: bool = False
    overwrite: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        from pycore.checks import check_output, parse_device
        from pycore.lora.merge import out_dtype_code
        from pycore.lora.svd import SvdOptions

        self.src, self.out = Path(self.src), Path(self.out)
        if self.to not in FORMATS:
            raise LoraError(f"--to must be one of {', '.join(FORMATS)}, not {self.to!r}")
        if self.layout not in ("sgm", "diffusers"):
            raise LoraError(f"--kohya-layout must be sgm or diffusers, not {self.layout!r}")
        if not self.src.exists():
            raise LoraError(f"{self.src} does not exist")
        out_dtype_code(self.dtype)
        self.device = parse_device(self.device)
        if self.rank is not None or self.energy is not None:
            SvdOptions(rank=self.rank, energy=self.energy, max_rank=self.max_rank, method=self.svd)
        check_output(self.out, inputs=[self.src], overwrite=self.overwrite, folder=self.to == "peft")


@dataclass
class ConvertReport:
    src: str
    out: str
    source_format: str
    to: str
    base: str
    layers: int
    components: dict[str, int]
    families: dict[str, int]
    lossless: bool
    factorised: int = 0  # layers turned into LoRA by SVD
    error_by_block: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    max_error: float = 0.0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _kept_as_is(target: str, ad: Any, to: str) -> bool:
    """Layers written without change: plain LoRA always; DoRA-on-LoRA and full diffs in kohya files."""
    if isinstance(ad, LoraLayer):
        return True
    if to != "kohya":
        return False
    return isinstance(getattr(ad, "inner", None), LoraLayer) or (hasattr(ad, "diff") and (target.endswith("@bias") or ad.diff.dim() == 1))


def convert(req: ConvertRequest, progress: Any = None) -> ConvertReport:
    """Convert a LoRA of any family into plain LoRA (kohya, diffusers or PEFT).

    LoRA/LoCon (Tucker folded in) is copied exactly; DoRA and bias/norm differences are kept
    as they are in kohya output; LoHa, LoKr and full weight differences are factorised by SVD
    to ``rank``/``energy`` with the relative error per layer and block reported.
    """
    import torch

    from pycore.lora.combine import summed_deltas
    from pycore.lora.merge import out_dtype_code
    from pycore.lora.svd import SvdOptions, factorize_all
    from pycore.progress import NO_PROGRESS

    lora = load_lora(req.src, trust_pickle=req.trust_pickle)
    keep = {k: v for k, v in lora.layers.items() if _kept_as_is(k, v, req.to)}
    rest = LoraSet({k: v for k, v in lora.layers.items() if k not in keep}, families=lora.families)
    rep = ConvertReport(str(req.src), str(req.out), lora.source_format, req.to, lora.base, 0, {}, lora.family_counts(), not rest.layers, notes=list(lora.notes))
    dt = getattr(torch, {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[out_dtype_code(req.dtype)]) if req.dtype else None  # type: ignore[index]
    result = LoraSet(dict(keep), families={k: lora.families.get(k, "lora") for k in keep}, base=lora.base, base_evidence=lora.base_evidence)
    if rest.layers:
        fams = sorted({lora.families.get(k, "?") for k in rest.layers})
        based = next((k for k, v in rest.layers.items() if v.needs_base), None)
        if based is not None:
            raise LoraError(f"{based}: a {lora.families.get(based, '?')} layer depends on the base weights and has no {req.to} LoRA form; "
                            "write --to kohya (DoRA on LoRA keeps its dora_scale) or merge it into a checkpoint")  # fmt: skip
        if req.rank is None and req.energy is None:
            raise LoraError(f"{len(rest.layers)} layer(s) ({', '.join(fams)}) have no exact {req.to} LoRA form; give --rank or --energy to factorise them (e.g. {next(iter(rest.layers))})")
        opts = SvdOptions(rank=req.rank, energy=req.energy, max_rank=req.max_rank, method=req.svd, device=req.device)
        svd_set, errs = factorize_all(summed_deltas([(1.0, rest)], lora.base), opts, dt or torch.float32, progress or NO_PROGRESS)
        result.layers.update(svd_set.layers)
        result.families.update(svd_set.families)
        rep.factorised, rep.errors, rep.error_by_block, rep.max_error = len(svd_set.layers), errs.per_layer, errs.by_block, errs.max
    ours = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_network_args",
            "ss_v2", "sshs_model_hash", "sshs_legacy_hash", "ss_network_dim_note"}  # fmt: skip
    # carry over the training metadata a kohya source had (ss_*, modelspec.*), never the hashes or dims
    meta = {k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in ours and not k.startswith("modelspec.architecture")}
    saved = save_lora(result, req.out, req.to, layout=req.layout, dtype=dt, overwrite=req.overwrite, metadata=meta or None)
    rep.layers, rep.components = saved.layers, saved.components
    return rep


def convert_lora(src: str | os.PathLike[str], out: str | os.PathLike[str], to: str, *, layout: str = "sgm",
                 trust_pickle: bool = False, overwrite: bool = False, dtype: Any = None, **svd: Any) -> dict[str, Any]:  # fmt: skip
    """Keyword form of :func:`convert` returning a dict (``dtype`` a name or torch dtype)."""
    from pycore.checks import dtype_name

    req = ConvertRequest(Path(src), Path(out), to, layout, dtype=dtype_name(dtype) if dtype is not None else None,
                         trust_pickle=trust_pickle, overwrite=overwrite, **svd)  # fmt: skip
    rep = convert(req)
    return {"in": rep.src, "out": rep.out, "from": rep.source_format, "to": rep.to, "layers": rep.layers,
            "components": rep.components, "notes": rep.notes, "base": rep.base, "lossless": rep.lossless,
            "families": rep.families, "error_by_block": rep.error_by_block, "max_error": rep.max_error}  # fmt: skip
