"""It learns: a short CPU SPO run with a toy step-aware scorer (brightness of x̂0, any t) raises
the policy's mean reward on fixed-seed samples over the base model's by > 3 standard errors."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.diffusion.text import PromptEncoder  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from pycore.spo.sampler import sample_latents, spo_rollout  # noqa: E402
from tests.kit.diffusion import build_tiny_models  # noqa: E402
from pycore.spo.train_step import add_spo_lora, make_optimizer, train_step  # noqa: E402

LATENT = (4, 8, 8)
PROMPTS = ["a cat", "a dog", "a car", "a tree"]


def brightness(x0, prompt_idx, t):
    return x0.mean(dim=(1, 2, 3))


@pytest.mark.slow
def test_short_spo_run_raises_the_toy_reward(tmp_path):
    m = build_tiny_models(tmp_path / "tok", sdxl=True, seed=0)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)
    cond, eval_cond = enc(PROMPTS), enc(PROMPTS * 12)
    cfg = from_preset("sdxl", resolution=64, lora_rank=4, threshold=0.0, learning_rate=1e-2)

    def eval_reward():
        x = sample_latents(m.unet, eval_cond, cfg, LATENT, torch.Generator().manual_seed(123))
        return brightness(x, None, None)

    base = eval_reward()
    params = add_spo_lora(m.unet, cfg)
    opt = make_optimizer(params, cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        r = spo_rollout(m.unet, cond, brightness, cfg, LATENT, g)
        for chunk in torch.randperm(len(r.transitions), generator=g).split(16):
            train_step(m.unet, opt, params, r.transitions.index(chunk), cond, cfg)
    pol = eval_reward()
    n = len(base)
    se = (base.var() / n + pol.var() / n).sqrt()  # unpaired standard error of the difference
    z = (pol.mean() - base.mean()) / se
    print(f"toy reward on {n} fixed-seed samples: base {base.mean():.4f} ± {base.std() / n**0.5:.4f}, "
          f"SPO {pol.mean():.4f} ± {pol.std() / n**0.5:.4f}, gain = {z:.1f} standard errors")  # fmt: skip
    assert z > 3
