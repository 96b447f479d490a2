"""Prompt conditioning: SDXL (two encoders, pooled projection, add_time_ids) and SD1.5.

SDXL, as diffusers' StableDiffusionXLPipeline.encode_prompt: each prompt is tokenized by both
tokenizers (padded to 77); the penultimate hidden states of text_encoder (768) and
text_encoder_2 (1280) are concatenated (2048); the pooled embedding is text_encoder_2's
projection; add_time_ids = [h, w, 0, 0, h, w] (original size, crop top-left, target size).
The negative (unconditional) embeddings are all zeros when ``force_zeros_for_empty_prompt``
(the official SPO setting); otherwise the negative prompt is encoded.
SD1.5: the text encoder's last hidden state; the negative is the encoded empty prompt.

:func:`cfg_eps` runs the UNet with classifier-free guidance on a batch of latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pycore.errors import HwError


@dataclass
class Conditioning:
    """Per-prompt conditioning (batch N) and the matching negatives (batch N or 1)."""

    embeds: torch.Tensor
    neg_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def is_sdxl(self) -> bool:
        return self.pooled is not None

    def select(self, index: torch.Tensor | Sequence[int]) -> Conditioning:
        """The conditioning of rows ``index`` (e.g. prompt index per latent; repeats allowed)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.embeds.device)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.expand(len(self), *t.shape[1:])[idx] if t.shape[0] == 1 else t[idx]

        return Conditioning(embeds=pick(self.embeds), neg_embeds=pick(self.neg_embeds), pooled=pick(self.pooled),
                            neg_pooled=pick(self.neg_pooled), time_ids=pick(self.time_ids))  # fmt: skip

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Conditioning:
        def mv(t: torch.Tensor | None, float_: bool = True) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if float_ else None)

        return Conditioning(embeds=mv(self.embeds), neg_embeds=mv(self.neg_embeds), pooled=mv(self.pooled),
                            neg_pooled=mv(self.neg_pooled), time_ids=mv(self.time_ids))  # fmt: skip


def sdxl_time_ids(height: int, width: int, n: int = 1) -> torch.Tensor:
    """add_time_ids = [h, w, 0, 0, h, w] for each of ``n`` samples (float32)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1)


def _tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)  # fmt: skip


@torch.no_grad()
def encode_sdxl(prompts: Sequence[str], tokenizers: Sequence[Any], text_encoders: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds [N, 77, d1 + d2], pooled [N, p]) for SDXL, as diffusers does it."""
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise HwError("SDXL needs two tokenizers and two text encoders")
    hidden, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders, strict=True):
        dev = next(enc.parameters()).device
        out = enc(_tokenize(tok, prompts, dev), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_encoder_2 (CLIPTextModelWithProjection): text_embeds
    if pooled is None or pooled.ndim != 2:
        raise HwError("text_encoder_2 must be a CLIPTextModelWithProjection (pooled projection)")
    return torch.cat([h.float() for h in hidden], dim=-1), pooled.float()


@torch.no_grad()
def encode_sd15(prompts: Sequence[str], tokenizer: Any, text_encoder: Any) -> torch.Tensor:
    """SD1.5 embeddings: the text encoder's last hidden state [N, 77, 768]."""
    dev = next(text_encoder.parameters()).device
    return text_encoder(_tokenize(tokenizer, prompts, dev))[0].float()


class PromptEncoder:
    """Encodes prompts for one model family, caching each prompt's embeddings on the CPU.

    ``force_zeros_for_empty_prompt`` (SDXL): None uses the model's own setting (``default_force_zeros``,
    e.g. from the pipeline's config); the official SPO run uses zeros.
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, tokenizer_2: Any = None, text_encoder_2: Any = None, *,
                 resolution: int = 1024, force_zeros_for_empty_prompt: bool | None = None, default_force_zeros: bool = True,
                 negative_prompt: str = "", cache: bool = True):  # fmt: skip
        self.sdxl = text_encoder_2 is not None
        if self.sdxl and tokenizer_2 is None:
            raise HwError("SDXL prompt encoding needs tokenizer_2 with text_encoder_2")
        self.tokenizers = [tokenizer] + ([tokenizer_2] if self.sdxl else [])
        self.encoders = [text_encoder] + ([text_encoder_2] if self.sdxl else [])
        self.resolution = resolution
        self.force_zeros = default_force_zeros if force_zeros_for_empty_prompt is None else force_zeros_for_empty_prompt
        if not self.sdxl:
            self.force_zeros = False
        self.negative_prompt = negative_prompt
        self.use_cache = cache
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sdxl:
            return encode_sdxl(prompts, self.tokenizers, self.encoders)
        return encode_sd15(prompts, self.tokenizers[0], self.encoders[0]), None

    def _lookup(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_cache:
            return self._encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            emb, pooled = self._encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (emb[i].cpu(), None if pooled is None else pooled[i].cpu())
        emb = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts]) if self.sdxl else None  # type: ignore[misc]
        return emb, pooled

    def offload(self, device: Any = "cpu") -> None:
        """Move the text encoders to ``device`` (e.g. the CPU once every prompt is cached)."""
        for enc in self.encoders:
            enc.to(device)

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def __call__(self, prompts: Sequence[str], device: Any = None, dtype: torch.dtype | None = None) -> Conditioning:
        if not prompts:
            raise HwError("no prompts to encode")
        emb, pooled = self._lookup(prompts)
        if self.force_zeros:
            neg, neg_pooled = torch.zeros_like(emb[:1]), torch.zeros_like(pooled[:1])  # type: ignore[index]
        else:
            neg, neg_pooled = self._lookup([self.negative_prompt])
        time_ids = sdxl_time_ids(self.resolution, self.resolution, len(prompts)) if self.sdxl else None
        cond = Conditioning(embeds=emb, neg_embeds=neg, pooled=pooled, neg_pooled=neg_pooled, time_ids=time_ids)
        return cond.to(device=device if device is not None else emb.device, dtype=dtype)


def cfg_eps(unet: Any, x: torch.Tensor, t: int | torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
    """ε with classifier-free guidance: ε_u + g·(ε_c − ε_u); one UNet call on [negatives; prompts].

    ``cond`` must have one row per latent (use :meth:`Conditioning.select`). Returns float32.
    """
    n = x.shape[0]
    if len(cond) != n:
        raise ValueError(f"conditioning has {len(cond)} rows for {n} latents")
    p = next(unet.parameters())
    dtype = p.dtype if p.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    t = torch.as_tensor(t, device=x.device, dtype=torch.long)
    t = t.expand(n) if t.ndim == 0 else t
    use_cfg = guidance_scale != 1.0

    def cat(neg: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor | None:
        if pos is None:
            return None
        if not use_cfg:
            return pos
        return torch.cat([neg.expand(n, *pos.shape[1:]), pos])  # type: ignore[union-attr]

    emb = cat(cond.neg_embeds, cond.embeds)
    added = None
    if cond.is_sdxl:
        added = {"text_embeds": cat(cond.neg_pooled, cond.pooled).to(dtype), "time_ids": cat(cond.time_ids, cond.time_ids).to(dtype)}  # type: ignore[union-attr]
    xin = torch.cat([x, x]) if use_cfg else x
    tin = torch.cat([t, t]) if use_cfg else t
    out = unet(xin.to(dtype), tin, encoder_hidden_states=emb.to(dtype), added_cond_kwargs=added, return_dict=False)[0].float()  # type: ignore[union-attr]
    if not use_cfg:
        return out
    uncond, text = out.chunk(2)
    return uncond + guidance_scale * (text - uncond)
