"""Extract a LoRA from a fine-tuned SDXL checkpoint: per-layer truncated SVD of W_tuned − W_base.

Both checkpoints are streamed (one layer pair in memory at a time). Each difference is factorised
in fp32 with a randomized low-rank SVD (q = rank + oversample columns, ``niter`` power
iterations) when the layer is large, or a full SVD when it is small or ``--svd full`` is asked.
The reported error is exact for both: with orthonormal U, V the residual is
‖D‖² − Σ_{i≤r} s_i².
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycore.lora import formats as fm
from pycore.lora.checkpoint import Placement, open_checkpoint, target_kind
from pycore.lora.io import LoraError, SafeReader, parse_dtype_option, torch_dtype
from pycore.lora.layers import LoraLayer, LoraSet
from pycore.lora.svd import Factor, SvdOptions, block_of, factorize, randomized_svd  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import torch

#: Layers whose largest absolute difference is at or below this are reported as unchanged and
#: skipped (fp16 weights of magnitude ~0.01–1 cannot change by less than ~1e-5).
DEFAULT_MIN_DIFF = 1e-6



@dataclass
class ExtractReport:
    out: str
    layers: int = 0
    components: dict[str, int] = field(default_factory=dict)
    kept_by_block: dict[str, float] = field(default_factory=dict)
    kept_overall: float = 0.0
    unchanged: dict[str, int] = field(default_factory=dict)  # per component: layers with max|D| <= min_diff
    max_diff_by_component: dict[str, float] = field(default_factory=dict)
    ranks: str = ""
    methods: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class _TensorCache:
    """Keeps the last tensor read per file (OpenCLIP's fused q/k/v is read once for three layers)."""

    def __init__(self) -> None:
        self.readers: dict[Path, SafeReader] = {}
        self.last: dict[Path, tuple[str, Any]] = {}

    def get(self, pl: Placement) -> torch.Tensor:
        import torch

        p = pl.file.path
        if p not in self.readers:
            self.readers[p] = SafeReader(p)
        hit = self.last.get(p)
        if hit is None or hit[0] != pl.key:
            hit = (pl.key, self.readers[p].get(pl.key))
            self.last[p] = hit
        t = hit[1].to(torch.float32)
        tg = pl.target
        if tg.rows is not None:
            i, n = tg.rows
            h = t.shape[0] // n
            t = t[i * h : (i + 1) * h]
        if tg.transpose:
            t = t.T
        return t

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def extract_lora(tuned: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str], opts: SvdOptions, *,
                 fmt: str = "kohya", layout: str = "sgm", conv: bool = True, text_encoders: bool = True,
                 min_diff: float = DEFAULT_MIN_DIFF, dtype: str = "fp16", overwrite: bool = False,
                 on_layer: Callable[[int, int], None] | None = None) -> ExtractReport:  # fmt: skip
    """Factorise every targetable layer's difference into a LoRA and save it (kohya by default)."""
    import torch

    from pycore.lora.convert import save_lora

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise LoraError(f"{out} exists; pass --overwrite to replace it")
    if min_diff < 0:
        raise LoraError("--min-diff must be >= 0")
    out_dt = torch_dtype(parse_dtype_option(dtype))
    ck_t, ck_b = open_checkpoint(tuned), open_checkpoint(base)
    idx_t, idx_b = ck_t.index(), ck_b.index()
    todo: list[tuple[str, Placement, Placement]] = []
    for canon, places in idx_b.items():
        pl_b = places[0]
        kind = target_kind(canon, len(pl_b.shape))
        if kind is None or (kind == "conv" and not conv) or (kind == "te" and not text_encoders):
            continue
        if canon not in idx_t:
            raise LoraError(f"{canon} is in {Path(base).name} but not in {Path(tuned).name}; are both SDXL checkpoints?")
        pl_t = idx_t[canon][0]
        if pl_t.shape != pl_b.shape:
            raise LoraError(f"{canon}: shape {list(pl_t.shape)} in the tuned model vs {list(pl_b.shape)} in the base")
        todo.append((canon, pl_t, pl_b))
    if not todo:
        raise LoraError("no targetable layers found in the base checkpoint")
    # read in the base's file order so the streaming reads stay sequential
    todo.sort(key=lambda x: (str(x[2].file.path), x[2].info.begin, x[0]))
    rep = ExtractReport(str(out))
    lora = LoraSet(source_format="hw-extract")
    tot_by_block: dict[str, float] = defaultdict(float)
    kept_by_block: dict[str, float] = defaultdict(float)
    unchanged: dict[str, int] = defaultdict(int)
    maxdiff: dict[str, float] = defaultdict(float)
    methods: dict[str, int] = defaultdict(int)
    ct, cb = _TensorCache(), _TensorCache()
    try:
        for n, (canon, pl_t, pl_b) in enumerate(todo):
            d = ct.get(pl_t) - cb.get(pl_b)
            if not torch.isfinite(d).all():
                raise LoraError(f"{canon}: NaN/Inf in the weights")
            comp = fm.split_canonical(canon)[0]
            md = float(d.abs().max())
            maxdiff[comp] = max(maxdiff[comp], md)
            if md <= min_diff:
                unchanged[comp] += 1
            else:
                f = factorize(d, opts)
                methods[f.method] += 1
                lora.layers[canon] = LoraLayer(f.down.to(out_dt).cpu(), f.up.to(out_dt).cpu(), float(f.rank))
                tot = f.total
                b = block_of(canon)
                tot_by_block[b] += tot
                kept_by_block[b] += tot * f.kept**2
            del d
            if on_layer:
                on_layer(n + 1, len(todo))
    finally:
        ct.close()
        cb.close()
    if not lora.layers:
        raise LoraError(f"the checkpoints do not differ by more than --min-diff {min_diff:g} in any targetable layer")
    rep.layers = len(lora.layers)
    rep.components = {k: v for k, v in lora.components().items() if v}
    rep.kept_by_block = {b: math.sqrt(kept_by_block[b] / tot_by_block[b]) for b in sorted(tot_by_block)}
    rep.kept_overall = math.sqrt(sum(kept_by_block.values()) / sum(tot_by_block.values()))
    rep.unchanged = dict(unchanged)
    rep.max_diff_by_component = dict(maxdiff)
    rep.methods = dict(methods)
    ranks = sorted({v.rank for v in lora.layers.values()})
    rep.ranks = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    meta = {"hw_extract": json.dumps({"tool": "hw extract-lora", "tuned": Path(tuned).name, "base": Path(base).name, "rank": opts.rank, "energy": opts.energy,
                                      "kept_overall": round(rep.kept_overall, 6), "unchanged_layers": rep.unchanged, "min_diff": min_diff})}  # fmt: skip
    save_lora(lora, out, fmt, layout=layout, metadata=meta, overwrite=overwrite)
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep
