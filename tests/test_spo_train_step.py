"""SPO train step: reference = adapter-disabled policy, only LoRA parameters move, clipping clips,
the loss goes down on a toy scorer's pairs, non-finite values stop with a clear error."""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.errors import HwError  # noqa: E402
from pycore.diffusion.text import PromptEncoder  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from pycore.diffusion.schedule import NoiseSchedule  # noqa: E402
from pycore.spo.sampler import spo_rollout  # noqa: E402
from tests.kit.diffusion import build_tiny_models  # noqa: E402
from pycore.spo.train_step import (  # noqa: E402
    NonFiniteError,
    adapters_disabled,
    add_spo_lora,
    clip_gradients,
    make_optimizer,
    spo_loss,
    train_step,
    transition_logprob,
)

LATENT = (4, 8, 8)
PROMPTS = ["a cat", "a dog"]


def brightness(x0, prompt_idx, t):
    return 10 * x0.mean(dim=(1, 2, 3))


@pytest.fixture()
def setup(tmp_path):
    m = build_tiny_models(tmp_path / "tok", sdxl=True, seed=0)
    cond = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)(PROMPTS)
    cfg = from_preset("sdxl", resolution=64, lora_rank=4, threshold=0.0, learning_rate=1e-3)
    base = copy.deepcopy(m.unet)
    params = add_spo_lora(m.unet, cfg)
    return m, base, cond, cfg, params


def unet_out(unet, cond, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *LATENT, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([951, 101]), encoder_hidden_states=cond.embeds,
                    added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample  # fmt: skip


def test_reference_is_the_base_unet_exactly(setup):
    m, base, cond, cfg, params = setup
    n_blocks = sum(1 for n, _ in base.named_modules() if n.endswith("attn1"))
    assert len(params) == n_blocks * 2 * 4 * 2  # attn1/attn2 × q,k,v,out × lora_A/lora_B
    assert all(p.dtype == torch.float32 for p in params)
    ref0 = unet_out(base, cond)
    assert torch.equal(unet_out(m.unet, cond), ref0)  # gaussian init: B = 0, the policy starts at the base
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora_out = unet_out(m.unet, cond)
    assert not torch.allclose(lora_out, ref0)
    with adapters_disabled(m.unet):
        assert torch.equal(unet_out(m.unet, cond), ref0)
    assert torch.equal(unet_out(m.unet, cond), lora_out)  # re-enabled on exit
    with pytest.raises(RuntimeError), adapters_disabled(m.unet):
        raise RuntimeError("boom")
    assert torch.equal(unet_out(m.unet, cond), lora_out)  # re-enabled even after an error


def test_train_step_moves_only_lora_and_the_loss_decreases(setup):
    m, _, cond, cfg, params = setup
    r = spo_rollout(m.unet, cond, brightness, cfg, LATENT, torch.Generator().manual_seed(0))
    assert len(r.transitions) == 4 * 4 * len(PROMPTS)
    before = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    opt = make_optimizer(params, cfg)
    losses = [train_step(m.unet, opt, params, r.transitions, cond, cfg).loss for _ in range(6)]
    print("SPO loss over 6 steps on the same pairs:", [round(x, 6) for x in losses])
    assert abs(losses[0] - torch.log(torch.tensor(2.0)).item()) < 1e-6  # policy == reference at start
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0]
    changed = {n for n, p in m.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


def test_logprob_reduction_and_reference_matches_disabled_policy(setup):
    m, base, cond, cfg, _ = setup
    r = spo_rollout(m.unet, cond, brightness, cfg, LATENT, torch.Generator().manual_seed(1))
    tr = r.transitions.index(range(4))
    ac = NoiseSchedule().alphas_cumprod()
    c = cond.select(tr.prompt_idx)
    with torch.no_grad():
        mean = transition_logprob(m.unet, tr.x_t_win, tr.x_next_win, tr.t, c, cfg, ac)
        total = transition_logprob(m.unet, tr.x_t_win, tr.x_next_win, tr.t, c, cfg.replace(logprob_reduction="sum"), ac)
        with adapters_disabled(m.unet):
            ref = transition_logprob(m.unet, tr.x_t_win, tr.x_next_win, tr.t, c, cfg, ac)
        base_lp = transition_logprob(base, tr.x_t_win, tr.x_next_win, tr.t, c, cfg, ac)
    torch.testing.assert_close(total, mean * 4 * 8 * 8)
    assert torch.equal(ref, base_lp)


def test_gradient_clipping_actually_clips(setup):
    m, _, cond, cfg, params = setup
    r = spo_rollout(m.unet, cond, brightness, cfg, LATENT, torch.Generator().manual_seed(0))
    loss, _ = spo_loss(m.unet, r.transitions, cond, cfg)
    loss.backward()
    norm_before = clip_gradients(params, 1e-4)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
    assert norm_before > 1e-4 and after.item() == pytest.approx(1e-4, rel=1e-3)


def test_non_finite_and_bad_setup_are_clear_errors(setup, tmp_path):
    m, _, cond, cfg, params = setup
    r = spo_rollout(m.unet, cond, brightness, cfg, LATENT, torch.Generator().manual_seed(0))
    tr = r.transitions.index([0, 1])
    tr.x_next_win[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite log-probability"):
        train_step(m.unet, make_optimizer(params, cfg), params, tr, cond, cfg)
    other = build_tiny_models(tmp_path / "tok2", sdxl=True)
    with pytest.raises(HwError, match="matched no UNet module|cannot add the LoRA"):
        add_spo_lora(other.unet, cfg.replace(lora_targets=["nonexistent_proj"]))
    with pytest.raises(HwError, match="no LoRA adapter"):
        with adapters_disabled(torch.nn.Linear(2, 2)):
            pass
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(HwError, match="needs the bitsandbytes package"):
            make_optimizer(params, cfg.replace(use_8bit_adam=True))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(setup):
    m, _, cond, cfg, params = setup
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    r = spo_rollout(m.unet, cond, brightness, cfg, LATENT, torch.Generator().manual_seed(2))
    tr = r.transitions.index(range(6))
    grads = []
    for on in (False, True):
        if on:
            m.unet.enable_gradient_checkpointing()
        loss, _ = spo_loss(m.unet, tr, cond, cfg)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    assert m.unet.is_gradient_checkpointing
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert any(g.abs().sum() > 0 for g in grads[0][1])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
