"""Tiny open_clip towers from configs in code, saved so `local-dir:FOLDER` loads them like a hub model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EMBED = 32

#: A tiny open_clip CLIP (ViT, 32² images, one layer per tower; the real CLIP tokenizer's vocabulary).
CLIP_CFG: dict[str, Any] = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

#: A tiny open_clip CoCa (captioner); ``custom_text`` is for open_clip_config.json, not the constructor.
COCA_CFG: dict[str, Any] = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "attn_pooler_heads": 2},
    "custom_text": True,
}  # fmt: skip

#: The smallest CLIP for image embeddings only (hw dedup --method clip): 16-d, an 8-token text tower.
EMBED_ONLY_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def build(cfg: dict[str, Any], seed: int | None = 0) -> Any:
    """An open_clip CLIP or CoCa (a config with ``multimodal_cfg``) from ``cfg``; seeded unless ``seed`` is None."""
    import open_clip
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    return open_clip.CoCa(**kwargs) if "multimodal_cfg" in cfg else open_clip.CLIP(**kwargs)


def embed_only_clip(seed: int = 0) -> tuple[Any, Any]:
    """(model, preprocess) of :data:`EMBED_ONLY_CFG` — what ``load_clip`` returns for a real model."""
    import open_clip

    return build(EMBED_ONLY_CFG, seed), open_clip.image_transform(32, is_train=False)


def save_local_dir(folder: Path, model: Any, cfg: dict[str, Any]) -> str:
    """Write open_clip_model.safetensors + open_clip_config.json; returns the ``local-dir:`` name."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"
