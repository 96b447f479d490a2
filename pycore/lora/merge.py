"""Merge LoRAs of any family into an SDXL or SD1.5 checkpoint, streaming tensor by tensor.

Math is fp32: W' = W + Σ_i w_i·ΔW_i, every ΔW_i computed against the *base* weight (so DoRA and
IA3 files merge exactly and the order of the files does not matter), cast once to the output
dtype and checked finite after the cast. The checkpoint is read and written one tensor at a time
(pycore.lora.io), so peak memory stays near the largest tensor plus the LoRA files.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycore.errors import HwWarning, first_line
from pycore.lora import formats as fm
from pycore.lora.checkpoint import Checkpoint, Placement, open_checkpoint
from pycore.lora.convert import load_lora
from pycore.lora.io import LoraError, SafeReader, SafeWriter, torch_dtype
from pycore.lora.layers import LoraSet
from pycore.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    import torch

BASE_LABEL = {"sdxl": "SDXL", "sd15": "SD1.5", "other": "non-SDXL/SD1.5", "unknown": "unknown-family"}
ST_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass
class LoraSpec:
    """A LoRA path with its strength, parsed from 'PATH[:WEIGHT]'."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        head, sep, tail = str(text).rpartition(":")
        if sep and head and not Path(text).exists():
            try:
                return cls(Path(head), float(tail))
            except ValueError:
                pass
        return cls(Path(text), 1.0)

    def __post_init__(self) -> None:
        from pycore.checks import check_float
        from pycore.limits import MAX_LORA_STRENGTH

        self.path = Path(self.path)
        self.weight = check_float(f"the weight of {self.path.name}", self.weight, -MAX_LORA_STRENGTH, MAX_LORA_STRENGTH)


def out_dtype_code(dtype: str | None) -> str | None:
    """--dtype (fp16, bf16, fp32, float16, …) as a safetensors dtype code, or None to keep."""
    from pycore.checks import dtype_name

    return ST_DTYPE[dtype_name(dtype)] if dtype else None


@dataclass
class MergeRequest:
    """``hw merge-lora BASE LORA[:W] … --out OUT``: what to merge and where (validated on creation)."""

    base: Path
    loras: list[LoraSpec]
    out: Path
    dtype: str | None = None  # output dtype (fp16, bf16, fp32); None keeps the base's
    allow_unused: bool = False
    overwrite: bool = False
    trust_pickle: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        from pycore.checks import check_output, parse_device

        self.base, self.out = Path(self.base), Path(self.out)
        self.loras = [s if isinstance(s, LoraSpec) else LoraSpec.parse(str(s)) for s in self.loras]
        if not self.loras:
            raise LoraError("give at least one LoRA to merge")
        if not self.base.exists():
            raise LoraError(f"{self.base} does not exist")
        out_dtype_code(self.dtype)
        self.device = parse_device(self.device)
        if self.base.is_file() and self.out.suffix != ".safetensors":
            raise LoraError(f"--out must be a .safetensors file for a single-file base, not {self.out.name}")
        check_output(self.out, inputs=[self.base, *(s.path for s in self.loras)], overwrite=self.overwrite, folder=self.base.is_dir())


@dataclass
class MergeReport:
    out: str
    base: str
    loras: list[dict[str, Any]]
    base_family: str = "unknown"
    tensors_written: int = 0
    modules_merged: dict[str, int] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    dtype: str = ""
    seconds: float = 0.0


def load_specs(specs: Sequence[LoraSpec], trust_pickle: bool) -> list[tuple[LoraSpec, LoraSet]]:
    if not specs:
        raise LoraError("give at least one LoRA")
    return [(s, load_lora(s.path, trust_pickle=trust_pickle)) for s in specs]


def check_same_family(loras: Sequence[tuple[LoraSpec, LoraSet]], base_family: str = "unknown", base_name: str = "") -> str:
    """Refuse LoRAs of different model families (SD1.5 vs SDXL), or of another family than the base."""
    known = [(s.path.name, ls) for s, ls in loras if ls.base != "unknown"]
    if base_family != "unknown":
        for name, ls in known:
            if ls.base != base_family:
                raise LoraError(f"{name} is an {BASE_LABEL[ls.base]} LoRA ({ls.base_evidence}) but {base_name} is an {BASE_LABEL[base_family]} checkpoint; "
                                "a LoRA only applies to the model family it was trained for")  # fmt: skip
        return base_family
    fams = {ls.base for _, ls in known}
    if len(fams) > 1:
        desc = ", ".join(f"{n} is {BASE_LABEL[ls.base]} ({ls.base_evidence})" for n, ls in known)
        raise LoraError(f"the LoRAs are for different model families: {desc}; they cannot be mixed")
    return fams.pop() if fams else "unknown"


