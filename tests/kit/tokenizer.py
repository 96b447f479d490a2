"""A character-level CLIP tokenizer written to disk: no download, and any text tokenizes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pycore.bpe import bytes_to_unicode


def write_tiny_clip_tokenizer(folder: str | os.PathLike[str]):
    """Write a character-level CLIP BPE tokenizer (vocab.json, merges.txt) to ``folder``; return it.

    Every byte maps to a token (and its end-of-word variant), so any text tokenizes; the special
    tokens come last (514 tokens: bos 512, eos 513).
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    tok.save_pretrained(folder)
    return tok
