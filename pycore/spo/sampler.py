"""The SPO rollout: stochastic DDIM with branching, step-aware judging and the step-wise resampler.

For a batch of B prompts (shape of the latents given by the caller):

1. x ~ N(0, I); steps ``0 .. divert_start_step-1`` are plain stochastic DDIM steps (CFG ε).
2. At each branch step i (see :meth:`SPOConfig.branch_steps`) the shared x_t is copied into k
   candidates; each runs ``1 + num_inner_step`` stochastic DDIM steps (the segment).
3. The candidates are judged where they arrive: x̂0 from the CFG ε at their own timestep (the
   next segment start), or the final latents at t = 0 after the last step; ``scorer`` gets x̂0,
   the prompt index and that timestep.
4. :func:`select_pairs` picks best/worst and the softmax-gap threshold; for each kept pair every
   transition of the segment is stored with the segment's label (win and lose each with their own
   x_t — they are equal for the first transition of the segment).
5. The rollout continues from a uniformly random candidate (:func:`pick_continuation`); its CFG ε
   computed for judging is reused for its next step.

Everything runs under ``torch.no_grad`` and draws all randomness from one ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from pycore.diffusion.text import Conditioning, cfg_eps
from pycore.spo.config import SPOConfig
from pycore.diffusion.schedule import NoiseSchedule, ddim_step, leading_timesteps, sample_prev
from pycore.spo.losses import check_finite, pick_continuation, select_pairs

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""scorer(x0_latents [M, C, H, W], prompt_idx [M], timesteps [M]) → scores [M] (higher is better)."""


@dataclass
class Transitions:
    """Stored training transitions: x_t → x_next for the winning and the losing candidate."""

    x_t_win: torch.Tensor
    x_next_win: torch.Tensor
    x_t_lose: torch.Tensor
    x_next_lose: torch.Tensor
    t: torch.Tensor
    prompt_idx: torch.Tensor

    def __len__(self) -> int:
        return self.t.shape[0]

    def index(self, idx: torch.Tensor | Sequence[int]) -> Transitions:
        i = torch.as_tensor(idx, dtype=torch.long, device=self.t.device)
        return Transitions(*(getattr(self, f)[i] for f in self.fields()))

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("x_t_win", "x_next_win", "x_t_lose", "x_next_lose", "t", "prompt_idx")

    @staticmethod
    def cat(parts: Sequence[Transitions]) -> Transitions:
        return Transitions(*(torch.cat([getattr(p, f) for p in parts]) for f in Transitions.fields()))

    @staticmethod
    def empty(latent_shape: Sequence[int], device: Any = None) -> Transitions:
        z = torch.zeros(0, *latent_shape, device=device)
        i = torch.zeros(0, dtype=torch.long, device=device)
        return Transitions(z, z.clone(), z.clone(), z.clone(), i, i.clone())


@dataclass
class RolloutStats:
    """Per-branch judging statistics (for logging: acceptance rate, rewards).

    ``kept_scores``: the score of the candidate each rollout continued from (the resampler's
    choice); ``final_scores``: those of the final images (the branch judged at t = 0), i.e. the
    reward of what the policy produced.
    """

    judged: int = 0
    kept: int = 0
    win_scores: list[float] = field(default_factory=list)
    lose_scores: list[float] = field(default_factory=list)
    all_scores: list[float] = field(default_factory=list)
    kept_scores: list[float] = field(default_factory=list)
    final_scores: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.kept / self.judged if self.judged else 0.0


@dataclass
class Rollout:
    transitions: Transitions
    final_latents: torch.Tensor
    stats: RolloutStats


def _outside_autocast(device: Any) -> Any:
    """A context that turns autocast off on ``device``'s type (scorers and decoders run in their own dtypes)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


@torch.no_grad()
def spo_rollout(
    unet: Any,
    cond: Conditioning,
    scorer: Scorer,
    config: SPOConfig,
    latent_shape: Sequence[int],
    generator: torch.Generator,
    *,
    schedule: NoiseSchedule | None = None,
    unet_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Rollout:
    """One SPO rollout for the ``len(cond)`` prompts of ``cond``; see the module docstring.

    ``unet_context`` (e.g. accelerate's ``autocast``) is entered around each UNet call only; the
    scorer is called outside it, so the VAE and the preference model compute in their own dtypes.
    x̂0 and the scores are checked finite (:class:`NonFiniteError` names the likely fix).
    """
    sched = schedule or NoiseSchedule()
    ac = sched.alphas_cumprod()
    steps = config.num_inference_steps
    ts = leading_timesteps(steps, sched.num_train_timesteps)
    ratio = sched.num_train_timesteps // steps
    k, inner = config.num_candidates, config.num_inner_step
    device = cond.embeds.device
    b = len(cond)
    cond_k = cond.select(torch.arange(b, device=device).repeat_interleave(k))
    ctx = unet_context or contextlib.nullcontext

    def eps_of(x: torch.Tensor, t: int, c: Conditioning) -> torch.Tensor:
        with ctx():
            return cfg_eps(unet, x, t, c, config.guidance_scale).float()

    def step(x: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        return sample_prev(ddim_step(eps, x, t, ac, ratio, config.eta), generator)

    x = torch.randn((b, *latent_shape), generator=generator, device=device, dtype=torch.float32)
    eps_cached: torch.Tensor | None = None
    for i in range(config.divert_start_step):
        x = step(x, ts[i], eps_of(x, ts[i], cond))
    judge = _Judge(scorer, config, b, device, generator)
    branches = config.branch_steps()
    i = config.divert_start_step
    while i < steps:
        if eps_cached is None:  # the first branch (and a tail step): one UNet call on the shared x_t, not on k copies
            eps_cached = eps_of(x, ts[i], cond)
        if i not in branches:  # tail after the last full segment: plain steps
            x, eps_cached = step(x, ts[i], eps_cached), None
            i += 1
            continue
        xk, eps_k = x.repeat_interleave(k, dim=0), eps_cached.repeat_interleave(k, dim=0)
        seg_x: list[torch.Tensor] = [xk]
        for j in range(inner + 1):
            if j > 0:
                eps_k = eps_of(xk, ts[i + j], cond_k)
            xk = step(xk, ts[i + j], eps_k)
            seg_x.append(xk)
        nxt = i + inner + 1
        if nxt < steps:  # judge x̂0 at the candidates' own timestep
            eps_next = eps_of(xk, ts[nxt], cond_k)
            x0 = ddim_step(eps_next, xk, ts[nxt], ac, ratio, config.eta).pred_original_sample
            t_judge = ts[nxt]
        else:  # final latents are clean images: t = 0
            eps_next, x0, t_judge = None, xk, 0
        rows = judge(x0, t_judge, seg_x, ts[i : i + inner + 1])
        x = xk[rows]
        eps_cached = eps_next[rows] if eps_next is not None else None
        i = nxt
    trans = Transitions.cat(judge.parts) if judge.parts else Transitions.empty(latent_shape, device)
    return Rollout(transitions=trans, final_latents=x, stats=judge.stats)


class _Judge:
    """Scores one segment's candidates, stores the kept pairs' transitions, picks the continuation."""

    def __init__(self, scorer: Scorer, config: SPOConfig, b: int, device: Any, generator: torch.Generator):
        self.scorer, self.config, self.b, self.device, self.generator = scorer, config, b, device, generator
        self.k = config.num_candidates
        self.prompt_idx = torch.arange(b, device=device)
        self.cand_idx = self.prompt_idx.repeat_interleave(self.k)
        self.parts: list[Transitions] = []
        self.stats = RolloutStats()

    def __call__(self, x0: torch.Tensor, t_judge: int, seg_x: list[torch.Tensor], seg_t: Sequence[int]) -> torch.Tensor:
        b, k, device, stats = self.b, self.k, self.device, self.stats
        where = f" at t = {t_judge}"
        check_finite(x0, "x̂0 of the candidates", "x0", where)
        t = torch.full((b * k,), t_judge, device=device, dtype=torch.long)
        with _outside_autocast(device):
            scores = self.scorer(x0, self.cand_idx, t).float().to(device).view(b, k)
        check_finite(scores, "preference score", "score", where)
        sel = select_pairs(scores, self.config.threshold)
        stats.judged += b
        stats.kept += int(sel.keep.sum())
        stats.all_scores += scores.flatten().tolist()
        stats.win_scores += sel.win_score[sel.keep].tolist()
        stats.lose_scores += sel.lose_score[sel.keep].tolist()
        kept = sel.keep.nonzero()[:, 0]
        if kept.numel():
            w_rows, l_rows = kept * k + sel.win[kept], kept * k + sel.lose[kept]
            for j, tj in enumerate(seg_t):
                self.parts.append(Transitions(
                    x_t_win=seg_x[j][w_rows], x_next_win=seg_x[j + 1][w_rows],
                    x_t_lose=seg_x[j][l_rows], x_next_lose=seg_x[j + 1][l_rows],
                    t=torch.full((kept.numel(),), tj, device=device, dtype=torch.long), prompt_idx=kept.clone(),
                ))  # fmt: skip
        choice = pick_continuation(b, k, generator=self.generator, device=self.generator.device).to(device)
        kept_now = scores[self.prompt_idx, choice].tolist()
        stats.kept_scores += kept_now
        if t_judge == 0:
            stats.final_scores += kept_now
        return self.prompt_idx * k + choice


def spm_scorer(spm: Any, vae: Any, prompts: Sequence[str], *, decode_batch_size: int | None = None) -> Scorer:
    """A :data:`Scorer` from a StepAwarePreferenceModel: decode x̂0 with ``vae``, score at t.

    Both run outside any autocast, in their own dtypes (as the official code: SPM fp32, VAE fp16
    with the fp16-fix decoder); the decoded images and the scores are checked finite.
    """
    from pycore.diffusion.vae import decode_latents

    with torch.no_grad(), _outside_autocast(spm.device):
        text = spm.text_embeds(list(prompts))

    @torch.no_grad()
    def score(x0: torch.Tensor, prompt_idx: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        idx = prompt_idx.to(text.device)
        with _outside_autocast(x0.device), _outside_autocast(spm.device):
            images = decode_latents(vae, x0, batch_size=decode_batch_size)
            check_finite(images, "decoded image", "image", f" at t = {int(timesteps[0])}" if len(timesteps) else "")
            s = spm.score(images, [prompts[int(i)] for i in prompt_idx], timesteps, text_embeds=text[idx])
        check_finite(s, "preference score", "score")
        return s

    return score


@torch.no_grad()
def sample_latents(
    unet: Any,
    cond: Conditioning,
    config: SPOConfig,
    latent_shape: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    schedule: NoiseSchedule | None = None,
    eta: float | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM sampling with the config's steps and CFG: final latents per prompt.

    The evaluation sampler (before/after comparisons, per-epoch sample images). ``eta`` defaults
    to the config's (1.0, the training sampler); ``eta=0`` is deterministic DDIM, diffusers'
    pipeline default. ``noise`` gives the initial latents (e.g. drawn per image from its own seed);
    otherwise they are drawn from ``generator``, which also drives the per-step noise when eta > 0.
    """
    sched = schedule or NoiseSchedule()
    ac = sched.alphas_cumprod()
    ts = leading_timesteps(config.num_inference_steps, sched.num_train_timesteps)
    ratio = sched.num_train_timesteps // config.num_inference_steps
    eta = config.eta if eta is None else eta
    device = cond.embeds.device
    if noise is not None:
        if noise.shape != (len(cond), *latent_shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(len(cond), *latent_shape)}")
        x = noise.to(device=device, dtype=torch.float32)
    else:
        x = torch.randn((len(cond), *latent_shape), generator=generator, device=device, dtype=torch.float32)
    for t in ts:
        eps = cfg_eps(unet, x, t, cond, config.guidance_scale)
        st = ddim_step(eps, x, t, ac, ratio, eta)
        x = sample_prev(st, generator) if eta > 0 else st.mean
    return x
