"""SDXL checkpoints as seen by the LoRA tools: a single .safetensors (SGM names) or a diffusers folder.

Only headers are read here; tensors are streamed by merge/extract one at a time.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pycore.lora import formats as fm
from pycore.lora.io import PICKLE_SUFFIXES, LoraError, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

#: modules kohya targets: Linear/Conv layers inside Transformer2DModel (attention blocks) and the
#: CLIP encoder layers' attention and MLP projections; "conv" adds the ResnetBlock2D / Downsample2D /
#: Upsample2D layers that kohya's conv_dim (LoCon) targets.
TE_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def target_kind(canonical: str, ndim: int) -> str | None:
    """'attn' | 'conv' | 'te' for layers a LoRA normally targets, else None."""
    comp, path = fm.split_canonical(canonical)
    if ndim < 2:
        return None
    if comp == "unet":
        parts = path.split(".")
        if "attentions" in parts[:4]:
            return "attn"
        if any(p in ("resnets", "downsamplers", "upsamplers") for p in parts[:4]):
            return "conv"
        return None
    if path.startswith("text_model.encoder.layers.") and path.endswith(TE_LEAVES):
        return "te"
    return None


@dataclass(frozen=True)
class CkptFile:
    path: Path
    rel: str  # path relative to the checkpoint root ('' for a single file)
    component: str  # 'sgm' or a diffusers component name


@dataclass(frozen=True)
class Placement:
    file: CkptFile
    key: str
    target: fm.Target
    info: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the module's weight (the slice, untransposed)."""
        s = self.info.shape
        if self.target.rows is not None:
            s = (s[0] // self.target.rows[1], *s[1:])
        if self.target.transpose:
            s = tuple(reversed(s))
        return s


@dataclass
class Checkpoint:
    root: Path
    kind: str  # 'single' | 'diffusers'
    files: list[CkptFile]
    other_files: list[str] = field(default_factory=list)  # relative paths copied as they are
    headers: dict[Path, tuple[dict[str, TensorInfo], dict[str, str]]] = field(default_factory=dict)
    base: str = "unknown"  # 'sdxl' | 'sd15' | 'other' | 'unknown' (see checkpoint_base)

    def index(self) -> dict[str, list[Placement]]:
        """canonical module -> every place its weight lives (several for fp16/fp32 variants)."""
        idx: dict[str, list[Placement]] = defaultdict(list)
        for f in self.files:
            infos, _ = self.headers[f.path]
            for key, info in infos.items():
                tg = fm.sgm_targets(key) if f.component == "sgm" else fm.component_targets(f.component, key)
                for t in tg:
                    idx[t.canonical].append(Placement(f, key, t, info))
        return dict(idx)


def checkpoint_base(ck: Checkpoint) -> str:
    """Which model family a checkpoint is: SDXL (two text encoders or the SDXL size embedding),
    SD1.5 (one CLIP-L text encoder), 'other' (e.g. SD2's OpenCLIP-H) or 'unknown'."""
    keys = [k for f in ck.files for k in ck.headers[f.path][0]]
    comps = {f.component for f in ck.files}
    if "text_encoder_2" in comps or any(k.startswith((fm.SGM_TE2, fm.SGM_UNET + "label_emb.", "add_embedding.")) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "other"
    widths = {info.shape[1] for f in ck.files for k, info in ck.headers[f.path][0].items() if k.endswith("attn2.to_k.weight") and len(info.shape) == 2}
    if widths & {1024}:
        return "other"
    if "text_encoder" in comps or any(k.startswith(fm.SGM_TE_SD15) for k in keys):
        return "sd15"
    return "unknown"


def open_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise LoraError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise LoraError(f"{path}: pickled checkpoints are not streamed; convert it to .safetensors first" + ("" if trust_pickle else " (pickles can run code when loaded)"))
        f = CkptFile(path, "", "sgm")
        ck = Checkpoint(path, "single", [f])
        ck.headers[path] = read_header(path)[:2]
        keys = ck.headers[path][0]
        if not any(k.startswith((fm.SGM_UNET, fm.SGM_TE1, fm.SGM_TE2, fm.SGM_TE_SD15)) for k in keys):
            raise LoraError(f"{path}: no SDXL/SD1.5 single-file keys (model.diffusion_model.*, conditioner.embedders.*, cond_stage_model.*); is it a LoRA or a diffusers component file?")
        ck.base = checkpoint_base(ck)
        return ck
    comps = [c for c in fm.DIFFUSERS_FOLDERS if (path / c).is_dir()]
    if not comps:
        raise LoraError(f"{path}: not a diffusers folder (no unet/, text_encoder/ or text_encoder_2/)")
    ck = Checkpoint(path, "diffusers", [])
    weight_files: set[Path] = set()
    for c in comps:
        st = sorted((path / c).glob("*.safetensors"))
        if not st:
            pick = [p for p in (path / c).iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pick:
                raise LoraError(f"{path / c}: only pickled weights ({pick[0].name}); convert them to .safetensors first")
            continue
        for p in st:
            f = CkptFile(p, str(p.relative_to(path)), c)
            ck.files.append(f)
            ck.headers[p] = read_header(p)[:2]
            weight_files.add(p)
    if not ck.files:
        raise LoraError(f"{path}: no .safetensors weights in {', '.join(comps)}")
    ck.base = checkpoint_base(ck)
    for p in sorted(path.rglob("*")):
        if p.is_file() and p not in weight_files:
            ck.other_files.append(str(p.relative_to(path)))
    return ck


def sgm_entries(components: dict[str, dict[str, tuple[str, tuple[int, ...]]]]) -> list[tuple[str, str, tuple[int, ...], list[tuple[str, str, int | None, bool]]]]:
    """Plan a single-file SDXL checkpoint from diffusers component tensors (names → dtype, shape).

    Returns (sgm key, dtype, shape, sources) in order, where each source is (component, key,
    q/k/v index or None, transposed?). OpenCLIP-G's q/k/v projections fuse into in_proj.
    """
    out: dict[str, tuple[str, list[int], list[tuple[str, str, int | None, bool]]]] = {}
    for comp, tensors in components.items():
        for key, (dtype, shape) in tensors.items():
            m = fm.diffusers_to_sgm_key(comp, key)
            if m is None:
                continue
            sgm, fuse, tr = m
            shape = tuple(reversed(shape)) if tr else tuple(shape)
            if sgm in out:
                d, s, src = out[sgm]
                s[0] += shape[0]
                src.append((comp, key, fuse, tr))
            else:
                out[sgm] = (dtype, list(shape), [(comp, key, fuse, tr)])
    res = []
    for k, (d, s, src) in out.items():
        src.sort(key=lambda x: -1 if x[2] is None else x[2])
        res.append((k, d, tuple(s), src))
    return res


def save_single_file(components: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write diffusers component state dicts (unet, text_encoder, text_encoder_2) as one SGM-named file."""
    import torch

    from pycore.io import atomic_path
    from pycore.lora.io import SafeWriter, st_dtype

    plan = sgm_entries({c: {k: (st_dtype(v.dtype), tuple(v.shape)) for k, v in sd.items()} for c, sd in components.items()})
    with atomic_path(path, overwrite=overwrite) as tmp, SafeWriter(tmp, [(k, d, s) for k, d, s, _ in plan], {"format": "pt"}) as w:
        for k, _, _, src in plan:
            parts = [components[c][key].T if tr else components[c][key] for c, key, _, tr in src]
            w.write(k, torch.cat(parts, 0).contiguous() if len(parts) > 1 else parts[0].contiguous())