Item = tuple[Placement, Any, float]  # (where, adapter, strength)


def plan_merge(ck: Checkpoint, loras: Sequence[tuple[LoraSpec, LoraSet]]) -> tuple[dict[tuple[Path, str], list[Item]], list[str]]:
    """Place every adapter on checkpoint tensors and check it fits. Returns (plan, unplaced)."""
    import torch

    idx = ck.index()
    plan: dict[tuple[Path, str], list[Item]] = defaultdict(list)
    unplaced: list[str] = []
    for spec, lora in loras:
        for target, ad in lora.layers.items():
            places = idx.get(target)
            if not places:
                unplaced.append(f"{target} ({spec.path.name})")
                continue
            for pl in places:
                try:
                    ad.delta_for(torch.empty(pl.shape, device="meta"), pl.shape, "meta")
                except (LoraError, RuntimeError) as e:
                    where = pl.file.rel or pl.file.path.name
                    msg = first_line(e)
                    if hasattr(ad, "delta_shape"):
                        msg = f"LoRA delta {list(ad.delta_shape)} vs weight {list(pl.shape)}"
                    raise LoraError(f"shape mismatch in {spec.path.name}: {target}: {msg} in {where}") from None
                plan[(pl.file.path, pl.key)].append((pl, ad, spec.weight))
    return dict(plan), unplaced


def apply_adapters(w: torch.Tensor, items: Sequence[Item], device: str = "cpu") -> torch.Tensor:
    """fp32 w plus Σ strength·ΔW, each ΔW computed against the original w (in place on the fp32
    copy; the original is kept aside only when a family needs it: DoRA, IA3, set_weight)."""
    import torch

    w = w.to(device=device, dtype=torch.float32)
    ref = w.clone() if any(ad.needs_base for _, ad, _ in items) else w
    for pl, ad, strength in items:
        tg = pl.target
        view, rview = w, ref
        if tg.rows is not None:
            i, n = tg.rows
            h = w.shape[0] // n
            view, rview = w[i * h : (i + 1) * h], ref[i * h : (i + 1) * h]
        if tg.transpose:
            view, rview = view.T, rview.T
        d = ad.delta_for(rview.reshape(pl.shape) if ad.needs_base else None, pl.shape, device)
        view.add_(d.reshape(view.shape), alpha=strength)
        del d
    return w


def merge_into_checkpoint(base: str | Path, specs: Sequence[LoraSpec], out: str | Path, *, dtype: str | None = None, allow_unused: bool = False,
                          overwrite: bool = False, trust_pickle: bool = False, device: str = "cpu",
                          on_tensor: Callable[[int, int], None] | None = None, warn: Callable[[str], None] | None = None) -> MergeReport:  # fmt: skip
    """Keyword form of :func:`merge_checkpoint` (``warn`` receives the warnings' text)."""
    req = MergeRequest(Path(base), list(specs), Path(out), dtype, allow_unused, overwrite, trust_pickle, device)
    prog = _CallbackProgress(on_tensor) if on_tensor else NO_PROGRESS
    with warnings.catch_warnings(record=warn is not None) as caught:
        if warn is not None:
            warnings.simplefilter("always", HwWarning)
        rep = merge_checkpoint(req, prog)
    for w in caught or []:
        if warn is not None and issubclass(w.category, HwWarning):
            warn(str(w.message))
    return rep


class _CallbackProgress:
    def __init__(self, fn: Callable[[int, int], None]) -> None:
        self.fn, self.total, self.done = fn, 0, 0

    def stage(self, name: str, total: int | None = None, unit: str = "items") -> None:
        self.total, self.done = total or 0, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.fn(self.done, self.total)


