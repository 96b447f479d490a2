"""Tiny HF CLIP models: a plain CLIP folder (PickScore's stand-in) and a step-aware preference model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.kit.tokenizer import write_tiny_clip_tokenizer


def tiny_clip_config(vocab_size: int = 600, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                     hidden: int = 32, layers: int = 2, image_size: int = 224, patch_size: int = 32):  # fmt: skip
    """A CLIPConfig small enough for CPU tests (same layout as ViT-H/14, a few hundred k params)."""
    from transformers import CLIPConfig

    text: dict[str, Any] = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=2, vocab_size=vocab_size, max_position_embeddings=77,
                                hidden_act="gelu")  # fmt: skip
    if bos_token_id is not None:
        text.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, hidden_act="gelu")  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden // 2)


def tiny_spm_config(tokenizer, **kw: Any) -> Any:
    """A tiny CLIPConfig whose special-token ids match ``tokenizer`` (see write_tiny_clip_tokenizer)."""
    return tiny_clip_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)


def tiny_spm(tokenizer, *, seed: int = 0, **config: Any):
    """A tiny random step-aware preference model at identity time conditioning (in memory)."""
    from pycore.spm.model import StepAwarePreferenceModel

    return StepAwarePreferenceModel.from_config(tiny_spm_config(tokenizer, **config), tokenizer, seed=seed)


def save_tiny_spm(folder: str | os.PathLike[str], *, seed: int = 0) -> Any:
    """A tiny random SPM saved as an `hw spm-train` folder (loads with --model/--spm FOLDER); returns it."""
    tok = write_tiny_clip_tokenizer(folder)
    spm = tiny_spm(tok, seed=seed)
    spm.save_pretrained(folder, overwrite=True)
    return spm


def save_tiny_clip(folder: str | os.PathLike[str], *, seed: int = 2, tokenizer: Any = None) -> Path:
    """A tiny plain CLIP in HF format (config.json, weights, tokenizer files) — as PickScore_v1 on disk."""
    import torch
    from transformers import CLIPModel

    folder = Path(folder)
    tok = tokenizer if tokenizer is not None else write_tiny_clip_tokenizer(folder)
    torch.manual_seed(seed)
    CLIPModel(tiny_spm_config(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
