"""SPO's noising procedure on the shared diffusion stack (:mod:`pycore.diffusion`).

For a batch of pairs at timesteps t: VAE-encode both images, add the *same* noise at t, let the
frozen base model (SD1.5 or SDXL) predict ε with classifier-free guidance, and decode DDIM's x̂0
of each — the images the step-aware preference model scores at t.
"""

from __future__ import annotations

from typing import Any

import torch

from pycore.diffusion.load import BaseModel
from pycore.diffusion.schedule import add_noise, pred_original_sample
from pycore.diffusion.text import cfg_eps
from pycore.diffusion.vae import decode_latents, encode_images


class PairNoiser:
    """x̂0 images of both sides of a batch of pairs, noised at t with shared noise, from a frozen base model."""

    def __init__(self, base: BaseModel, *, resolution: int, cfg_scale: float):
        self.base = base
        self.cfg_scale = cfg_scale
        # no cache: pairs tables have up to millions of prompts (SDXL: ~0.6 MB of embeddings each)
        self.encoder = base.prompt_encoder(resolution, cache=False)
        self.alphas_cumprod = base.schedule.alphas_cumprod()
        self.num_train_timesteps = base.schedule.num_train_timesteps

    @torch.no_grad()
    def __call__(self, pixels_0: torch.Tensor, pixels_1: torch.Tensor, prompts: list[str], timesteps: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Two image batches in [-1, 1]: the decoded x̂0 of image 0 and of image 1 of every pair."""
        n = len(prompts)
        device = self.base.device
        lat = encode_images(self.base.vae, torch.cat([pixels_0, pixels_1]), generator)
        noise = torch.randn(lat[:n].shape, generator=generator, device=lat.device, dtype=lat.dtype)
        t2 = torch.cat([timesteps, timesteps]).to(device)
        x_t = add_noise(lat, torch.cat([noise, noise]), t2, self.alphas_cumprod)
        cond = self.encoder(prompts, device=device).select(list(range(n)) * 2)
        eps = cfg_eps(self.base.unet, x_t, t2, cond, self.cfg_scale)
        x0 = pred_original_sample(eps, x_t, t2, self.alphas_cumprod, self.base.prediction_type)
        images = decode_latents(self.base.vae, x0)
        return images[:n], images[n:]


def load_noiser(name: str, *, model_type: str, vae: str | None, resolution: int | None, cfg_scale: float, dtype: Any,
                device: Any) -> tuple[PairNoiser, BaseModel, int]:  # fmt: skip
    """Load the frozen base model (``model_type`` auto, sd15 or sdxl) and its noiser; also the resolution used."""
    from pycore.diffusion.load import load_base

    base = load_base(name, vae=vae, family=None if model_type == "auto" else model_type, dtype=dtype, device=device,
                     strict_schedule=False)  # fmt: skip
    res = resolution or (1024 if base.family == "sdxl" else 512)
    return PairNoiser(base, resolution=res, cfg_scale=cfg_scale), base, res
