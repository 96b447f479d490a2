"""Merge LoRAs into one LoRA: exact rank concatenation, or SVD of the exact weighted sum.

Plain LoRA/LoCon inputs concatenate exactly (rank = Σ rᵢ, each input's w·alpha/r folded into its
up). Any other additive family (LoHa, LoKr, full differences) has no exact LoRA form, so it needs
``--rank`` or ``--energy``: the exact fp32 sum Σ wᵢ·ΔWᵢ is factorised per layer and the relative
error of each layer is reported. DoRA, IA3 and ``set_weight`` depend on the base weights and
cannot be folded into a LoRA without them (merge them into a checkpoint instead).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycore.lora.io import LoraError
from pycore.lora.layers import FORMATS, LoraLayer, LoraSet
from pycore.lora.merge import LoraSpec, check_same_family, load_specs, out_dtype_code
from pycore.lora.shapes import module_shape
from pycore.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    import torch


def _fits(layer: LoraLayer, shape: tuple[int, ...]) -> bool:
    d = layer.delta_shape
    if tuple(d) == tuple(shape):
        return True
    return len(d) + len(shape) == 6 and math.prod(d) == math.prod(shape) and d[0] == shape[0] and d[1] == shape[1]


def concat_loras(loras: Sequence[tuple[float, LoraSet]]) -> LoraSet:
    """Exact sum of weighted plain LoRAs: ranks concatenated, each input's scale folded into its up."""
    import torch

    groups: dict[str, list[tuple[float, LoraLayer]]] = defaultdict(list)
    for w, ls in loras:
        for k, layer in ls.layers.items():
            if not isinstance(layer, LoraLayer):
                raise LoraError(f"{k}: a {ls.families.get(k, 'non-LoRA')} layer cannot be concatenated; give --rank or --energy")
            groups[k].append((w, layer))
    out = LoraSet(source_format="hw-concat")
    for k, items in sorted(groups.items()):
        ref = items[0][1]
        downs, ups = [], []
        for w, layer in items:
            if not _fits(layer, ref.delta_shape) or layer.down.dim() != ref.down.dim() and tuple(layer.down.shape[2:]) not in ((), (1, 1)):
                raise LoraError(f"{k}: LoRAs disagree on the layer shape ({list(ref.delta_shape)} vs {list(layer.delta_shape)})")
            d = layer.down.to(torch.float32)
            u = layer.up.to(torch.float32) * (w * layer.scale)
            if d.dim() != ref.down.dim():  # linear vs 1x1 conv: follow the first LoRA's form
                d = d.reshape(d.shape[0], *ref.down.shape[1:])
                u = u.reshape(u.shape[0], u.shape[1], *ref.up.shape[2:])
            downs.append(d)
            ups.append(u)
        down = torch.cat(downs, 0)
        up = torch.cat(ups, 1)
        out.layers[k] = LoraLayer(down, up, float(down.shape[0]))
    return out


def summed_deltas(loras: Sequence[tuple[float, LoraSet]], base: str = "unknown") -> dict[str, torch.Tensor]:
    """Exact Σ wᵢ·ΔWᵢ per weight target (fp32), for families that need no base weight."""
    out: dict[str, torch.Tensor] = {}
    for w, ls in loras:
        for k, ad in ls.layers.items():
            if ad.needs_base:
                raise LoraError(f"{k}: a {ls.families.get(k, ad.family)} layer depends on the base weights; merge it into a checkpoint instead")
            shape = module_shape(k, ad, base)
            d = w * ad.delta_for(None, shape)
            if k in out and out[k].shape != d.shape:
                raise LoraError(f"{k}: LoRAs disagree on the layer shape ({list(out[k].shape)} vs {list(d.shape)})")
            out[k] = out[k] + d if k in out else d
    return out


