"""One SPO optimisation step on stored transitions, with the LoRA-disabled policy as reference.

- :func:`add_spo_lora`: freeze the UNet and add the official LoRA (q, k, v, out; alpha = r;
  gaussian init, so the policy starts equal to the base model).
- :func:`adapters_disabled`: a context in which the UNet runs without its LoRA — the reference
  model of the DPO loss, with no second UNet in memory.
- :func:`transition_logprob`: log N(x_next | DDIM mean(ε_cfg(x_t)), σ_t²) per transition.
- :func:`spo_loss` / :func:`train_step`: the clamped-ratio DPO loss, backward, gradient clipping
  on the trainable parameters (a materialised list, so it really clips), optimiser step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pycore.errors import HwError, first_line
from pycore.diffusion.text import Conditioning, cfg_eps
from pycore.spo.config import SPOConfig
from pycore.diffusion.schedule import NoiseSchedule, ddim_step, log_prob
from pycore.spo.losses import NONFINITE_FIXES, NonFiniteError, spo_dpo_loss
from pycore.spo.sampler import Transitions


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def add_spo_lora(unet: Any, config: SPOConfig, *, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and add the SPO LoRA; return the trainable parameters (kept in float32)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    lcfg = LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, target_modules=list(config.lora_targets),
                      init_lora_weights="gaussian" if config.lora_init == "gaussian" else True)  # fmt: skip
    try:
        unet.add_adapter(lcfg, adapter_name=adapter_name)
    except ValueError as e:
        raise HwError(f"cannot add the LoRA to the UNet: {first_line(e)}") from e
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise HwError(f"the LoRA targets {config.lora_targets} matched no UNet module")
    for p in params:
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run ``model`` (a diffusers UNet with a PEFT adapter, or a PeftModel) without its LoRA."""
    m = _unwrap(model)
    if hasattr(m, "disable_adapter") and not hasattr(m, "disable_adapters"):  # peft PeftModel
        with m.disable_adapter():
            yield
        return
    if not hasattr(m, "disable_adapters"):
        raise HwError("the UNet has no LoRA adapter to disable for the reference model")
    m.disable_adapters()
    try:
        yield
    finally:
        m.enable_adapters()


def transition_logprob(unet: Any, x_t: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                       config: SPOConfig, alphas_cumprod: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per-transition log-probability of x_next under the DDIM step from x_t with CFG ε."""
    eps = cfg_eps(unet, x_t, t, cond, config.guidance_scale)
    st = ddim_step(eps, x_t, t, alphas_cumprod, config.step_ratio, config.eta)
    return log_prob(x_next, st, config.logprob_reduction)


@dataclass
class StepStats:
    loss: float
    implicit_acc: float
    ratio_win: float
    ratio_lose: float
    grad_norm: float | None = None


def spo_loss(unet: Any, batch: Transitions, cond: Conditioning, config: SPOConfig,
             schedule: NoiseSchedule | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The DPO loss of ``batch`` (``cond`` indexed by ``batch.prompt_idx``) and per-pair stats."""
    ac = (schedule or NoiseSchedule()).alphas_cumprod()
    x_t = torch.cat([batch.x_t_win, batch.x_t_lose])
    x_next = torch.cat([batch.x_next_win, batch.x_next_lose])
    t = torch.cat([batch.t, batch.t])
    c2 = cond.select(torch.cat([batch.prompt_idx, batch.prompt_idx]))
    with torch.no_grad(), adapters_disabled(unet):
        ref = transition_logprob(unet, x_t, x_next, t, c2, config, ac)
    pol = transition_logprob(unet, x_t, x_next, t, c2, config, ac)
    if not (torch.isfinite(pol).all() and torch.isfinite(ref).all()):
        raise NonFiniteError(f"non-finite log-probability in the SPO step: {NONFINITE_FIXES['loss']}")
    n = len(batch)
    loss, stats = spo_dpo_loss(pol[:n], ref[:n], pol[n:], ref[n:], beta=config.beta, clip=config.clip_range)
    if not torch.isfinite(loss):
        raise NonFiniteError(f"non-finite SPO loss: {NONFINITE_FIXES['loss']}")
    return loss, stats


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None, accelerator: Any = None) -> float:
    """Clip the gradient norm of ``params`` (a list, not a consumed iterator); return the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in grads])))
    if accelerator is not None:
        return float(accelerator.clip_grad_norm_(grads, max_norm))
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def train_step(unet: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], batch: Transitions,
               cond: Conditioning, config: SPOConfig, *, accelerator: Any = None,
               schedule: NoiseSchedule | None = None) -> StepStats:  # fmt: skip
    """Loss, backward, clipping and an optimiser step on one batch of transitions (no accumulation)."""
    if len(batch) == 0:
        raise ValueError("empty batch of transitions")
    loss, st = spo_loss(unet, batch, cond, config, schedule)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    norm = clip_gradients(params, config.max_grad_norm, accelerator)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite gradient norm in the SPO step: {NONFINITE_FIXES['gradient']}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=float(loss.detach()), implicit_acc=float(st["implicit_acc"].mean()),
                     ratio_win=float(st["ratio_win"].mean()), ratio_lose=float(st["ratio_lose"].mean()), grad_norm=norm)  # fmt: skip


def make_optimizer(params: list[torch.nn.Parameter], config: SPOConfig) -> torch.optim.Optimizer:
    """AdamW with the config's settings; bitsandbytes' 8-bit AdamW when asked (and installed)."""
    kw = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
              eps=config.adam_epsilon)  # fmt: skip
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as e:
            raise HwError("use_8bit_adam needs the bitsandbytes package (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)
