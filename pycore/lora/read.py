"""Read a LoRA state dict of any common family and layout into canonical adapters.

Layouts read (all SD1.5 and SDXL):

* kohya / LyCORIS: ``lora_unet_…`` (SGM or diffusers block names), ``lora_te1_``/``lora_te2_``
  (SDXL), ``lora_te_`` (SD1.5);
* ComfyUI "Save LoRA": ``diffusion_model.<SGM path>``, ``text_encoders.clip_l.transformer.…``,
  ``text_encoders.clip_g.transformer.…``;
* diffusers: ``unet.…lora.down.weight`` / ``lora_linear_layer`` / ``text_encoder(_2).…``;
* PEFT: ``base_model.model.…lora_A.weight`` (+ ``lora_magnitude_vector`` for DoRA).

Each module's suffixes decide its family (see :mod:`pycore.lora.families`). Every key is either
used or named in a one-line error; a module spelled twice is reported.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pycore.lora import formats as fm
from pycore.lora.families import BIAS, DoraLayer, FullDiff, Ia3Layer, LohaLayer, LokrLayer, SetWeight
from pycore.lora.io import LoraError
from pycore.lora.layers import ADAPTER_METADATA_KEY, LoraLayer, LoraSet

if TYPE_CHECKING:
    import torch

#: Known key tails, longest first (so ``lora_down.weight`` wins over ``weight``), and their part name.
_TAILS: list[tuple[str, str]] = sorted(
    [
        ("lora_down.weight", "down"), ("lora_up.weight", "up"), ("lora_mid.weight", "mid"),
        ("lora.down.weight", "down"), ("lora.up.weight", "up"),
        ("lora_linear_layer.down.weight", "down"), ("lora_linear_layer.up.weight", "up"),
        ("lora_A.weight", "down"), ("lora_B.weight", "up"),
        ("lora_magnitude_vector.weight", "magnitude"), ("lora_magnitude_vector", "magnitude"),
        ("hada_w1_a", "hada_w1_a"), ("hada_w1_b", "hada_w1_b"), ("hada_w2_a", "hada_w2_a"), ("hada_w2_b", "hada_w2_b"),
        ("hada_t1", "hada_t1"), ("hada_t2", "hada_t2"),
        ("lokr_w1", "lokr_w1"), ("lokr_w1_a", "lokr_w1_a"), ("lokr_w1_b", "lokr_w1_b"),
        ("lokr_w2", "lokr_w2"), ("lokr_w2_a", "lokr_w2_a"), ("lokr_w2_b", "lokr_w2_b"), ("lokr_t1", "lokr_t1"), ("lokr_t2", "lokr_t2"),
        ("dora_scale", "dora_scale"), ("diff_b", "diff_b"), ("diff", "diff"), ("set_weight", "set_weight"),
        ("w_norm", "w_norm"), ("b_norm", "b_norm"), ("on_input", "on_input"), ("alpha", "alpha"), ("weight", "weight"),
    ],
    key=lambda t: -len(t[0]),
)  # fmt: skip
_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_magnitude_vector)\.(?!weight$)[A-Za-z0-9_-]+\.weight$")
COMFY_TE = {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2"}
COMFY_UNET = ("diffusion_model.", "model.diffusion_model.")


@dataclass
class KeyInfo:
    key: str
    module: str  # the module's name as spelled in the file
    part: str
    canonical: str
    layout: str


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.hada_w1_a' -> ('lora_unet_x', 'hada_w1_a'); None for an unknown tail."""
    k = _ADAPTER_NAME.sub(r".\1.weight", key)
    for tail, part in _TAILS:
        if k.endswith("." + tail) and len(k) > len(tail) + 1:
            return k[: -len(tail) - 1], part
    return None


