"""Latents ↔ images through a diffusers AutoencoderKL (its scaling and shift factors applied)."""

from __future__ import annotations

from typing import Any

import torch


def _factors(vae: Any) -> tuple[float, float]:
    cfg = vae.config
    return float(getattr(cfg, "scaling_factor", 1.0) or 1.0), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_images(vae: Any, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] ([B, 3, H, W]) → scaled latents, sampled from the VAE's posterior (vae dtype)."""
    scale, shift = _factors(vae)
    vp = next(vae.parameters())
    lat = vae.encode(pixels.to(vp.device, vp.dtype)).latent_dist.sample(generator=generator)
    return (lat - shift) * scale


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Scaled latents → images in [-1, 1] (vae dtype), decoded in chunks of ``batch_size``."""
    scale, shift = _factors(vae)
    vp = next(vae.parameters())
    z = latents.to(device=vp.device, dtype=vp.dtype) / scale + shift
    step = batch_size or z.shape[0]
    outs = [vae.decode(z[i : i + step], return_dict=False)[0] for i in range(0, z.shape[0], step)]
    return torch.cat(outs)
