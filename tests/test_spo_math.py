"""SPO's sampling math and losses, checked against diffusers and direct formulas."""

import math

import pytest
import torch

from pycore.diffusion.schedule import NoiseSchedule, ddim_step, leading_timesteps, log_prob, sample_prev
from pycore.spo.losses import pick_continuation, segment_steps, select_pairs, spo_dpo_loss


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip


def test_leading_timesteps_match_diffusers():
    ts = leading_timesteps(20)
    assert ts[0] == 951 and ts[-1] == 1 and len(ts) == 20 and all(a - b == 50 for a, b in zip(ts, ts[1:]))
    s = scheduler()
    s.set_timesteps(20)
    assert s.timesteps.tolist() == ts


def test_schedule_matches_diffusers():
    assert torch.allclose(NoiseSchedule().alphas_cumprod(), scheduler().alphas_cumprod.float(), atol=1e-7)


@pytest.mark.parametrize("t", [951, 501, 51, 1])
def test_ddim_step_matches_diffusers_eta1(t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g)
    s = scheduler()
    s.set_timesteps(20)
    ref = s.step(eps, t, x, eta=1.0, variance_noise=z)
    step = ddim_step(eps, x, t, NoiseSchedule().alphas_cumprod(), step_ratio=50, eta=1.0)
    assert torch.allclose(step.mean + step.std * z, ref.prev_sample, atol=1e-5)
    assert torch.allclose(step.pred_original_sample, ref.pred_original_sample, atol=1e-5)


def test_log_prob_is_the_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    step = ddim_step(eps, x, torch.tensor([951, 501, 51]), NoiseSchedule().alphas_cumprod(), 50)
    prev = sample_prev(step, g)
    direct = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(prev)
    assert torch.allclose(log_prob(prev, step), direct.mean(dim=(1, 2, 3)), atol=1e-5)
    assert torch.allclose(log_prob(prev, step, "sum"), direct.sum(dim=(1, 2, 3)), rtol=1e-5)
    # Per-sample timesteps give per-sample std: later steps are less noisy.
    assert step.std[0].item() > step.std[2].item() > 0
    with pytest.raises(ValueError):
        log_prob(prev, step, "max")


def test_loss_sign_and_clamp():
    zero = torch.zeros(4)
    # The policy makes the winner likelier than the reference does: loss below log 2.
    loss, stats = spo_dpo_loss(torch.full((4,), 0.05), zero, torch.full((4,), -0.05), zero)
    assert loss.item() < math.log(2) and stats["implicit_acc"].mean().item() == 1.0
    loss_bad, _ = spo_dpo_loss(torch.full((4,), -0.05), zero, torch.full((4,), 0.05), zero)
    assert loss_bad.item() > math.log(2)
    # Inside the clamp the gradient pushes the winner's log-prob up and the loser's down.
    lw = torch.zeros(4, requires_grad=True)
    ll = torch.zeros(4, requires_grad=True)
    spo_dpo_loss(lw, zero, ll, zero)[0].backward()
    assert (lw.grad < 0).all() and (ll.grad > 0).all()
    # Outside the clamp (ratio > 1.1 or < 0.9) the gradient is exactly zero.
    lw = torch.full((4,), 0.5, requires_grad=True)
    ll = torch.full((4,), -0.5, requires_grad=True)
    spo_dpo_loss(lw, zero, ll, zero)[0].backward()
    assert torch.equal(lw.grad, torch.zeros(4)) and torch.equal(ll.grad, torch.zeros(4))


def test_pair_selection_threshold():
    scores = torch.tensor([[21.0, 22.0, 20.0, 21.5], [21.0, 21.1, 21.05, 21.02]])
    sel = select_pairs(scores, threshold=0.3)
    assert sel.win.tolist() == [1, 1] and sel.lose.tolist() == [2, 0]
    # gap = tanh((best - worst)/2): 2.0 → 0.76 kept; 0.1 → 0.05 dropped.
    assert sel.keep.tolist() == [True, False]
    gap = torch.tanh(torch.tensor(1.0)).item()
    assert select_pairs(torch.tensor([[0.0, 2.0]]), threshold=gap - 1e-4).keep.item()
    assert not select_pairs(torch.tensor([[0.0, 2.0]]), threshold=gap + 1e-4).keep.item()
    with pytest.raises(ValueError):
        select_pairs(torch.zeros(3), 0.3)


def test_resampler_is_uniform_and_seeded():
    g = torch.Generator().manual_seed(0)
    picks = pick_continuation(40000, 4, generator=g)
    counts = torch.bincount(picks, minlength=4).float()
    assert ((counts - 10000).abs() < 400).all()  # ±4 standard deviations
    a = pick_continuation(16, 4, generator=torch.Generator().manual_seed(1))
    b = pick_continuation(16, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_sdxl_segments_have_four_transitions():
    segs = segment_steps(20, [4, 8, 12, 16], num_inner_step=3)
    assert segs == [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    assert all(len(s) == 4 for s in segs)
    with pytest.raises(ValueError):
        segment_steps(20, [18], 3)
