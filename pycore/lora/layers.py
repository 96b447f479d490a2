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
_UNSUPPORTED = {
    "hada_w1_a": "LyCORIS LoHa", "hada_w2_a": "LyCORIS LoHa", "hada_w1_b": "LyCORIS LoHa", "hada_w2_b": "LyCORIS LoHa",
    "hada_t1": "LyCORIS LoHa", "hada_t2": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lokr_w2": "LyCORIS LoKr",
    "lokr_w1_a": "LyCORIS LoKr", "lokr_w1_b": "LyCORIS LoKr", "lokr_w2_a": "LyCORIS LoKr", "lokr_w2_b": "LyCORIS LoKr",
    "lokr_t2": "LyCORIS LoKr", "lora_mid": "LyCORIS CP (lora_mid)", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
    "diff": "LyCORIS full diff", "diff_b": "LyCORIS full diff", "w_norm": "LyCORIS GLoRA", "a1": "LyCORIS GLoRA",
}  # fmt: skip


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

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """scale * up @ down in fp32, shaped like the target weight (conv: out x in x kh x kw)."""
        import torch

        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (self.scale * (up @ down)).reshape(self.delta_shape)


@dataclass
class LoraSet:
    """All layers of one LoRA, by canonical module name (see pycore.lora.formats)."""

    layers: dict[str, LoraLayer] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = ""
    notes: list[str] = field(default_factory=list)

    def scaled(self, weight: float) -> LoraSet:
        """The same LoRA with strength ``weight`` folded into alpha (exact)."""
        return LoraSet({k: LoraLayer(v.down, v.up, v.alpha * weight) for k, v in self.layers.items()}, dict(self.metadata), self.source_format, list(self.notes))

    def check_finite(self, name: str = "LoRA") -> None:
        import torch

        bad = [k for k, v in self.layers.items() if not (torch.isfinite(v.down).all() and torch.isfinite(v.up).all())]
        if bad:
            raise LoraError(f"{name}: {len(bad)} layer(s) contain NaN/Inf weights, e.g. {bad[0]}")

    def components(self) -> dict[str, int]:
        return fm.kohya_count_modules(list(self.layers))


# --- reading ----------------------------------------------------------------------------------


def _unsupported(key: str) -> str | None:
    last = key.rsplit(".", 2)
    for part in last[-2:]:
        if part in _UNSUPPORTED:
            return _UNSUPPORTED[part]
    return None


def _peft_alpha_lookup(cfg: Mapping[str, Any]) -> tuple[int | None, float | None, dict[str, int], dict[str, float], bool]:
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    return (int(r) if r is not None else None, float(alpha) if alpha is not None else None,
            dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {}), bool(cfg.get("use_rslora", False)))  # fmt: skip


def _pattern_get(patterns: Mapping[str, Any], path: str) -> Any:
    for pat, val in patterns.items():
        if path == pat or re.match(rf"(.*\.)?({pat})$", path):
            return val
    return None


def _alpha_from_config(cfg: Mapping[str, Any] | None, path: str, rank: int) -> float | None:
    """Effective alpha (scale = alpha/rank) for a module from a PEFT LoraConfig dict."""
    if not cfg:
        return None
    _, alpha, _, apat, rslora = _peft_alpha_lookup(cfg)
    a = _pattern_get(apat, path)
    alpha = float(a) if a is not None else alpha
    if alpha is None:
        return None
    return alpha * math.sqrt(rank) if rslora else alpha