def merge_checkpoint(req: MergeRequest, progress: Progress = NO_PROGRESS) -> MergeReport:
    """Stream BASE tensor by tensor into OUT (same layout), adding every LoRA's weighted ΔW."""
    t0 = time.perf_counter()
    ck = open_checkpoint(req.base, trust_pickle=req.trust_pickle)
    loras = load_specs(req.loras, req.trust_pickle)
    fam = check_same_family(loras, ck.base, req.base.name)
    plan, unplaced = plan_merge(ck, loras)
    if unplaced:
        msg = f"{len(unplaced)} LoRA module(s) have no weight in {req.base.name}: {', '.join(unplaced[:5])}{' …' if len(unplaced) > 5 else ''}"
        if not req.allow_unused:
            raise LoraError(msg + " (pass --allow-unused to merge the rest)")
        warnings.warn(msg, HwWarning, stacklevel=2)
    for s, ls in loras:
        for note in ls.notes:
            warnings.warn(f"{s.path.name}: {note}", HwWarning, stacklevel=2)
    out_dtype = out_dtype_code(req.dtype)
    rep = MergeReport(str(req.out), str(req.base), [_lora_row(s, ls) for s, ls in loras], base_family=fam, unused=unplaced)
    meta = json.dumps({"tool": "hw merge-lora", "base": req.base.name, "dtype": out_dtype or "base", "unused": len(unplaced),
                       "loras": [{"file": s.path.name, "weight": s.weight, "layers": len(ls.layers)} for s, ls in loras]})  # fmt: skip
    progress.stage("merging", sum(len(ck.headers[f.path][0]) for f in ck.files), "tensors")
    merged: dict[str, set[str]] = defaultdict(set)
    stream = _Streamer(ck, plan, out_dtype, req.device, meta, progress, merged)
    if ck.kind == "single":
        from pycore.io import atomic_path

        with atomic_path(req.out, overwrite=req.overwrite) as tmp:
            stream.write_file(ck.files[0].path, tmp)
    else:
        from pycore.io import atomic_dir

        with atomic_dir(req.out, overwrite=req.overwrite) as tmpdir:
            for f in ck.files:
                (tmpdir / f.rel).parent.mkdir(parents=True, exist_ok=True)
                stream.write_file(f.path, tmpdir / f.rel)
            for rel in ck.other_files:
                (tmpdir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ck.root / rel, tmpdir / rel)
    rep.tensors_written = stream.done
    rep.modules_merged = {c: len(v) for c, v in sorted(merged.items())}
    rep.dtype = out_dtype or "as base"
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


def _lora_row(s: LoraSpec, ls: LoraSet) -> dict[str, Any]:
    return {"path": str(s.path), "weight": s.weight, "format": ls.source_format, "layers": len(ls.layers),
            "families": ls.family_counts(), "base": ls.base, "notes": ls.notes}  # fmt: skip


class _Streamer:
    """Copies one checkpoint file tensor by tensor, merging the planned adapters on the way."""

    def __init__(self, ck: Checkpoint, plan: dict[tuple[Path, str], list[Item]], out_dtype: str | None, device: str,
                 meta: str, progress: Progress, merged: dict[str, set[str]]) -> None:  # fmt: skip
        self.ck, self.plan, self.out_dtype, self.device = ck, plan, out_dtype, device
        self.meta, self.progress, self.merged, self.done = meta, progress, merged, 0

    def odt(self, d: str) -> str:
        return self.out_dtype if self.out_dtype and d in ("F16", "BF16", "F32") else d

    def write_file(self, src: Path, dst: Path) -> None:
        import torch

        infos, meta = self.ck.headers[src]
        order = sorted(infos.values(), key=lambda i: i.begin)
        meta = {**meta, "hw_merge": self.meta}
        with SafeReader(src) as r, SafeWriter(dst, [(i.name, self.odt(i.dtype), i.shape) for i in order], meta) as w:
            for i in order:
                t = r.get(i.name)
                items = self.plan.get((src, i.name))
                want = torch_dtype(self.odt(i.dtype))
                if items:
                    t = apply_adapters(t, items, self.device).to(want).cpu()
                    check_finite_after_cast(t, i.name, self.odt(i.dtype))
                    for pl, _, _ in items:
                        self.merged[fm.split_canonical(pl.target.canonical)[0]].add(pl.target.canonical.removesuffix("@bias"))
                elif t.dtype != want:
                    t = t.to(torch.float32).to(want)
                w.write(i.name, t)
                del t
                self.done += 1
                self.progress.advance(1)


def check_finite_after_cast(t: torch.Tensor, name: str, dtype: str) -> None:
    """The merged tensor as it will be written: NaN/Inf (e.g. beyond fp16's ±65504) is an error."""
    import torch

    if not bool(torch.isfinite(t).all()):
        raise LoraError(f"merging into {name} gives NaN/Inf once stored as {dtype} (a LoRA weight too large, or NaN in the LoRA); nothing was written")
