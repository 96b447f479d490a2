"""SPO's losses and pair logic as pure functions (unit tested; no models here).

- :func:`spo_dpo_loss`: the clamped-ratio DPO loss on per-step log-probabilities.
- :func:`select_pairs`: best/worst of k candidates and the softmax-gap threshold.
- :func:`pick_continuation`: the step-wise resampler (continue from a uniformly random candidate).
- :func:`segment_steps`: which transitions share a label in the SDXL multi-step variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pycore.errors import HwError

#: What usually makes SPO values non-finite, and what fixes it (said in every NonFiniteError).
NONFINITE_FIXES = {
    "x0": "the UNet produced NaN/Inf; use --mixed-precision bf16 (or no), or a lower learning rate if it happened after training began",
    "image": "the VAE decode overflowed; SDXL's stock VAE does in float16: use --vae madebyollin/sdxl-vae-fp16-fix or --vae-dtype float32",
    "score": "the preference model overflowed; run it in float32 (--spm-dtype float32)",
    "loss": "lower the learning rate, or use --mixed-precision bf16 (or no)",
    "gradient": "lower the learning rate or --set max_grad_norm=1.0, or use --mixed-precision bf16 (or no)",
}


class NonFiniteError(HwError):
    """NaN or Inf in an SPO value (x̂0, a decoded image, a score, a log-probability, the loss, the gradients)."""


def check_finite(x: torch.Tensor, what: str, kind: str, where: str = "") -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and the likely fix for ``kind`` if ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"non-finite {what}{where} ({bad} of {x.numel()} values NaN/Inf): {NONFINITE_FIXES[kind]}")


def spo_dpo_loss(
    logp_win: torch.Tensor,
    logp_win_ref: torch.Tensor,
    logp_lose: torch.Tensor,
    logp_lose_ref: torch.Tensor,
    beta: float = 10.0,
    clip: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """−log σ(β·log r_w − β·log r_l), r = clamp(exp(logp − logp_ref), 1 − clip, 1 + clip).

    Returns the mean loss and per-pair diagnostics (ratios, implicit accuracy). Clamping the
    ratio (not the log) makes the gradient exactly zero once a ratio leaves [1 − clip, 1 + clip].
    """
    if beta <= 0:
        raise ValueError("beta must be positive")
    if not 0 < clip < 1:
        raise ValueError("clip must be in (0, 1)")
    ratio_w = torch.clamp(torch.exp(logp_win - logp_win_ref), 1 - clip, 1 + clip)
    ratio_l = torch.clamp(torch.exp(logp_lose - logp_lose_ref), 1 - clip, 1 + clip)
    margin = beta * (torch.log(ratio_w) - torch.log(ratio_l))
    loss = -F.logsigmoid(margin)
    stats = {
        "ratio_win": ratio_w.detach(),
        "ratio_lose": ratio_l.detach(),
        "implicit_acc": (margin.detach() > 0).float(),
    }
    return loss.mean(), stats


@dataclass
class PairSelection:
    """Per prompt: indices of the best and worst candidate, their scores, and whether kept."""

    win: torch.Tensor
    lose: torch.Tensor
    win_score: torch.Tensor
    lose_score: torch.Tensor
    keep: torch.Tensor


def select_pairs(scores: torch.Tensor, threshold: float) -> PairSelection:
    """From scores of shape (batch, k): best and worst candidate; keep the pair when
    softmax([best, worst])[0] − softmax([best, worst])[1] > threshold (strict)."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError("scores must have shape (batch, k) with k ≥ 2")
    if not 0 <= threshold < 1:
        raise ValueError("threshold must be in [0, 1)")
    s = scores.float()
    win = s.argmax(dim=1)
    lose = s.argmin(dim=1)
    ws = s.gather(1, win[:, None])[:, 0]
    ls = s.gather(1, lose[:, None])[:, 0]
    probs = torch.softmax(torch.stack([ws, ls], dim=1), dim=1)
    keep = (probs[:, 0] - probs[:, 1]) > threshold
    return PairSelection(win=win, lose=lose, win_score=ws, lose_score=ls, keep=keep)


def pick_continuation(batch: int, k: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The step-wise resampler: for each prompt a uniformly random candidate index in [0, k)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    return torch.randint(0, k, (batch,), generator=generator, device=device)


def segment_steps(num_steps: int, branch_steps: list[int], num_inner_step: int) -> list[list[int]]:
    """SDXL variant: the step indices whose transitions share one label, per branch point.

    A branch at step i is followed by ``num_inner_step`` single steps, so the segment is
    transitions i, i+1, …, i+num_inner_step (4 transitions for num_inner_step = 3).
    """
    if num_inner_step < 0:
        raise ValueError("num_inner_step must be ≥ 0")
    out = []
    for b in branch_steps:
        seg = list(range(b, b + num_inner_step + 1))
        if seg[-1] >= num_steps:
            raise ValueError(f"segment from step {b} runs past the last step {num_steps - 1}")
        out.append(seg)
    return out
