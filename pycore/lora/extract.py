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
from pycore.errors import NothingDone
from pycore.lora.checkpoint import Checkpoint, Placement, open_checkpoint, target_kind
from pycore.progress import NO_PROGRESS, Progress
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


@dataclass
class ExtractRequest:
    """``hw extract-lora TUNED BASE --out OUT`` (validated on creation; OUT may be neither input)."""

    tuned: Path
    base: Path
    out: Path
    opts: SvdOptions
    fmt: str = "kohya"
    layout: str = "sgm"
    conv: bool = True
    text_encoders: bool = True
    min_diff: float = DEFAULT_MIN_DIFF
    dtype: str = "fp16"
    overwrite: bool = False

    def __post_init__(self) -> None:
        from pycore.checks import check_float, check_output, parse_device
        from pycore.lora.layers import FORMATS
        from pycore.lora.merge import out_dtype_code

        self.tuned, self.base, self.out = Path(self.tuned), Path(self.base), Path(self.out)
        for p in (self.tuned, self.base):
            if not p.exists():
                raise LoraError(f"{p} does not exist")
        if self.fmt not in FORMATS or self.layout not in ("sgm", "diffusers"):
            raise LoraError(f"--format must be one of {', '.join(FORMATS)} and --kohya-layout sgm or diffusers")
        check_float("--min-diff", self.min_diff, 0.0, 1e3)
        out_dtype_code(self.dtype)
        self.opts.device = parse_device(self.opts.device)
        check_output(self.out, inputs=[self.tuned, self.base], overwrite=self.overwrite, folder=self.fmt == "peft")


def extract_lora(tuned: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str], opts: SvdOptions, *,
                 fmt: str = "kohya", layout: str = "sgm", conv: bool = True, text_encoders: bool = True,
                 min_diff: float = DEFAULT_MIN_DIFF, dtype: str = "fp16", overwrite: bool = False,
                 on_layer: Callable[[int, int], None] | None = None) -> ExtractReport:  # fmt: skip
    """Keyword form of :func:`extract`."""
    from pycore.lora.merge import _CallbackProgress

    req = ExtractRequest(Path(tuned), Path(base), Path(out), opts, fmt, layout, conv, text_encoders, min_diff, dtype, overwrite)
    return extract(req, _CallbackProgress(on_layer) if on_layer else NO_PROGRESS)


def plan_layers(ck_t: Checkpoint, ck_b: Checkpoint, req: ExtractRequest) -> list[tuple[str, Placement, Placement]]:
    """The targetable layers of BASE with their place in TUNED, in BASE's file order."""
    from pycore.lora.merge import BASE_LABEL

    if "unknown" not in (ck_t.base, ck_b.base) and ck_t.base != ck_b.base:
        raise LoraError(f"{req.tuned.name} is an {BASE_LABEL[ck_t.base]} checkpoint but {req.base.name} is {BASE_LABEL[ck_b.base]}; extract from a model and its own base")
    idx_t, idx_b = ck_t.index(), ck_b.index()
    todo: list[tuple[str, Placement, Placement]] = []
    for canon, places in idx_b.items():
        pl_b = places[0]
        kind = target_kind(canon, len(pl_b.shape))
        if kind is None or (kind == "conv" and not req.conv) or (kind == "te" and not req.text_encoders):
            continue
        if canon not in idx_t:
            raise LoraError(f"{canon} is in {req.base.name} but not in {req.tuned.name}; are both the same model family?")
        pl_t = idx_t[canon][0]
        if pl_t.shape != pl_b.shape:
            raise LoraError(f"{canon}: shape {list(pl_t.shape)} in the tuned model vs {list(pl_b.shape)} in the base")
        todo.append((canon, pl_t, pl_b))
    if not todo:
        raise LoraError("no targetable layers found in the base checkpoint")
    # read in the base's file order so the streaming reads stay sequential
    todo.sort(key=lambda x: (str(x[2].file.path), x[2].info.begin, x[0]))
    return todo


def extract(req: ExtractRequest, progress: Progress = NO_PROGRESS) -> ExtractReport:
    """Factorise every targetable layer's difference into a LoRA and save it (kohya by default)."""
    import torch

    from pycore.lora.convert import save_lora

    t0 = time.perf_counter()
    min_diff, opts = req.min_diff, req.opts
    out_dt = torch_dtype(parse_dtype_option(req.dtype))
    ck_t, ck_b = open_checkpoint(req.tuned), open_checkpoint(req.base)
    todo = plan_layers(ck_t, ck_b, req)
    rep = ExtractReport(str(req.out))
    lora = LoraSet(source_format="hw-extract", base=ck_b.base)
    tot_by_block: dict[str, float] = defaultdict(float)
    kept_by_block: dict[str, float] = defaultdict(float)
    unchanged: dict[str, int] = defaultdict(int)
    maxdiff: dict[str, float] = defaultdict(float)
    methods: dict[str, int] = defaultdict(int)
    ct, cb = _TensorCache(), _TensorCache()
    progress.stage("extracting", len(todo), "layers")
    try:
        for canon, pl_t, pl_b in todo:
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
                b = block_of(canon)
                tot_by_block[b] += f.total
                kept_by_block[b] += f.total * f.kept**2
            del d
            progress.advance(1)
    finally:
        ct.close()
        cb.close()
    if not lora.layers:
        raise NothingDone(f"the checkpoints do not differ by more than --min-diff {min_diff:g} in any targetable layer; nothing was written")
    rep.layers = len(lora.layers)
    rep.components = {k: v for k, v in lora.components().items() if v}
    rep.kept_by_block = {b: math.sqrt(kept_by_block[b] / tot_by_block[b]) for b in sorted(tot_by_block)}
    rep.kept_overall = math.sqrt(sum(kept_by_block.values()) / sum(tot_by_block.values()))
    rep.unchanged, rep.max_diff_by_component, rep.methods = dict(unchanged), dict(maxdiff), dict(methods)
    ranks = sorted({v.rank for v in lora.layers.values()})
    rep.ranks = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    meta = {"hw_extract": json.dumps({"tool": "hw extract-lora", "tuned": req.tuned.name, "base": req.base.name, "rank": opts.rank, "energy": opts.energy,
                                      "kept_overall": round(rep.kept_overall, 6), "unchanged_layers": rep.unchanged, "min_diff": min_diff})}  # fmt: skip
    save_lora(lora, req.out, req.fmt, layout=req.layout, metadata=meta, overwrite=req.overwrite)
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep
