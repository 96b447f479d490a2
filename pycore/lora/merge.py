"""Merge LoRAs into an SDXL checkpoint (streaming), or into one LoRA (exact concat, optional SVD).

Math is fp32: W' = W + Σ_i w_i (alpha_i / r_i) up_i @ down_i, cast once to the output dtype.
The checkpoint is read and written one tensor at a time (pycore.lora.io), so peak memory stays
near the largest tensor plus the LoRAs, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycore.lora import formats as fm
from pycore.lora.checkpoint import Checkpoint, Placement, open_checkpoint
from pycore.lora.convert import load_lora, save_lora
from pycore.lora.io import DTYPES, LoraError, SafeReader, SafeWriter, parse_dtype_option, torch_dtype
from pycore.lora.layers import LoraLayer, LoraSet

if TYPE_CHECKING:
    import torch


@dataclass
class LoraSpec:
    """A LoRA path with its strength, parsed from 'PATH[:WEIGHT]'."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        head, sep, tail = text.rpartition(":")
        if sep and head and not Path(text).exists():
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text), 1.0)

    def __post_init__(self) -> None:
        import math

        if not math.isfinite(self.weight):
            raise LoraError(f"LoRA weight for {self.path} is not finite")


@dataclass
class MergeReport:
    out: str
    base: str
    loras: list[dict[str, Any]]
    tensors_written: int = 0
    modules_merged: dict[str, int] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    dtype: str = ""
    seconds: float = 0.0


def _load_specs(specs: Sequence[LoraSpec], trust_pickle: bool) -> list[tuple[LoraSpec, LoraSet]]:
    if not specs:
        raise LoraError("give at least one LoRA")
    return [(s, load_lora(s.path, trust_pickle=trust_pickle)) for s in specs]


def _fits(layer: LoraLayer, shape: tuple[int, ...]) -> bool:
    d = layer.delta_shape
    if tuple(d) == tuple(shape):
        return True
    # a 1x1 conv LoRA on a Linear weight (or the reverse): same numbers, other shape
    import math

    return len(d) + len(shape) == 6 and math.prod(d) == math.prod(shape) and d[0] == shape[0] and d[1] == shape[1]


def plan_merge(ck: Checkpoint, loras: Sequence[tuple[LoraSpec, LoraSet]]) -> tuple[dict[tuple[Path, str], list[tuple[Placement, LoraLayer]]], list[str]]:
    """Place every LoRA layer on checkpoint tensors; check shapes. Returns (plan, unplaced)."""
    idx = ck.index()
    plan: dict[tuple[Path, str], list[tuple[Placement, LoraLayer]]] = defaultdict(list)
    unplaced: list[str] = []
    bad: list[str] = []
    for spec, lora in loras:
        scaled = lora.scaled(spec.weight)
        for canon, layer in scaled.layers.items():
            places = idx.get(canon)
            if not places:
                unplaced.append(f"{canon} ({spec.path.name})")
                continue
            for pl in places:
                if not _fits(layer, pl.shape):
                    bad.append(f"{canon}: LoRA delta {list(layer.delta_shape)} vs weight {list(pl.shape)} in {pl.file.rel or pl.file.path.name}")
                    continue
                plan[(pl.file.path, pl.key)].append((pl, layer))
    if bad:
        raise LoraError(f"{len(bad)} shape mismatch(es), e.g. {bad[0]}")
    return dict(plan), unplaced


def apply_deltas(w: torch.Tensor, items: Sequence[tuple[Placement, LoraLayer]], device: str = "cpu") -> torch.Tensor:
    """fp32 copy of w with every placed LoRA delta added."""
    import torch

    w = w.to(device=device, dtype=torch.float32)
    for pl, layer in items:
        d = layer.delta(device)
        tg = pl.target
        if tg.transpose:
            d = d.reshape(pl.shape).T
        if tg.rows is not None:
            i, n = tg.rows
            h = w.shape[0] // n
            w[i * h : (i + 1) * h] += d.reshape(w[i * h : (i + 1) * h].shape)
        else:
            w += d.reshape(w.shape)
    return w


def merge_into_checkpoint(base: str | os.PathLike[str], specs: Sequence[LoraSpec], out: str | os.PathLike[str], *,
                          dtype: str | None = None, allow_unused: bool = False, overwrite: bool = False,
                          trust_pickle: bool = False, device: str = "cpu",
                          on_tensor: Callable[[int, int], None] | None = None,
                          warn: Callable[[str], None] | None = None) -> MergeReport:  # fmt: skip
    """Stream BASE tensor by tensor into OUT (same layout), adding the weighted LoRA deltas."""
    import torch

    t0 = time.perf_counter()
    base, out = Path(base), Path(out)
    ck = open_checkpoint(base, trust_pickle=trust_pickle)
    if out.exists() and not overwrite:
        raise LoraError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() == base.resolve():
        raise LoraError("--out must differ from the base checkpoint")
    if ck.kind == "single" and out.suffix != ".safetensors":
        raise LoraError(f"--out must be a .safetensors file for a single-file base, not {out.name}")
    out_dtype = parse_dtype_option(dtype) if dtype else None
    loras = _load_specs(specs, trust_pickle)
    plan, unplaced = plan_merge(ck, loras)
    if unplaced:
        msg = f"{len(unplaced)} LoRA module(s) have no weight in {base.name}: {', '.join(unplaced[:5])}{' …' if len(unplaced) > 5 else ''}"
        if not allow_unused:
            raise LoraError(msg + " (pass --allow-unused to merge the rest)")
        if warn:
            warn(msg)
    rep = MergeReport(str(out), str(base), [{"path": str(s.path), "weight": s.weight, "format": ls.source_format, "layers": len(ls.layers), "notes": ls.notes} for s, ls in loras], unused=unplaced)
    merged_meta = json.dumps({"tool": "hw merge-lora", "base": base.name, "loras": [{"file": s.path.name, "weight": s.weight, "layers": len(ls.layers)} for s, ls in loras],
                              "dtype": out_dtype or "base", "unused": len(unplaced)})  # fmt: skip
    total = sum(len(ck.headers[f.path][0]) for f in ck.files)
    done = [0]
    merged_mods: dict[str, set[str]] = defaultdict(set)

    def write_file(src: Path, dst: Path) -> None:
        infos, meta = ck.headers[src]
        order = sorted(infos.values(), key=lambda i: i.begin)
        def odt(d: str) -> str:  # noqa: E306
            return out_dtype if out_dtype and d in ("F16", "BF16", "F32") else d
        meta = dict(meta)
        meta["hw_merge"] = merged_meta
        with SafeReader(src) as r, SafeWriter(dst, [(i.name, odt(i.dtype), i.shape) for i in order], meta) as w:
            for i in order:
                t = r.get(i.name)
                items = plan.get((src, i.name))
                want = torch_dtype(odt(i.dtype))
                if items:
                    m = apply_deltas(t, items, device)
                    if not torch.isfinite(m).all():
                        raise LoraError(f"merging into {i.name} produced NaN/Inf")
                    t = m.to(want).cpu()
                    for pl, _ in items:
                        merged_mods[fm.split_canonical(pl.target.canonical)[0]].add(pl.target.canonical)
                elif t.dtype != want:
                    t = t.to(torch.float32).to(want)
                w.write(i.name, t)
                del t
                done[0] += 1
                if on_tensor:
                    on_tensor(done[0], total)

    if ck.kind == "single":
        from pycore.io import atomic_path

        with atomic_path(out, overwrite=overwrite) as tmp:
            write_file(ck.files[0].path, tmp)
    else:
        from pycore.io import atomic_dir

        with atomic_dir(out, overwrite=overwrite) as tmpdir:
            for f in ck.files:
                dst = tmpdir / f.rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                write_file(f.path, dst)
            for rel in ck.other_files:
                dst = tmpdir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ck.root / rel, dst)
    rep.tensors_written = done[0]
    rep.modules_merged = {c: len(v) for c, v in sorted(merged_mods.items())}
    rep.dtype = out_dtype or "as base"
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


