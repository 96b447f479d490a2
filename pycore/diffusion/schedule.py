"""The noise schedule and DDIM math: forward noising, x̂0, timesteps, one stochastic step and its log-probability.

Matches diffusers' DDIMScheduler (``timestep_spacing="leading"``, ``steps_offset=1``,
``set_alpha_to_one=False``, ε-prediction) and the per-step log-probability used by SPO (and
DDPO/D3PO): log N(x_prev | μ_θ(x_t), σ_t²), reduced over all non-batch dimensions (mean, as the
official code; ``sum`` available). Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pycore.errors import HwError


@dataclass(frozen=True)
class NoiseSchedule:
    """SD1.5/SDXL training schedule: scaled-linear betas 0.00085 → 0.012 over 1000 steps."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError("need 0 < beta_start < beta_end < 1")

    def alphas_cumprod(self) -> torch.Tensor:
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps, dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def leading_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """DDIM "leading" spacing: 20 steps over 1000 give 951, 901, …, 51, 1."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}")
    ratio = num_train_timesteps // num_inference_steps
    return [i * ratio + steps_offset for i in reversed(range(num_inference_steps))]


@dataclass
class DDIMStep:
    """One DDIM transition x_t → x_{t-1}: its mean, standard deviation and x̂0."""

    mean: torch.Tensor
    std: torch.Tensor
    pred_original_sample: torch.Tensor


def ddim_step(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    step_ratio: int,
    eta: float = 1.0,
) -> DDIMStep:
    """Mean and std of p(x_{t-1} | x_t) for DDIM with ``eta`` (1.0 = DDPM-like noise).

    ``t`` may be an int or a per-sample LongTensor. The previous timestep is ``t - step_ratio``;
    below zero it uses ``alphas_cumprod[0]`` (set_alpha_to_one=False).
    """
    ac = alphas_cumprod.to(device=x_t.device, dtype=torch.float32)
    t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    prev = t - step_ratio
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a_t = ac[t].view(shape)
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], ac[0]).view(shape)
    eps32, x32 = eps.float(), x_t.float()
    x0 = (x32 - (1 - a_t).sqrt() * eps32) / a_t.sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps32
    mean = a_prev.sqrt() * x0 + direction
    return DDIMStep(mean=mean, std=std, pred_original_sample=x0)


def sample_prev(step: DDIMStep, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw x_{t-1} = mean + std · z."""
    z = torch.randn(step.mean.shape, generator=generator, device=step.mean.device, dtype=step.mean.dtype)
    return step.mean + step.std * z


def log_prob(x_prev: torch.Tensor, step: DDIMStep, reduction: str = "mean") -> torch.Tensor:
    """log N(x_prev | mean, std²) per sample, reduced over non-batch dims ("mean" or "sum")."""
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum'")
    std = step.std
    lp = -((x_prev.detach().float() - step.mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    dims = tuple(range(1, lp.ndim))
    return lp.mean(dim=dims) if reduction == "mean" else lp.sum(dim=dims)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward noising x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for per-sample timesteps (fp32 math, latents' dtype)."""
    a = alphas_cumprod.to(latents.device)[timesteps.to(latents.device)].float().view(-1, *([1] * (latents.ndim - 1)))
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def pred_original_sample(model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                         prediction_type: str = "epsilon") -> torch.Tensor:  # fmt: skip
    """DDIM's x̂0 for per-sample timesteps (fp32), for ε-, v- or sample-prediction models."""
    a = alphas_cumprod.to(sample.device)[timesteps.to(sample.device)].float().view(-1, *([1] * (sample.ndim - 1)))
    x, m = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * m) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * m
    if prediction_type == "sample":
        return m
    raise HwError(f"unsupported prediction type {prediction_type!r}")