def module_canonical(module: str, component: str | None) -> tuple[str, str] | None:
    """A module name in any layout -> (canonical module, layout name) or None."""
    if module.startswith("lora_"):
        canon = fm.kohya_to_canonical(module)
        if canon is None:
            return None
        if module.startswith("lora_unet_"):
            sgm = module[len("lora_unet_") :].split("_")[0] in ("input", "middle", "output", "time", "label", "out")
            return canon, "kohya-sgm" if sgm else "kohya-diffusers"
        return canon, "kohya"
    for p in COMFY_UNET:
        if module.startswith(p):
            d = fm.unet_sgm_to_diffusers(module[len(p) :])
            return (f"unet.{d}", "comfyui") if d else None
    for p, comp in COMFY_TE.items():
        if module.startswith(p):
            path = fm.te_path(module[len(p) :])
            return (f"{comp}.{path}", "comfyui") if path.startswith("text_model.") or path == "text_projection" else None
    path = module.removeprefix("base_model.model.")
    layout = "peft" if module.startswith("base_model.model.") else "diffusers"
    comp, _, rest = path.partition(".")
    if comp in fm.COMPONENTS:
        path = rest
    else:
        comp = component or ("text_encoder" if fm.te_path(path).startswith("text_model.") else "unet")
        layout = "peft"
    if comp != "unet":
        path = fm.te_path(path)
        if not (path.startswith("text_model.") or path == "text_projection"):
            return None
    elif not fm._is_diffusers_unet_path(path):
        return None
    return f"{comp}.{path}", layout


def _peft_configs(metadata: Mapping[str, str], peft_config: Mapping[str, Any] | None, component: str | None, name: str) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {}
    if ADAPTER_METADATA_KEY in metadata:
        try:
            flat = json.loads(metadata[ADAPTER_METADATA_KEY])
        except json.JSONDecodeError:
            raise LoraError(f"{name}: metadata {ADAPTER_METADATA_KEY} is not JSON") from None
        for k, v in flat.items() if isinstance(flat, dict) else ():
            c, _, f = k.partition(".")
            if c in fm.COMPONENTS and f:
                cfg.setdefault(c, {})[f] = v
    if peft_config is not None:
        cfg[component or "unet"] = dict(peft_config)
    return cfg


def _pattern_get(patterns: Mapping[str, Any], path: str) -> Any:
    for pat, val in patterns.items():
        if path == pat or re.match(rf"(.*\.)?({pat})$", path):
            return val
    return None


def _alpha_from_config(cfg: Mapping[str, Any] | None, path: str, rank: int) -> float | None:
    """Effective alpha (scale = alpha/rank) for a module from a PEFT LoraConfig dict."""
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha")
    a = _pattern_get(dict(cfg.get("alpha_pattern") or {}), path)
    alpha = float(a) if a is not None else (float(alpha) if alpha is not None else None)
    if alpha is None:
        return None
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha


@dataclass
class _Group:
    parts: dict[str, KeyInfo] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)

    def key(self, part: str) -> str:
        return self.parts[part].key


def classify_keys(sd: Mapping[str, torch.Tensor], component: str | None, name: str) -> tuple[dict[str, _Group], list[str]]:
    """Group keys by canonical module; returns (groups, notes about modules spelled twice)."""
    import torch

    groups: dict[str, _Group] = defaultdict(_Group)
    unknown: list[str] = []
    twice: dict[str, tuple[str, str]] = {}
    for key, t in sd.items():
        sp = split_key(key)
        mc = module_canonical(sp[0], component) if sp else None
        if sp is None or mc is None:
            unknown.append(key)
            continue
        info = KeyInfo(key, sp[0], sp[1], *mc)
        g = groups[info.canonical]
        prev = g.parts.get(info.part)
        if prev is not None:
            same = prev.module != info.module and g.tensors[info.part].shape == t.shape and torch.equal(g.tensors[info.part], t)
            if not same:
                raise LoraError(f"{name}: {info.canonical} is stored twice with different values ({prev.key} and {key})")
            twice.setdefault(info.canonical, (prev.module, info.module))
            continue
        g.parts[info.part] = info
        g.tensors[info.part] = t
    if unknown:
        raise LoraError(f"{name}: {len(unknown)} key(s) are not LoRA keys hw understands: {', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
    notes = [f"{c} is named twice ({a} and {b}, identical values); one copy is used" for c, (a, b) in sorted(twice.items())]
    return dict(groups), notes


def _alpha(g: _Group, name: str) -> float | None:
    if "alpha" not in g.tensors:
        return None
    t = g.tensors["alpha"]
    if t.numel() != 1:
        raise LoraError(f"{name}: alpha {g.key('alpha')} has {t.numel()} values, expected one")
    a = float(t.float().item())
    if not math.isfinite(a):
        raise LoraError(f"{name}: alpha {g.key('alpha')} is not finite")
    return a


def _need(g: _Group, canon: str, parts: tuple[str, ...], family: str, name: str) -> None:
    missing = [p for p in parts if p not in g.tensors]
    if missing:
        some = next(iter(g.parts.values()))
        raise LoraError(f"{name}: {family} module {canon} lacks {', '.join(f'{some.module}.{p}' for p in missing)}")


def _build_lora(g: _Group, canon: str, name: str, cfg: dict[str, dict[str, Any]], assumed: list[str]) -> LoraLayer:
    if "down" not in g.tensors or "up" not in g.tensors:
        half = "up" if "down" in g.tensors else "down"
        raise LoraError(f"{name}: 1 module(s) lack a LoRA half: {canon} ({half} missing)")
    down, up = g.tensors["down"], g.tensors["up"]
    if (down.dim() == 2) != (up.dim() == 2):
        raise LoraError(f"{name}: {canon}: up {list(up.shape)} and down {list(down.shape)} do not match (linear vs conv)")
    if "mid" in g.tensors:  # Tucker/CP LoCon: fold the core into down (exact)
        import torch

        mid = g.tensors["mid"].float()
        if mid.dim() != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]:
            raise LoraError(f"{name}: {g.key('mid')} {list(mid.shape)} does not match up {list(up.shape)} / down {list(down.shape)}")
        down = torch.einsum("a b k l, b i -> a i k l", mid, down.float().flatten(1))
    rank = int(down.shape[0])
    alpha = _alpha(g, name)
    if alpha is None:
        comp, path = fm.split_canonical(canon)
        alpha = _alpha_from_config(cfg.get(comp), path, rank)
    if alpha is None:
        alpha = float(rank)
        assumed.append(canon)
    try:
        return LoraLayer(down, up, alpha)
    except LoraError as e:
        raise LoraError(f"{name}: {canon}: {e}") from None


