"""Truncated SVD of weight differences: the LoRA factorisation shared by extract, convert and merge.

Each difference is factorised in fp32 with a randomized low-rank SVD (q = rank + oversample
columns, ``niter`` power iterations) when the layer is large, or a full SVD when it is small or
``--svd full`` is asked. The reported error is exact for both: with orthonormal U, V the residual
is ‖D‖² − Σ_{i≤r} s_i².
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pycore.lora import formats as fm
from pycore.lora.io import LoraError
from pycore.lora.layers import LoraLayer, LoraSet
from pycore.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    import torch


@dataclass
class SvdOptions:
    rank: int | None = None
    energy: float | None = None  # keep this fraction of the Frobenius norm per layer
    max_rank: int | None = None  # cap for --energy (default 128)
    method: str = "auto"  # auto | lowrank | full
    oversample: int = 16
    niter: int = 2
    clamp_quantile: float | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        from pycore.checks import check_float, check_int
        from pycore.limits import MAX_LORA_RANK

        if (self.rank is None) == (self.energy is None):
            raise LoraError("give exactly one of --rank or --energy")
        if self.rank is not None:
            check_int("--rank", self.rank, 1, MAX_LORA_RANK)
        if self.energy is not None:
            check_float("--energy", self.energy, 0.0, 1.0, lo_open=True)
        if self.max_rank is not None:
            check_int("--max-rank", self.max_rank, 1, MAX_LORA_RANK)
        if self.method not in ("auto", "lowrank", "full"):
            raise LoraError("--svd must be auto, lowrank or full")
        if self.clamp_quantile is not None:
            check_float("--clamp-quantile", self.clamp_quantile, 0.0, 1.0, lo_open=True)


@dataclass
class Factor:
    up: torch.Tensor
    down: torch.Tensor
    rank: int
    kept: float  # sqrt(Σ kept s² / ‖D‖²)
    rel_error: float  # ‖D − up@down‖ / ‖D‖
    method: str
    total: float = 0.0  # ‖D‖²


def randomized_svd(a: torch.Tensor, q: int, niter: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko et al. randomized SVD (as torch.svd_lowrank, but seeded): U (m×q), S (q), Vh (q×n)."""
    import torch

    g = torch.Generator(device=a.device).manual_seed(seed)
    m, n = a.shape
    transpose = m < n
    if transpose:
        a = a.T
        m, n = n, m
    omega = torch.randn(n, q, generator=g, device=a.device, dtype=a.dtype)
    y, _ = torch.linalg.qr(a @ omega)
    for _ in range(niter):
        z, _ = torch.linalg.qr(a.T @ y)
        y, _ = torch.linalg.qr(a @ z)
    b = y.T @ a  # q × n
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = y @ ub
    if transpose:
        return vh.T, s, u.T
    return u, s, vh


def factorize(d: torch.Tensor, opts: SvdOptions) -> Factor:
    """Truncated SVD of a weight difference (2-D, or 4-D conv: flattened); up = U·S, down = Vᵀ."""
    import torch

    shape = d.shape
    a = d.to(device=opts.device, dtype=torch.float32).flatten(1)
    m, n = a.shape
    full_rank = min(m, n)
    cap = min(opts.rank if opts.rank is not None else (opts.max_rank or 128), full_rank)
    total = float((a * a).sum())
    if total == 0.0:
        raise LoraError("cannot factorise an all-zero difference")
    q = min(cap + opts.oversample, full_rank)
    method = opts.method
    if method == "auto":
        method = "full" if full_rank <= 2 * q else "lowrank"
    if method == "full":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        u, s, vh = randomized_svd(a, q, opts.niter, opts.seed)
    s2 = (s.double() ** 2).cumsum(0)
    if opts.energy is not None:
        need = opts.energy**2 * total
        hits = (s2[:cap] >= need * (1 - 1e-12)).nonzero()
        r = int(hits[0]) + 1 if len(hits) else cap
    else:
        r = cap
    up = u[:, :r] * s[:r]
    down = vh[:r]
    kept2 = float(s2[r - 1])
    err = math.sqrt(max(total - kept2, 0.0) / total)
    if err < 0.05:  # ‖D‖² − Σs² cancels in fp32 when the error is small: measure it instead
        err = float(torch.linalg.norm(a - up @ down)) / math.sqrt(total)
    if opts.clamp_quantile is not None and opts.clamp_quantile < 1.0:
        vals = torch.cat([up.flatten(), down.flatten()]).abs()
        k = max(1, min(vals.numel(), math.ceil(opts.clamp_quantile * vals.numel())))
        hi = float(vals.kthvalue(k).values)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        err = float(torch.linalg.norm(a - up @ down)) / math.sqrt(total)
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    return Factor(up.contiguous(), down.contiguous(), r, math.sqrt(min(kept2 / total, 1.0)), err, method, total)


def block_of(canonical: str) -> str:
    comp, path = fm.split_canonical(canonical)
    if comp != "unet":
        return comp
    p = path.split(".")
    if p[0] in ("down_blocks", "up_blocks"):
        return f"unet.{p[0]}.{p[1]}"
    return f"unet.{p[0]}"



@dataclass
class SvdErrors:
    per_layer: dict[str, float] = field(default_factory=dict)  # ‖D − up@down‖ / ‖D‖
    by_block: dict[str, float] = field(default_factory=dict)  # sqrt(Σ residual² / Σ ‖D‖²) per block
    overall: float = 0.0
    max: float = 0.0
    mean: float = 0.0


def factorize_all(deltas: Mapping[str, torch.Tensor], opts: SvdOptions, dtype: torch.dtype, progress: Progress = NO_PROGRESS) -> tuple[LoraSet, SvdErrors]:
    """Factorise every ΔW (target id -> tensor) into a plain LoRA; errors per layer and per block."""
    out = LoraSet(source_format="hw-svd")
    errs = SvdErrors()
    tot: dict[str, float] = defaultdict(float)
    res: dict[str, float] = defaultdict(float)
    progress.stage("factorising", len(deltas), "layers")
    for k, d in deltas.items():
        if float(d.abs().max()) == 0.0:
            errs.per_layer[k] = 0.0
            progress.advance(1)
            continue
        f = factorize(d, opts)
        out.layers[k] = LoraLayer(f.down.to(dtype).cpu(), f.up.to(dtype).cpu(), float(f.rank))
        out.families[k] = "lora"
        errs.per_layer[k] = f.rel_error
        b = block_of(k)
        tot[b] += f.total
        res[b] += f.total * f.rel_error**2
        progress.advance(1)
    if not out.layers:
        raise LoraError("every layer difference is zero; nothing to factorise")
    errs.by_block = {b: math.sqrt(res[b] / tot[b]) for b in sorted(tot)}
    errs.overall = math.sqrt(sum(res.values()) / sum(tot.values()))
    vals = list(errs.per_layer.values())
    errs.max, errs.mean = max(vals), sum(vals) / len(vals)
    return out, errs
