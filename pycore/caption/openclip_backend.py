"""Offline captions with open_clip: CoCa summary, CLIP zero-shot tags and "inspired by", aesthetic score.

* summary — a CoCa model (default ``coca_ViT-L-14`` / ``mscoco_finetuned_laion2b_s13b_b90k``)
  decodes a short caption. Decoding is greedy with a repetition penalty, written here:
  open_clip's ``CoCa.generate`` depends on transformers classes that transformers 5 removed.
* elements — CLIP (default ``ViT-L-14`` / ``openai``) ranks a tag vocabulary by cosine
  similarity to the image (CLIP Interrogator's method). Vocabulary files have '# Category' lines
  and one concept per line with comma-separated variants; a concept's text embedding is the mean
  of its variants', the first variant is the tag written. The best tag of each category is taken,
  categories ordered by score, ``n_tags`` in all (filled from the remaining tags if there are
  fewer categories).
* inspired_by — the best-scoring entry of the style/artist list.
* score — the LAION improved-aesthetic-predictor MLP (768→1024→128→64→16→1) on the normalised
  CLIP image embedding, weights from a user file; without one, a zero-shot CLIP score
  (similarity to "high quality" minus "low quality" prompts), a much weaker signal. The quality
  word is assigned later from the dataset's score percentiles (pycore.caption.pipeline).

Models load by name and pretrained tag (downloaded to the open_clip/HF cache on first use), from
a weights file (``--clip-pretrained /path/model.safetensors``) or from a folder
(``local-dir:/path`` with open_clip_config.json + weights), which is how the tests load tiny
random models.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycore.errors import HwError, first_line

SOT, EOT = 49406, 49407
POSITIVE = ("a masterpiece, best quality, beautiful, highly aesthetic image", "an award-winning, stunning, professional image")
NEGATIVE = ("worst quality, low quality, ugly, blurry image", "an amateurish, poorly composed, low resolution image")


@dataclass
class Concept:
    tag: str
    category: str
    variants: list[str]


def read_vocab(paths: Sequence[str | os.PathLike[str]], *, styles: bool = False) -> list[Concept]:
    """Concepts from vocabulary files ('# Category' lines; variants comma-separated unless ``styles``)."""
    out: list[Concept] = []
    seen: set[str] = set()
    for p in paths:
        p = Path(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise HwError(f"cannot read vocabulary {p}: {e.strerror or e}") from None
        category = p.stem
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                category = line.lstrip("#").strip() or category
                continue
            variants = [line] if styles else [v.strip() for v in line.split(",") if v.strip()]
            if not variants:
                continue
            tag = variants[0] if styles else variants[0].lower()
            if tag.lower() in seen:
                continue
            seen.add(tag.lower())
            out.append(Concept(tag=tag, category=category, variants=variants))
    if not out:
        raise HwError(f"vocabulary {', '.join(str(p) for p in paths)} has no entries")
    return out


def default_tag_files() -> tuple[Path, ...]:
    from pycore.data import data_path

    return (data_path("tags", "helloworld_tags.txt"),)


def default_style_files() -> tuple[Path, ...]:
    from pycore.data import data_path

    return (data_path("tags", "styles.txt"),)


def resolve_device(device: str) -> str:
    """auto → CUDA, then MPS, then CPU; a device this machine lacks is a one-line error (pycore.checks)."""
    from pycore.checks import parse_device

    return parse_device(device)


def precision_for(device: str) -> str:
    """fp16 weights on CUDA/MPS (inference only), fp32 on CPU."""
    return "fp16" if device.startswith(("cuda", "mps")) else "fp32"


def load_open_clip(name: str, pretrained: str | None, device: str, precision: str):
    """(model, preprocess, tokenizer) by name + pretrained tag/file, or ``local-dir:``/``hf-hub:`` source."""
    import open_clip

    schema = name.split(":", 1)[0] if ":" in name else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if schema else pretrained, device=device, precision=precision
        )
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip raises RuntimeError/ValueError/OSError/HF errors alike
        hint = "" if schema == "local-dir" else " (weights download from the Hugging Face Hub on first use; offline, use local-dir:/folder or a weights file)"
        raise HwError(f"cannot load open_clip model {name}" + (f" / {pretrained}" if pretrained and not schema else "") + f": {first_line(e, 200)}{hint}") from None
    model.eval()
    return model, preprocess, tokenizer


def _file_digest(path: str | os.PathLike[str] | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _source_id(name: str, pretrained: str | None) -> dict[str, Any]:
    """Identity of a model source for the job fingerprint (local files by content digest)."""
    d: dict[str, Any] = {"name": name, "pretrained": pretrained}
    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1])
        d["files"] = {f.name: _file_digest(f) for f in sorted(folder.glob("*")) if f.is_file()} if folder.is_dir() else None
    elif pretrained and Path(pretrained).is_file():
        d["pretrained"] = _file_digest(pretrained)
    return d


# ------------------------------------------------------------------------------------------
# Aesthetic head


def aesthetic_mlp(in_dim: int):
    """LAION improved-aesthetic-predictor: Linear in→1024→128→64→16→1 (dropout between, inactive at eval)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip


