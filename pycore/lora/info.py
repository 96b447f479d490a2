"""``hw lora-info``: what a LoRA file is and which tools will load it; the warnings hw gives when
it writes a file that will not work where the user is heading.

Loader rules (checked against the key maps of ComfyUI/Forge's ``comfy/lora.py``, AUTOMATIC1111's
``extensions-builtin/Lora`` and diffusers' ``load_lora_weights``):

* ComfyUI / Forge read kohya names (SGM or diffusers block names) of every LyCORIS family, their
  own ``diffusion_model.`` save layout and diffusers' ``.lora.down`` keys — but for SDXL diffusers
  files they skip the UNet attention layers and ignore alphas kept in metadata; PEFT layouts fail.
* A1111 reads kohya / LyCORIS names only; for SDXL it maps diffusers block names as SD1.5 does, so
  ``lora_unet_up_blocks_{0,1}_upsamplers_0_conv`` lands on the wrong block and is dropped, and a
  text-encoder-2 attention layer whose LoRA covers only some of q/k/v/out is skipped.
* diffusers loads its own and PEFT layouts (DoRA included) and kohya files of plain LoRA only.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pycore.lora.layers import LoraSet
from pycore.lora.svd import block_of

DIFFUSERS_FAMILIES = ("lora", "locon", "dora+lora")
_TE2_ATTN = re.compile(r"^text_encoder_2\.text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj$")


@dataclass
class InfoRequest:
    """``hw lora-info FILE``."""

    path: Path
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        from pycore.lora.io import LoraError

        self.path = Path(self.path)
        if not self.path.exists():
            raise LoraError(f"{self.path} does not exist")


@dataclass
class LoraInfo:
    path: str
    families: dict[str, int]
    layouts: list[str]
    base: str
    base_evidence: str
    modules: dict[str, int]  # per component
    ranks: dict[str, str]  # per block: '8' or '4–16' ('-' for families without a rank)
    alphas: list[float]
    metadata: dict[str, str]  # ss_* and modelspec.*
    loaders: dict[str, str] = field(default_factory=dict)  # tool -> 'yes' | 'partial: …' | 'no: …'
    notes: list[str] = field(default_factory=list)


def lora_info(req: InfoRequest) -> LoraInfo:
    """Describe a LoRA file: family, layout, base model, ranks, alphas, metadata, who loads it."""
    from pycore.lora.convert import load_lora

    ls = load_lora(req.path, trust_pickle=req.trust_pickle)
    ranks: dict[str, set[int]] = defaultdict(set)
    alphas: set[float] = set()
    for k, ad in ls.layers.items():
        b = block_of(k.removesuffix("@bias"))
        ranks[b]  # noqa: B018 - the block is listed even without a rank
        if getattr(ad, "rank", None):
            ranks[b].add(int(ad.rank))
        if getattr(ad, "alpha", None) is not None:
            alphas.add(float(ad.alpha))
    meta = {k: v for k, v in sorted(ls.metadata.items()) if k.startswith(("ss_", "sshs_", "modelspec."))}
    info = LoraInfo(str(req.path), ls.family_counts(), ls.layouts, ls.base, ls.base_evidence,
                    {c: n for c, n in ls.components().items() if n}, {b: _span(r) for b, r in sorted(ranks.items())},
                    sorted(alphas), meta, notes=list(ls.notes))  # fmt: skip
    info.loaders = loaders(ls)
    return info


def _span(r: set[int]) -> str:
    if not r:
        return "-"
    return str(min(r)) if len(r) == 1 else f"{min(r)}–{max(r)}"


def partial_te2_attention(ls: LoraSet) -> list[int]:
    """Text-encoder-2 layers whose LoRA covers some but not all of q/k/v/out (A1111 skips them)."""
    seen: dict[int, set[str]] = defaultdict(set)
    for k in ls.layers:
        m = _TE2_ATTN.match(k)
        if m:
            seen[int(m.group(1))].add(m.group(2))
    return sorted(i for i, s in seen.items() if len(s) < 4)


def a1111_dropped_upsamplers(ls: LoraSet) -> list[str]:
    """SDXL up_blocks.0/1 upsampler convs written with diffusers block names (A1111 drops them)."""
    if ls.base == "sd15" or "kohya-diffusers" not in ls.layouts:
        return []
    return sorted(k for k in ls.layers if re.match(r"^unet\.up_blocks\.[01]\.upsamplers\.", k))


def loaders(ls: LoraSet) -> dict[str, str]:
    lay = set(ls.layouts)
    fams = set(ls.families.values()) or {"lora"}
    kohya = {x for x in lay if x.startswith("kohya")}
    out: dict[str, str] = {}
    if lay <= kohya | {"comfyui"}:
        out["ComfyUI/Forge"] = "yes"
    elif "peft" in lay:
        out["ComfyUI/Forge"] = "no: PEFT layout (lora_A/lora_B without component names); convert with --to kohya"
    else:
        out["ComfyUI/Forge"] = "partial: diffusers layout — SDXL UNet attention layers are skipped and alphas in metadata ignored; convert with --to kohya"
    if lay <= kohya:
        why = []
        if te2 := partial_te2_attention(ls):
            why.append(f"text-encoder-2 layer(s) {', '.join(map(str, te2[:5]))} cover only some of q/k/v/out and are skipped")
        if ups := a1111_dropped_upsamplers(ls):
            why.append(f"{len(ups)} SDXL upsampler conv(s) in diffusers block names land on the wrong block and are dropped (use --kohya-layout sgm)")
        out["A1111"] = "partial: " + "; ".join(why) if why else "yes"
    else:
        out["A1111"] = "no: A1111 reads kohya/LyCORIS names (lora_unet_…, lora_te…) only; convert with --to kohya"
    if kohya and lay <= kohya:
        plain = fams <= {"lora", "locon"}
        out["diffusers"] = "yes" if plain else f"no: diffusers reads kohya files of plain LoRA only ({', '.join(sorted(fams - {'lora', 'locon'}))} here); convert with --rank"
    elif "comfyui" in lay:
        out["diffusers"] = "no: ComfyUI save layout; convert with --to diffusers"
    else:
        out["diffusers"] = "yes" if fams <= set(DIFFUSERS_FAMILIES) else "no: " + ", ".join(sorted(fams - set(DIFFUSERS_FAMILIES)))
    return out


def write_warnings(ls: LoraSet, fmt: str, layout: str) -> list[str]:
    """What the user should know about a file hw is about to write in ``fmt``/``layout``."""
    out = []
    if fmt in ("diffusers", "peft"):
        out.append(f"{fmt} format loads in diffusers/PEFT; ComfyUI/Forge {'fail' if fmt == 'peft' else 'skip the SDXL UNet attention layers and ignore the alphas'} "
                   "and A1111 loads nothing — use --format kohya for UIs")  # fmt: skip
    if fmt == "kohya":
        view = LoraSet(ls.layers, base=ls.base, layouts=["kohya-diffusers" if layout == "diffusers" else "kohya-sgm"])
        if ups := a1111_dropped_upsamplers(view):
            out.append(f"--kohya-layout diffusers: A1111 maps {len(ups)} SDXL upsampler conv layer(s) ({ups[0]}) to the wrong block and drops them; "
                       "ComfyUI and diffusers load them (use --kohya-layout sgm for A1111)")  # fmt: skip
        if te2 := partial_te2_attention(ls):
            out.append(f"A1111 skips text-encoder-2 attention layer(s) {', '.join(map(str, te2[:5]))}: the LoRA covers only some of q/k/v/out there")
    return out


__all__ = ["InfoRequest", "LoraInfo", "a1111_dropped_upsamplers", "lora_info", "loaders", "partial_te2_attention", "write_warnings"]
