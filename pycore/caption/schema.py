"""The structured caption (HelloWorld 7.0's form), its JSON schema and the caption string.

A caption is ``{summary, elements, inspired_by, quality}``; the text a trainer sees is assembled
in HelloWorld order: ``summary, element, element, …, inspired by X, quality word``. With kohya's
``keep_tokens_separator`` ("|||") the summary (and any trigger-word prefix) is the fixed head,
the element tags are the shuffled middle and "inspired by …, quality" the fixed tail:
``prefix, summary ||| tag, tag, tag ||| inspired by X, quality`` (sd-scripts keeps text before the
first and after the second separator in place and shuffles only between them).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The five quality words, worst to best.
QUALITY_WORDS: tuple[str, ...] = ("worst quality", "low quality", "average quality", "best quality", "masterpiece")
Quality = Literal["worst quality", "low quality", "average quality", "best quality", "masterpiece"]

#: kohya sd-scripts' keep_tokens_separator.
KEEP_SEP = "|||"
#: CLIP's context is 77 tokens: start + 75 usable + end.
CLIP_MAX_TOKENS = 75

_SPACE = re.compile(r"\s+")


def _clean(text: str) -> str:
    """One line, single spaces, no separator characters that would break a caption."""
    text = _SPACE.sub(" ", text.replace(KEEP_SEP, " ")).strip()
    return text.strip(" ,;")


class Caption(BaseModel):
    """One image's structured caption (what the model must return, validated)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    summary: str = Field(min_length=1, max_length=2000, description="One sentence describing the image.")
    elements: list[str] = Field(max_length=64, description="Short element tags: style, composition, colour, subject details.")
    inspired_by: str | None = Field(default=..., max_length=300, description="An artist, photographer or movement the image recalls, or null.")
    quality: Quality = Field(description="The aesthetic quality, one of the five words.")

    @field_validator("summary")
    @classmethod
    def _summary(cls, v: str) -> str:
        v = _clean(v).rstrip(".").strip()
        if not v:
            raise ValueError("summary is empty")
        return v

    @field_validator("elements")
    @classmethod
    def _elements(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        for e in v:
            e = _clean(e)
            if e and e.lower() not in seen:
                seen.add(e.lower())
                out.append(e)
        return out

    @field_validator("inspired_by")
    @classmethod
    def _inspired(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = _clean(v)
        v = re.sub(r"^inspired by\s+", "", v, flags=re.IGNORECASE).strip()
        return v or None


def openai_json_schema() -> dict[str, Any]:
    """The strict JSON schema sent as response_format (every field required, no extras)."""
    return {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "description": "One sentence describing the whole image: subject, medium, setting."},
            "elements": {
                "type": "array",
                "items": {"type": "string"},
                "description": "4 to 10 short tags: style, technique, composition, colour palette, lighting, subject details.",
            },
            "inspired_by": {
                "type": ["string", "null"],
                "description": "An artist, photographer or art movement the image is reminiscent of (without the words 'inspired by'), or null.",
            },
            "quality": {"type": "string", "enum": list(QUALITY_WORDS), "description": "Aesthetic quality of the image."},
        },
        "required": ["summary", "elements", "inspired_by", "quality"],
        "additionalProperties": False,
    }


def response_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "caption", "schema": openai_json_schema(), "strict": True}}


def caption_parts(c: Caption | dict[str, Any], prefix: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, shuffled elements, fixed tail) of a caption in HelloWorld order."""
    d = c.model_dump() if isinstance(c, Caption) else c
    head = [p for p in (_clean(prefix) if prefix else "", d["summary"]) if p]
    tail = []
    if d.get("inspired_by"):
        tail.append(f"inspired by {d['inspired_by']}")
    if d.get("quality"):
        tail.append(d["quality"])
    return head, list(d.get("elements") or []), tail


def assemble(c: Caption | dict[str, Any], *, prefix: str | None = None, keep_tokens: bool = False) -> str:
    """The caption string: ``prefix, summary, tags…, inspired by X, quality``.

    With ``keep_tokens`` the groups are joined with " ||| " (kohya's keep_tokens_separator), so
    the head and the tail stay fixed while the element tags are shuffled.
    """
    head, mid, tail = caption_parts(c, prefix)
    if not keep_tokens:
        return ", ".join(head + mid + tail)
    groups = [", ".join(head), ", ".join(mid), ", ".join(tail)]
    return f" {KEEP_SEP} ".join(groups)


def training_text(caption: str) -> str:
    """What the trainer feeds the text encoder: separators removed (kohya joins the parts with ', ')."""
    parts = [p.strip() for p in caption.split(KEEP_SEP)]
    return ", ".join(p for p in parts if p)


class ClipBPE:
    """CLIP's byte-level BPE (open_clip's SimpleTokenizer, 'lower' cleaning), for counting tokens.

    A faithful port of the encoder that reads the vocabulary open_clip ships
    (``open_clip/bpe_simple_vocab_16e6.txt.gz``) without importing open_clip, which would pull in
    torch (seconds of start-up). tests/test_caption_schema.py checks it against open_clip's own
    tokenizer.
    """

    def __init__(self, bpe_path: str):
        import gzip

        import regex

        from pycore.bpe import bytes_to_unicode

        self.byte_encoder = bytes_to_unicode()
        with gzip.open(bpe_path) as f:
            merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        self.bpe_ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        special = "<start_of_text>|<end_of_text>"
        self.pat = regex.compile(special + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
        self.cache: dict[str, int] = {"<start_of_text>": 1, "<end_of_text>": 1}

    def _bpe_len(self, token: str) -> int:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self.cache[token] = len(word)
        return len(word)

    @staticmethod
    def clean(text: str) -> str:
        import html

        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).strip().lower()

    def count(self, text: str) -> int:
        total = 0
        for tok in self.pat.findall(self.clean(text)):
            total += self._bpe_len("".join(self.byte_encoder[b] for b in tok.encode("utf-8")))
        return total


def _bpe_vocab_path() -> str:
    import importlib.util
    import os

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        from pycore.errors import HwError

        raise HwError("counting CLIP tokens needs open_clip: pip install 'hw[caption]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=1)
def _tokenizer() -> ClipBPE:
    return ClipBPE(_bpe_vocab_path())


def clip_token_count(text: str) -> int:
    """CLIP BPE tokens of the caption as trained (without start/end tokens; CLIP allows 75)."""
    return _tokenizer().count(training_text(text))