def build_adapters(canon: str, g: _Group, name: str, cfg: dict[str, dict[str, Any]], assumed: list[str]) -> tuple[dict[str, Any], str]:
    """The adapters one module's keys encode: {target id: adapter} and the family label."""
    p = g.tensors
    used = {"alpha"}
    out: dict[str, Any] = {}
    if "down" in p or "up" in p or "mid" in p:
        inner: Any = _build_lora(g, canon, name, cfg, assumed)
        family = "locon-tucker" if "mid" in p else ("locon" if inner.down.dim() == 4 else "lora")
        used |= {"down", "up", "mid"}
    elif any(k.startswith("hada_") for k in p):
        _need(g, canon, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa", name)
        inner = LohaLayer(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], _alpha(g, name), p.get("hada_t1"), p.get("hada_t2"))
        family = "loha-tucker" if "hada_t1" in p else "loha"
        used |= {k for k in p if k.startswith("hada_")}
    elif any(k.startswith("lokr_") for k in p):
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        inner = LokrLayer(*(p.get(k) for k in names), alpha=_alpha(g, name))  # type: ignore[misc]
        if "lokr_t1" in p:
            raise LoraError(f"{name}: {g.key('lokr_t1')}: LoKr with a Tucker core on w1 is not a layout any loader reads")
        family = "lokr-tucker" if "lokr_t2" in p else ("lokr" if inner.rank is None else "lokr-factorised")
        used |= {k for k in p if k.startswith("lokr_")}
    else:
        inner, family = None, ""
    if inner is not None:
        try:
            inner.validate(canon)
        except LoraError as e:
            raise LoraError(f"{name}: {e}") from None
        mag = p.get("dora_scale") if "dora_scale" in p else p.get("magnitude")
        if mag is not None:
            inner = DoraLayer(inner, mag, "lycoris" if "dora_scale" in p else "peft")
            family = "dora+" + family
            used |= {"dora_scale", "magnitude"}
        out[canon] = inner
    elif "dora_scale" in p or "magnitude" in p:
        k = g.key("dora_scale" if "dora_scale" in p else "magnitude")
        raise LoraError(f"{name}: {k}: a DoRA magnitude without LoRA/LoHa/LoKr weights for the module")
    full = _full_parts(g, canon, name, out)
    used |= full
    if "weight" in p:
        if "on_input" not in p and not g.parts["weight"].layout.startswith("kohya"):
            raise LoraError(f"{name}: 1 key(s) are not LoRA keys hw understands: {g.key('weight')}")
        out[canon] = Ia3Layer(p["weight"], bool(p["on_input"].reshape(-1)[0].item()) if "on_input" in p else False)
        used |= {"weight", "on_input"}
        family = "ia3"
    family = family or ("full" if full else "")
    left = [g.key(k) for k in p if k not in used]
    if left or not out:
        what = left[0] if left else next(iter(g.parts.values())).key
        raise LoraError(f"{name}: {what}: {'not used by the ' + family + ' family' if family else 'no weights for this module (alpha alone)'}")
    return out, family