def load_aesthetic(path: str | os.PathLike[str], in_dim: int, device: str):
    """The MLP from a .safetensors or .pth/.pt state dict (keys ``layers.N.*`` as LAION ships, or ``N.*``)."""
    import torch

    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
            if isinstance(sd, dict) and "state_dict" in sd:
                sd = sd["state_dict"]
    except Exception as e:
        raise HwError(f"cannot read aesthetic weights {p}: {first_line(e, 200)}") from None
    if not isinstance(sd, dict):
        raise HwError(f"aesthetic weights {p} are not a state dict")
    sd = {k.removeprefix("module.").removeprefix("layers."): v for k, v in sd.items()}
    w0 = sd.get("0.weight")
    if w0 is None:
        raise HwError(f"aesthetic weights {p} do not look like the LAION predictor (no layers.0.weight)")
    if w0.shape[1] != in_dim:
        raise HwError(f"aesthetic weights {p} expect {w0.shape[1]}-dim CLIP embeddings but --clip-model gives {in_dim} (the LAION head is for ViT-L-14)")
    mlp = aesthetic_mlp(in_dim)
    try:
        mlp.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise HwError(f"aesthetic weights {p} do not match the 1024-128-64-16-1 head: {first_line(e, 200)}") from None
    return mlp.to(device=device, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------
# Shared CLIP scoring


@dataclass
class AestheticConfig:
    """CLIP model + aesthetic head for scores (also used by `--quality-from aesthetic`)."""

    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    weights: str | os.PathLike[str] | None = None
    device: str = "auto"
    batch_size: int = 16
    max_side: int = 768

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise HwError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.weights is not None and not Path(self.weights).is_file():
            raise HwError(f"aesthetic weights {self.weights} do not exist")

    def job_options(self) -> dict[str, Any]:
        return {"backend": "aesthetic", "clip": _source_id(self.clip_model, self.clip_pretrained),
                "weights": _file_digest(self.weights), "max_side": self.max_side}  # fmt: skip


class _Clip:
    """A loaded CLIP with image encoding, text embeddings and the aesthetic score."""

    def __init__(self, name: str, pretrained: str | None, device: str, weights: str | os.PathLike[str] | None):
        import torch

        self.device = resolve_device(device)
        self.model, self.preprocess, self.tokenizer = load_open_clip(name, pretrained, self.device, precision_for(self.device))
        self.dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            dim = self.model.encode_image(torch.zeros(1, 3, *self._size(), device=self.device, dtype=self.dtype)).shape[-1]
        self.dim = dim
        self.mlp = load_aesthetic(weights, dim, self.device) if weights is not None else None
        if self.mlp is None:
            self.pos = self.text_embed(list(POSITIVE)).mean(0)
            self.neg = self.text_embed(list(NEGATIVE)).mean(0)

    def _size(self) -> tuple[int, int]:
        s = getattr(self.model.visual, "image_size", 224)
        return (s, s) if isinstance(s, int) else tuple(s)

    def text_embed(self, texts: list[str], batch: int = 256):
        import torch

        outs = []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                tok = self.tokenizer(texts[i : i + batch]).to(self.device)
                e = self.model.encode_text(tok).float()
                outs.append(e / e.norm(dim=-1, keepdim=True))
        return torch.cat(outs)

    def concept_embed(self, concepts: list[Concept], template: str = "{}"):
        import torch

        flat = [template.format(v) for c in concepts for v in c.variants]
        emb = self.text_embed(flat)
        out, i = [], 0
        for c in concepts:
            m = emb[i : i + len(c.variants)].mean(0)
            out.append(m / m.norm())
            i += len(c.variants)
        return torch.stack(out)

    def image_embed(self, batch):
        import torch

        with torch.no_grad():
            e = self.model.encode_image(batch.to(self.device, dtype=self.dtype)).float()
        return e / e.norm(dim=-1, keepdim=True)

    def score(self, emb) -> list[float]:
        import torch

        with torch.no_grad():
            if self.mlp is not None:
                s = self.mlp(emb.float()).squeeze(-1)
            else:
                s = 100.0 * (emb @ self.pos - emb @ self.neg)
        return [float(x) for x in s.cpu()]


def _load_batch(items: Sequence[tuple[str, str]], preprocess, max_side: int, extra=None):
    """Preprocessed tensors for the readable images (and for ``extra``, a second model's transform,
    from the same decoded image), the keys loaded, and (key, reason) for unreadable ones."""
    import torch

    from pycore.caption.images import ImageLoadError, load_rgb

    tensors, tensors2, ok, bad = [], [], [], []
    for key, path in items:
        try:
            im = load_rgb(path, max_side)
            tensors.append(preprocess(im))
            if extra is not None:
                tensors2.append(extra(im))
            ok.append(key)
        except ImageLoadError as e:
            bad.append((key, str(e)))
    if not tensors:
        return None, None, ok, bad
    return torch.stack(tensors), (torch.stack(tensors2) if extra is not None else None), ok, bad


class AestheticScorer:
    def __init__(self, cfg: AestheticConfig, *, job: str):
        self.cfg = cfg
        self.job = job

    def run(self, items: Sequence[tuple[str, str]], on_records: Callable[[list[dict[str, Any]]], None]) -> dict[str, Any]:
        from pycore.caption.store import failed_record, ok_record

        clip = _Clip(self.cfg.clip_model, self.cfg.clip_pretrained, self.cfg.device, self.cfg.weights)
        n_ok = n_bad = 0
        for i in range(0, len(items), self.cfg.batch_size):
            batch, _, keys, bad = _load_batch(items[i : i + self.cfg.batch_size], clip.preprocess, self.cfg.max_side)
            recs = [failed_record(k, self.job, why) for k, why in bad]
            if batch is not None:
                for k, s in zip(keys, clip.score(clip.image_embed(batch)), strict=True):
                    recs.append(ok_record(k, self.job, None, score=s if math.isfinite(s) else None))
            on_records(recs)
            n_ok += len(keys)
            n_bad += len(bad)
        return {"scored": n_ok, "unreadable": n_bad, "head": "laion-mlp" if clip.mlp is not None else "zero-shot", "device": clip.device}


# ------------------------------------------------------------------------------------------
# The captioner


@dataclass
class OpenClipConfig:
    """Options of the offline backend (see `hw caption --help`)."""

    coca_model: str = "coca_ViT-L-14"
    coca_pretrained: str | None = "mscoco_finetuned_laion2b_s13b_b90k"
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    aesthetic_weights: str | os.PathLike[str] | None = None
    tag_files: tuple[str | os.PathLike[str], ...] = ()
    style_files: tuple[str | os.PathLike[str], ...] = ()
    n_tags: int = 6
    device: str = "auto"
    batch_size: int = 16
    max_side: int = 768
    max_len: int = 30
    min_len: int = 5
    repetition_penalty: float = 1.2
    tag_paths: tuple[Path, ...] = field(init=False, default=())
    style_paths: tuple[Path, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if not 1 <= self.n_tags <= 64:
            raise HwError(f"--n-tags must be 1–64 (got {self.n_tags})")
        if self.batch_size < 1:
            raise HwError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if not self.min_len < self.max_len <= 75:
            raise HwError("summary length bounds must satisfy min < max ≤ 75 tokens")
        if self.repetition_penalty < 1.0:
            raise HwError("repetition penalty must be ≥ 1")
        if self.aesthetic_weights is not None and not Path(self.aesthetic_weights).is_file():
            raise HwError(f"aesthetic weights {self.aesthetic_weights} do not exist")
        self.tag_paths = tuple(Path(p) for p in self.tag_files) or default_tag_files()
        self.style_paths = tuple(Path(p) for p in self.style_files) or default_style_files()
        for p in self.tag_paths + self.style_paths:
            if not p.is_file():
                raise HwError(f"vocabulary file {p} does not exist")

    @property
    def model_label(self) -> str:
        return f"{self.coca_model}+{self.clip_model}"

    def job_options(self) -> dict[str, Any]:
        return {"backend": "openclip", "coca": _source_id(self.coca_model, self.coca_pretrained),
                "clip": _source_id(self.clip_model, self.clip_pretrained), "weights": _file_digest(self.aesthetic_weights),
                "tags": [_file_digest(p) for p in self.tag_paths], "styles": [_file_digest(p) for p in self.style_paths],
                "n_tags": self.n_tags, "max_side": self.max_side, "max_len": self.max_len, "min_len": self.min_len,
                "repetition_penalty": self.repetition_penalty}  # fmt: skip


def pick_tags(scores: list[float], concepts: list[Concept], n: int) -> list[str]:
    """The best concept per category (categories by score), then the best of the rest, ``n`` in all."""
    order = sorted(range(len(concepts)), key=lambda i: -scores[i])
    chosen: list[int] = []
    cats: set[str] = set()
    for i in order:
        if len(chosen) >= n:
            break
        if concepts[i].category not in cats:
            cats.add(concepts[i].category)
            chosen.append(i)
    for i in order:
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    chosen.sort(key=lambda i: -scores[i])
    return [concepts[i].tag for i in chosen]


def coca_greedy(model, images, *, max_len: int = 30, min_len: int = 5, repetition_penalty: float = 1.2):
    """Greedy CoCa decoding (token ids, start token included) with a minimum length and repetition penalty."""
    import torch

    with torch.no_grad():
        enc = model(images)  # text None → image latent and token embeddings
        latent, embs = enc["image_features"], enc["image_embs"]
        b = images.shape[0]
        out = torch.full((b, 1), SOT, dtype=torch.long, device=images.device)
        done = torch.zeros(b, dtype=torch.bool, device=images.device)
        for step in range(max_len):
            logits = model(images, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1].float()
            prev = torch.gather(logits, 1, out)
            logits.scatter_(1, out, torch.where(prev < 0, prev * repetition_penalty, prev / repetition_penalty))
            logits[:, SOT] = -math.inf
            if step < min_len:
                logits[:, EOT] = -math.inf
            nxt = logits.argmax(-1)
            if step == max_len - 1:
                nxt = torch.full_like(nxt, EOT)
            nxt = torch.where(done, torch.full_like(nxt, EOT), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOT
            if bool(done.all()):
                break
    return out


def decode_summary(ids: list[int]) -> str:
    from open_clip.tokenizer import SimpleTokenizer

    global _DECODER
    if _DECODER is None:
        _DECODER = SimpleTokenizer()
    body = []
    for t in ids:
        if t == SOT:
            continue
        if t == EOT:
            break
        body.append(t)
    text = _DECODER.decode([t for t in body if t < len(_DECODER.decoder)])
    text = " ".join(text.split()).strip()
    return text.rstrip(" .").strip()


_DECODER = None


class OpenClipCaptioner:
    def __init__(self, cfg: OpenClipConfig, *, job: str):
        self.cfg = cfg
        self.job = job

    def run(self, items: Sequence[tuple[str, str]], on_records: Callable[[list[dict[str, Any]]], None]) -> dict[str, Any]:
        import torch

        from pycore.caption.schema import Caption
        from pycore.caption.store import failed_record, ok_record

        cfg = self.cfg
        clip = _Clip(cfg.clip_model, cfg.clip_pretrained, cfg.device, cfg.aesthetic_weights)
        coca, coca_pre, _ = load_open_clip(cfg.coca_model, cfg.coca_pretrained, clip.device, precision_for(clip.device))
        if not hasattr(coca, "text_decoder"):
            raise HwError(f"--coca-model {cfg.coca_model} is not a CoCa model (it cannot write captions)")
        coca_dtype = next(coca.parameters()).dtype
        tags = read_vocab(cfg.tag_paths)
        styles = read_vocab(cfg.style_paths, styles=True)
        tag_emb = clip.concept_embed(tags)
        style_emb = clip.concept_embed(styles, "art inspired by {}")
        label = cfg.model_label
        n_ok = n_bad = 0
        for i in range(0, len(items), cfg.batch_size):
            chunk = items[i : i + cfg.batch_size]
            batch, cbatch, keys, bad = _load_batch(chunk, clip.preprocess, cfg.max_side, extra=coca_pre)
            recs = [failed_record(k, self.job, why, model=label) for k, why in bad]
            if batch is not None:
                ids = coca_greedy(coca, cbatch.to(clip.device, dtype=coca_dtype), max_len=cfg.max_len, min_len=cfg.min_len,
                                  repetition_penalty=cfg.repetition_penalty)  # fmt: skip
                emb = clip.image_embed(batch)
                tag_s = (emb @ tag_emb.T).cpu().tolist()
                style_i = torch.argmax(emb @ style_emb.T, dim=1).cpu().tolist()
                scores = clip.score(emb)
                for j, k in enumerate(keys):
                    summary = decode_summary(ids[j].cpu().tolist())
                    if not summary:
                        recs.append(failed_record(k, self.job, "CoCa produced an empty summary", model=label))
                        continue
                    cap = Caption(summary=summary, elements=pick_tags(tag_s[j], tags, cfg.n_tags),
                                  inspired_by=styles[style_i[j]].tag, quality="average quality").model_dump()  # fmt: skip
                    cap["quality"] = None  # assigned from the dataset's score percentiles when merging
                    s = scores[j]
                    recs.append(ok_record(k, self.job, cap, score=s if math.isfinite(s) else None, model=label))
            on_records(recs)
            n_ok += sum(r["status"] == "ok" for r in recs)
            n_bad += sum(r["status"] != "ok" for r in recs)
        return {"captioned": n_ok, "failed": n_bad, "head": "laion-mlp" if clip.mlp is not None else "zero-shot", "device": clip.device}
