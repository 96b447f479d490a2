"""LoRA layers in memory, and reading/writing them in kohya, diffusers and PEFT formats."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pycore.lora import formats as fm
from pycore.lora.io import LoraError

if TYPE_CHECKING:
    import torch

FORMATS = ("kohya", "diffusers", "peft")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


@dataclass(eq=False)
class LoraLayer:
    """One LoRA module: delta = (alpha / rank) * up @ down (conv: flattened, reshaped back)."""

    down: torch.Tensor  # rank x in   |  rank x in x kh x kw
    up: torch.Tensor  # out x rank  |  out x rank x 1 x 1
    alpha: float

    def __post_init__(self) -> None:
        if self.down.dim() not in (2, 4) or self.up.dim() != self.down.dim():
            raise LoraError(f"LoRA down {list(self.down.shape)} / up {list(self.up.shape)}: expected 2-D (linear) or 4-D (conv) pairs")
        if self.up.shape[1] != self.down.shape[0]:
            raise LoraError(f"LoRA up {list(self.up.shape)} and down {list(self.down.shape)} ranks differ")
        if self.up.dim() == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise LoraError(f"LoRA conv up must be 1x1, got {list(self.up.shape)}")
        if not math.isfinite(self.alpha):
            raise LoraError(f"LoRA alpha {self.alpha} is not finite")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    family = "lora"
    needs_base = False

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up}

    def validate(self, name: str) -> None:
        pass

    def out_features(self) -> int:
        return int(self.up.shape[0])

    def delta_for(self, w: torch.Tensor | None, shape: tuple[int, ...], device: Any = None) -> torch.Tensor:
        """ΔW reshaped to the target ``shape`` (linear ↔ 1×1 conv allowed)."""
        from pycore.lora.families import fit

        return fit(self.delta(device), shape, "LoRA")

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """scale * up @ down in fp32, shaped like the target weight (conv: out x in x kh x kw)."""
        import torch

        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (self.scale * (up @ down)).reshape(self.delta_shape)


@dataclass
class LoraSet:
    """All adapters of one LoRA file, by target id: the canonical module name (see
    pycore.lora.formats) for its weight, ``<canonical>@bias`` for its bias. Values are
    :class:`LoraLayer` or one of the classes in :mod:`pycore.lora.families`."""

    layers: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = ""
    notes: list[str] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)  # target id -> 'lora', 'locon', 'loha', 'dora+lora', …
    layouts: list[str] = field(default_factory=list)  # 'kohya-sgm', 'kohya-diffusers', 'comfyui', 'diffusers', 'peft'
    base: str = "unknown"  # 'sdxl' | 'sd15' | 'other' | 'unknown'
    base_evidence: str = ""

    def scaled(self, weight: float) -> LoraSet:
        """The same LoRA with strength ``weight`` folded into alpha (exact; plain LoRA layers only)."""
        if not self.is_plain():
            raise LoraError("only plain LoRA layers can fold a strength into alpha")
        return LoraSet({k: LoraLayer(v.down, v.up, v.alpha * weight) for k, v in self.layers.items()}, dict(self.metadata), self.source_format, list(self.notes))

    def is_plain(self) -> bool:
        return all(isinstance(v, LoraLayer) for v in self.layers.values())

    def family_counts(self) -> dict[str, int]:
        return dict(Counter(self.families.get(k, getattr(v, "family", "lora")) for k, v in self.layers.items()))

    def check_finite(self, name: str = "LoRA") -> None:
        import torch

        for k, v in self.layers.items():
            for part, t in v.tensors().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise LoraError(f"{name}: {k} ({part}) contains NaN/Inf weights")

    def components(self) -> dict[str, int]:
        return fm.kohya_count_modules([k.removesuffix("@bias") for k in self.layers])


# --- writing ----------------------------------------------------------------------------------


def _common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_config_for(layers: Mapping[str, LoraLayer], component: str) -> dict[str, Any]:
    """A PEFT LoraConfig dict reproducing every rank and alpha of one component exactly."""
    mods = {fm.split_canonical(k)[1]: v for k, v in layers.items() if fm.split_canonical(k)[0] == component}
    r = _common([v.rank for v in mods.values()])
    a = _common([v.alpha for v in mods.values()])
    return {
        "r": r,
        "lora_alpha": a,
        "target_modules": sorted(mods),
        "rank_pattern": {p: v.rank for p, v in mods.items() if v.rank != r},
        "alpha_pattern": {p: v.alpha for p, v in mods.items() if v.alpha != a},
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
    }


def to_state_dict(lora: LoraSet, fmt: str, *, layout: str = "sgm", dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """Serialise to (tensors, metadata). ``fmt`` kohya or diffusers (one file); see save_lora for peft."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous() if dtype is not None else t.contiguous()

    if fmt == "kohya":
        for target, layer in sorted(lora.layers.items()):
            tensors.update(_kohya_tensors(target, layer, layout, lora.base, cast))
        plain = [_plain(v) for v in lora.layers.values() if _plain(v) is not None]
        lin = [v for v in plain if v.down.dim() == 2 or tuple(v.down.shape[2:]) == (1, 1)]
        conv = [v for v in plain if v not in lin]
        ranks = {v.rank for v in plain}
        main = lin or conv
        meta.update({
            "ss_network_module": "networks.lora" if lora.is_plain() else "lycoris.kohya",
            "ss_network_dim": str(_common([v.rank for v in main])) if main else "0",
            "ss_network_alpha": _num(_common([v.alpha for v in main])) if main else "0",
            "ss_v2": "False",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        })  # fmt: skip
        if lora.base in BASE_META:
            meta["ss_base_model_version"], meta["modelspec.architecture"] = BASE_META[lora.base]
        if conv:
            meta["ss_network_args"] = json.dumps({"conv_dim": str(_common([v.rank for v in conv])), "conv_alpha": _num(_common([v.alpha for v in conv]))})
        if len(ranks) > 1:
            meta["ss_network_dim_note"] = "ranks differ per layer (dynamic rank); ss_network_dim is the most common one"
        from pycore.lora.io import body_sha256

        meta["sshs_model_hash"] = body_sha256(tensors.values())
    elif fmt == "diffusers":
        if not lora.is_plain():
            bad = next(k for k, v in lora.layers.items() if not isinstance(v, LoraLayer))
            raise LoraError(f"{bad}: a {lora.families.get(bad, 'non-LoRA')} layer has no diffusers LoRA form; write --to kohya (keeps DoRA/.diff) or convert with --rank/--energy")
        adapter_meta: dict[str, Any] = {}
        for canon, layer in sorted(lora.layers.items()):
            tensors[f"{canon}.lora.down.weight"] = cast(layer.down)
            tensors[f"{canon}.lora.up.weight"] = cast(layer.up)
        for comp in fm.COMPONENTS:
            if any(fm.split_canonical(k)[0] == comp for k in lora.layers):
                for k, v in peft_config_for(lora.layers, comp).items():
                    adapter_meta[f"{comp}.{k}"] = v
        meta["format"] = "pt"
        meta[ADAPTER_METADATA_KEY] = json.dumps(adapter_meta, sort_keys=True)
    else:
        raise LoraError(f"unknown LoRA format {fmt!r}; choose kohya, diffusers or peft")
    return tensors, meta