@dataclass
class LoraMergeRequest:
    """``hw merge-lora --into-lora LORA[:W] … --out OUT`` (validated on creation)."""

    loras: list[LoraSpec]
    out: Path
    fmt: str = "kohya"
    layout: str = "sgm"
    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    svd: str = "auto"
    dtype: str | None = None
    overwrite: bool = False
    trust_pickle: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        from pycore.checks import check_output, parse_device
        from pycore.lora.extract import SvdOptions

        self.out = Path(self.out)
        self.loras = [s if isinstance(s, LoraSpec) else LoraSpec.parse(str(s)) for s in self.loras]
        if not self.loras:
            raise LoraError("give at least one LoRA to merge")
        if self.fmt not in FORMATS or self.layout not in ("sgm", "diffusers"):
            raise LoraError(f"--format must be one of {', '.join(FORMATS)} and --kohya-layout sgm or diffusers")
        out_dtype_code(self.dtype)
        self.device = parse_device(self.device)
        if self.rank is not None or self.energy is not None:
            SvdOptions(rank=self.rank, energy=self.energy, max_rank=self.max_rank, method=self.svd)
        elif self.max_rank is not None:
            raise LoraError("--max-rank only applies with --energy")
        check_output(self.out, inputs=[s.path for s in self.loras], overwrite=self.overwrite, folder=self.fmt == "peft")


@dataclass
class LoraMergeReport:
    out: str
    loras: list[dict[str, Any]]
    layers: int
    rank: str
    mode: str
    errors: dict[str, float] = field(default_factory=dict)  # per layer relative Frobenius error (SVD modes)
    error_by_block: dict[str, float] = field(default_factory=dict)
    max_error: float = 0.0
    mean_error: float = 0.0
    seconds: float = 0.0


def merge_loras_request(req: LoraMergeRequest, progress: Progress = NO_PROGRESS) -> LoraMergeReport:
    """Combine LoRAs into one: exact concat, or compressed by SVD of the exact sum (rank/energy)."""
    import torch

    from pycore.lora.convert import save_lora
    from pycore.lora.extract import SvdOptions
    from pycore.lora.svd import factorize_all

    t0 = time.perf_counter()
    loras = load_specs(req.loras, req.trust_pickle)
    fam = check_same_family(loras)
    weighted = [(s.weight, ls) for s, ls in loras]
    rep = LoraMergeReport(str(req.out), [{"path": str(s.path), "weight": s.weight, "layers": len(ls.layers), "families": ls.family_counts()} for s, ls in loras], 0, "", "concat")
    out_dt = torch.float32 if req.dtype is None else getattr(torch, {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[out_dtype_code(req.dtype)])  # type: ignore[index]
    if req.rank is not None or req.energy is not None:
        opts = SvdOptions(rank=req.rank, energy=req.energy, max_rank=req.max_rank, method=req.svd, device=req.device)
        deltas = summed_deltas(weighted, fam)
        result, errs = factorize_all(deltas, opts, out_dt, progress)
        rep.mode, rep.errors = "svd", errs.per_layer
        rep.error_by_block, rep.max_error, rep.mean_error = errs.by_block, errs.max, errs.mean
    else:
        if not all(ls.is_plain() for _, ls in weighted):
            kinds = sorted({f for _, ls in weighted for f in ls.families.values() if not f.startswith(("lora", "locon"))})
            raise LoraError(f"{', '.join(kinds)} layers have no exact LoRA form; give --rank or --energy to factorise the exact sum")
        cat = concat_loras(weighted)
        result = LoraSet({k: LoraLayer(v.down.to(out_dt), v.up.to(out_dt), v.alpha) for k, v in cat.layers.items()}, source_format="hw-concat")
    result.base = fam
    rep.layers = len(result.layers)
    ranks = sorted({v.rank for v in result.layers.values()})
    rep.rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    meta = {"hw_merge": json.dumps({"tool": "hw merge-lora --into-lora", "mode": rep.mode, "loras": [{"file": s.path.name, "weight": s.weight} for s, _ in loras],
                                    "rank": rep.rank, "max_rel_error": rep.max_error})}  # fmt: skip
    save_lora(result, req.out, req.fmt, layout=req.layout, metadata=meta, overwrite=req.overwrite)
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


def merge_loras(specs: Sequence[LoraSpec], out: str | Path, *, fmt: str = "kohya", layout: str = "sgm",
                rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
                dtype: str | None = None, overwrite: bool = False, trust_pickle: bool = False,
                device: str = "cpu", svd: str = "auto") -> LoraMergeReport:  # fmt: skip
    """Keyword form of :func:`merge_loras_request`."""
    return merge_loras_request(LoraMergeRequest(list(specs), Path(out), fmt, layout, rank, energy, max_rank, svd, dtype, overwrite, trust_pickle, device))