def _full_parts(g: _Group, canon: str, name: str, out: dict[str, Any]) -> set[str]:
    p = g.tensors
    for part, target in (("diff", canon), ("w_norm", canon), ("diff_b", canon + BIAS), ("b_norm", canon + BIAS), ("set_weight", canon)):
        if part not in p:
            continue
        if target in out:
            raise LoraError(f"{name}: {g.key(part)}: the module already has a {type(out[target]).__name__} for that weight")
        out[target] = SetWeight(p[part]) if part == "set_weight" else FullDiff(p[part], part)
    return {"diff", "w_norm", "diff_b", "b_norm", "set_weight"} & set(p)


def parse_lora(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
               peft_config: Mapping[str, Any] | None = None, component: str | None = None, name: str = "LoRA") -> LoraSet:  # fmt: skip
    """Read a LoRA state dict in any supported family and layout into canonical adapters.

    Unknown keys, missing parts, shapes that do not multiply and keys a family does not use are
    one-line errors naming the key. ``component`` names the model for PEFT files without a
    component prefix.
    """
    metadata = dict(metadata or {})
    cfg = _peft_configs(metadata, peft_config, component, name)
    groups, notes = classify_keys(sd, component, name)
    out = LoraSet(metadata=metadata)
    assumed: list[str] = []
    layouts: set[str] = set()
    for canon in sorted(groups):
        g = groups[canon]
        adapters, family = build_adapters(canon, g, name, cfg, assumed)
        for target, ad in adapters.items():
            out.layers[target] = ad
            out.families[target] = family if target == canon else "full"
        layouts |= {i.layout for i in g.parts.values()}
    if not out.layers:
        raise LoraError(f"{name}: no LoRA layers found")
    out.layouts = sorted(layouts)
    out.source_format = "+".join(sorted({"kohya" if lay.startswith("kohya") else lay for lay in layouts}))
    out.notes.extend(notes)
    if assumed:
        out.notes.append(f"{len(assumed)} layer(s) store no alpha; alpha = rank assumed (scale 1), as diffusers does")
    out.base, out.base_evidence = detect_base(out, sd.keys(), metadata)
    out.check_finite(name)
    return out


# --- which base model a file is for -----------------------------------------------------------

_SDXL_ONLY = re.compile(r"^unet\.(add_embedding\.|.*transformer_blocks\.[1-9])")
_SD15_ONLY = re.compile(r"^unet\.(down_blocks\.0\.attentions\.|up_blocks\.3\.attentions\.)")


def detect_base(lora: LoraSet, keys: Any, metadata: Mapping[str, str]) -> tuple[str, str]:
    """('sdxl' | 'sd15' | 'other' | 'unknown', the evidence) from names, shapes, then metadata."""
    keys = list(keys)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoders.clip_g.")) for k in keys) or any(k.startswith("text_encoder_2.") for k in lora.layers):
        return "sdxl", "two text encoders"
    if any(k.startswith("lora_te_") for k in keys):
        return "sd15", "one text encoder (lora_te_)"
    for k, ad in lora.layers.items():
        if _SDXL_ONLY.match(k):
            return "sdxl", f"SDXL-only module {k}"
        if _SD15_ONLY.match(k):
            return "sd15", f"SD1.5-only module {k}"
    for k, ad in lora.layers.items():
        if k.endswith(".attn2.to_k") and hasattr(ad, "down") and ad.down.dim() == 2:
            width = int(ad.down.shape[1])
            fam = {2048: "sdxl", 768: "sd15", 1024: "other"}.get(width)
            if fam:
                return fam, f"cross-attention width {width}"
    ver = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    if "xl" in ver:
        return "sdxl", "metadata"
    if "v1" in ver or "sd_1" in ver:
        return "sd15", "metadata"
    if ver.strip():
        return "other", "metadata"
    return "unknown", "no text encoder, SDXL/SD1.5-only block or metadata says"