# --- LoRA + LoRA --------------------------------------------------------------------------------


def concat_loras(loras: Sequence[tuple[float, LoraSet]]) -> LoraSet:
    """Exact sum of weighted LoRAs: ranks concatenated, each input's scale folded into its up."""
    import torch

    groups: dict[str, list[tuple[float, LoraLayer]]] = defaultdict(list)
    for w, ls in loras:
        for k, layer in ls.layers.items():
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


@dataclass
class LoraMergeReport:
    out: str
    loras: list[dict[str, Any]]
    layers: int
    rank: str
    mode: str
    errors: dict[str, float] = field(default_factory=dict)  # per layer relative Frobenius error (SVD modes)
    max_error: float = 0.0
    mean_error: float = 0.0
    seconds: float = 0.0


def merge_loras(specs: Sequence[LoraSpec], out: str | os.PathLike[str], *, fmt: str = "kohya", layout: str = "sgm",
                rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
                dtype: str | None = None, overwrite: bool = False, trust_pickle: bool = False,
                device: str = "cpu", svd: str = "auto") -> LoraMergeReport:  # fmt: skip
    """Combine LoRAs into one: exact concat, or compressed by SVD of the exact sum (rank/energy)."""
    import torch

    from pycore.lora.extract import SvdOptions, factorize

    t0 = time.perf_counter()
    if rank is not None and energy is not None:
        raise LoraError("give --rank or --energy, not both")
    if Path(out).exists() and not overwrite:
        raise LoraError(f"{out} exists; pass --overwrite to replace it")
    loras = _load_specs(specs, trust_pickle)
    cat = concat_loras([(s.weight, ls) for s, ls in loras])
    rep = LoraMergeReport(str(out), [{"path": str(s.path), "weight": s.weight, "layers": len(ls.layers)} for s, ls in loras], len(cat.layers), "", "concat")
    out_dt = torch_dtype(parse_dtype_option(dtype)) if dtype else torch.float32
    if rank is not None or energy is not None:
        opts = SvdOptions(rank=rank, energy=energy, max_rank=max_rank, method=svd, device=device)
        rep.mode = "svd"
        result = LoraSet(source_format="hw-svd")
        for k, layer in cat.layers.items():
            d = layer.delta(device)
            f = factorize(d, opts)
            result.layers[k] = LoraLayer(f.down.to(out_dt).cpu(), f.up.to(out_dt).cpu(), float(f.rank))
            rep.errors[k] = f.rel_error
        cat = result
        errs = list(rep.errors.values())
        rep.max_error = max(errs) if errs else 0.0
        rep.mean_error = sum(errs) / len(errs) if errs else 0.0
    else:
        cat = LoraSet({k: LoraLayer(v.down.to(out_dt), v.up.to(out_dt), v.alpha) for k, v in cat.layers.items()}, source_format="hw-concat")
    ranks = sorted({v.rank for v in cat.layers.values()})
    rep.rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    meta = {"hw_merge": json.dumps({"tool": "hw merge-lora --into-lora", "mode": rep.mode, "loras": [{"file": s.path.name, "weight": s.weight} for s, _ in loras],
                                    "rank": rep.rank, "max_rel_error": rep.max_error})}  # fmt: skip
    save_lora(cat, out, fmt, layout=layout, metadata=meta, overwrite=overwrite)
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


__all__ = ["DTYPES", "LoraSpec", "MergeReport", "concat_loras", "merge_into_checkpoint", "merge_loras", "plan_merge"]