#: (ss_base_model_version, modelspec.architecture) written for each model family
BASE_META = {"sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"), "sd15": ("sd_v1", "stable-diffusion-v1/lora")}


def _plain(layer: Any) -> LoraLayer | None:
    inner = getattr(layer, "inner", layer)
    return inner if isinstance(inner, LoraLayer) else None


def _kohya_tensors(target: str, layer: Any, layout: str, base: str, cast: Any) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS keys of one adapter: LoRA (+ dora_scale for DoRA) or a .diff/.diff_b."""
    import torch

    k = fm.canonical_to_kohya(target.removesuffix("@bias"), layout, base=base if base in fm.UP_ATTN else "sdxl")
    if target.endswith("@bias"):
        if not hasattr(layer, "diff"):
            raise LoraError(f"{target}: only a full difference (.diff_b) can be written for a bias")
        return {f"{k}.diff_b": cast(layer.diff)}
    inner = _plain(layer)
    if inner is None:
        if hasattr(layer, "diff"):
            return {f"{k}.diff": cast(layer.diff)}
        raise LoraError(f"{target}: a {getattr(layer, 'family', '?')} layer cannot be written as kohya LoRA")
    out = {f"{k}.lora_down.weight": cast(inner.down), f"{k}.lora_up.weight": cast(inner.up), f"{k}.alpha": torch.tensor(float(inner.alpha), dtype=torch.float32)}
    if layer is not inner:  # DoRA: LyCORIS spelling; PEFT's per-row magnitude becomes (out, 1, …)
        m = layer.magnitude
        if layer.style == "peft":
            m = m.reshape(-1).reshape(-1, *[1] * (inner.down.dim() - 1))
        out[f"{k}.dora_scale"] = cast(m)
    return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
