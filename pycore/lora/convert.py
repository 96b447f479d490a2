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
from dataclasses import dataclass
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
    path = Path(path)
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


def convert_lora(src: str | os.PathLike[str], out: str | os.PathLike[str], to: str, *, layout: str = "sgm",
                 trust_pickle: bool = False, overwrite: bool = False, dtype: torch.dtype | None = None) -> dict[str, Any]:  # fmt: skip
    """Convert a LoRA between formats without changing any number (keys, alphas, shapes)."""
    lora = load_lora(src, trust_pickle=trust_pickle)
    ours = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_network_args",
            "ss_v2", "sshs_model_hash", "sshs_legacy_hash", "ss_network_dim_note"}  # fmt: skip
    # carry over the training metadata a kohya source had (ss_*, modelspec.*), never the hashes or dims
    keep = {k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in ours and not k.startswith("modelspec.architecture")}
    rep = save_lora(lora, out, to, layout=layout, dtype=dtype, overwrite=overwrite, metadata=keep or None)
    return {"in": str(src), "out": str(out), "from": lora.source_format, "to": to, "layers": rep.layers,
            "components": rep.components, "notes": lora.notes}  # fmt: skip