def parse_lora(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
               peft_config: Mapping[str, Any] | None = None, component: str | None = None, name: str = "LoRA") -> LoraSet:  # fmt: skip
    """Read a LoRA state dict in any supported format into canonical layers.

    Unknown keys, LyCORIS/DoRA keys, missing up/down halves and malformed shapes are errors
    naming the keys. ``component`` names the model for PEFT files without a component prefix.
    """
    import torch

    metadata = dict(metadata or {})
    comp_cfg: dict[str, dict[str, Any]] = {}
    if ADAPTER_METADATA_KEY in metadata:
        try:
            flat = json.loads(metadata[ADAPTER_METADATA_KEY])
        except json.JSONDecodeError:
            raise LoraError(f"{name}: metadata {ADAPTER_METADATA_KEY} is not JSON") from None
        for k, v in flat.items():
            c, _, field_ = k.partition(".")
            if c in fm.COMPONENTS and field_:
                comp_cfg.setdefault(c, {})[field_] = v
    if peft_config is not None:
        comp_cfg[component or "unet"] = dict(peft_config)

    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    formats: set[str] = set()
    unknown: list[str] = []
    unsupported: dict[str, str] = {}
    for key, t in sd.items():
        kind = _unsupported(key)
        if kind:
            unsupported.setdefault(kind, key)
            continue
        canon, part, fmt = _classify(key, component)
        if canon is None:
            unknown.append(key)
            continue
        formats.add(fmt)
        if part == "down":
            downs[canon] = t
        elif part == "up":
            ups[canon] = t
        else:
            if t.numel() != 1:
                raise LoraError(f"{name}: alpha {key} has {t.numel()} values, expected one")
            alphas[canon] = float(t.float().item())
    if unsupported:
        kinds = ", ".join(f"{k} (e.g. {v})" for k, v in unsupported.items())
        raise LoraError(f"{name}: unsupported LoRA type {kinds}; only plain LoRA/LoCon (up/down/alpha) is supported")
    if unknown:
        raise LoraError(f"{name}: {len(unknown)} key(s) are not LoRA keys hw understands: {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
    missing = sorted((set(downs) ^ set(ups)) | (set(alphas) - set(downs) - set(ups)))
    if missing:
        halves = [f"{m} ({'up' if m in downs else 'down' if m in ups else 'up and down'} missing)" for m in missing[:5]]
        raise LoraError(f"{name}: {len(missing)} module(s) lack a LoRA half: {', '.join(halves)}")
    out = LoraSet(metadata=metadata, source_format="+".join(sorted(formats)))
    assumed = 0
    for canon in sorted(downs):
        down, up = downs[canon], ups[canon]
        if down.dim() == 2 and up.dim() == 4 or down.dim() == 4 and up.dim() == 2:
            raise LoraError(f"{name}: {canon}: up {list(up.shape)} and down {list(down.shape)} do not match (linear vs conv)")
        rank = int(down.shape[0]) if down.dim() else 0
        alpha = alphas.get(canon)
        if alpha is None:
            comp, path = fm.split_canonical(canon)
            alpha = _alpha_from_config(comp_cfg.get(comp), path, rank)
        if alpha is None:
            alpha = float(rank)
            assumed += 1
        try:
            out.layers[canon] = LoraLayer(down, up, alpha)
        except LoraError as e:
            raise LoraError(f"{name}: {canon}: {e}") from None
    if not out.layers:
        raise LoraError(f"{name}: no LoRA layers found")
    if assumed:
        out.notes.append(f"{assumed} layer(s) store no alpha; alpha = rank assumed (scale 1), as diffusers does")
    return out


def _classify(key: str, component: str | None) -> tuple[str | None, str, str]:
    """key -> (canonical module, 'down'|'up'|'alpha', format) or (None, '', '')."""
    for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
        if key.startswith("lora_") and key.endswith(suffix):
            canon = fm.kohya_to_canonical(key[: -len(suffix)])
            return (canon, part, "kohya") if canon else (None, "", "")
    m = re.match(r"^(.*)\.(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$", key)
    alpha_m = re.match(r"^(.*)\.alpha$", key)
    if not m and not alpha_m:
        return None, "", ""
    if m:
        path, which = m.group(1), m.group(2)
        part = "down" if which.endswith(("down", "_A")) else "up"
        fmt = "peft" if which.startswith("lora_") and which[5] in "AB" else "diffusers"
    else:
        path, part, fmt = alpha_m.group(1), "alpha", "diffusers"  # type: ignore[union-attr]
    path = path.removeprefix("base_model.model.")
    comp, _, rest = path.partition(".")
    if comp in fm.COMPONENTS:
        path = rest
    else:
        comp = component or ("text_encoder" if fm.te_path(path).startswith("text_model.") else "unet")
    if comp != "unet":
        path = fm.te_path(path)
    if comp == "unet" and not fm._is_diffusers_unet_path(path):
        return None, "", ""
    if comp != "unet" and not (path.startswith("text_model.") or path == "text_projection"):
        return None, "", ""
    return f"{comp}.{path}", part, fmt


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


def to_state_dict(lora: LoraSet, fmt: str, *, layout: str = "sgm", dtype: torch.dtype | None = None,
                  base_model: str = "sdxl_base_v1-0") -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """Serialise to (tensors, metadata). ``fmt`` kohya or diffusers (one file); see save_lora for peft."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous() if dtype is not None else t.contiguous()

    if fmt == "kohya":
        for canon, layer in sorted(lora.layers.items()):
            k = fm.canonical_to_kohya(canon, layout)
            tensors[f"{k}.lora_down.weight"] = cast(layer.down)
            tensors[f"{k}.lora_up.weight"] = cast(layer.up)
            tensors[f"{k}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
        lin = [v for v in lora.layers.values() if v.down.dim() == 2 or tuple(v.down.shape[2:]) == (1, 1)]
        conv = [v for v in lora.layers.values() if v not in lin]
        ranks = {v.rank for v in lora.layers.values()}
        meta.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(_common([v.rank for v in lin])) if lin else str(_common([v.rank for v in conv])),
            "ss_network_alpha": _num(_common([v.alpha for v in lin])) if lin else _num(_common([v.alpha for v in conv])),
            "ss_base_model_version": base_model,
            "ss_v2": "False",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        })  # fmt: skip
        if conv:
            meta["ss_network_args"] = json.dumps({"conv_dim": str(_common([v.rank for v in conv])), "conv_alpha": _num(_common([v.alpha for v in conv]))})
        if len(ranks) > 1:
            meta["ss_network_dim_note"] = "ranks differ per layer (dynamic rank); ss_network_dim is the most common one"
        from pycore.lora.io import body_sha256

        meta["sshs_model_hash"] = body_sha256(tensors.values())
    elif fmt == "diffusers":
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


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
