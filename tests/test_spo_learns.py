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


PROMPTS_16 = ["a red car", "a cat on a sofa", "a mountain lake", "a bowl of fruit", "an old house", "a city street at night",
              "a portrait of a woman", "a dog in the snow", "a green field", "a blue boat", "a glass of water", "a forest path",
              "a plate of pasta", "a yellow bird", "a desert road", "a stone bridge"]  # fmt: skip


@pytest.mark.slow
def test_spo_train_then_spo_sample_raises_a_learned_preference(hw, tmp_path):
    """The whole chain as the demo runs it: `hw spm-train` learns a preference for brighter images (a property the
    tiny UNet's LoRA can move: its VAE is near-identity), `hw spo-train` trains a LoRA against that SPM, and
    `hw spo-sample --compare` — loading the LoRA file — scores fixed-seed samples higher with it, by > 3 standard errors.
    Sampled with eta 1, the stochastic policy SPO trains (spo-sample's default DDIM eta 0 gains less on a model this small)."""
    from tests.kit.clip import save_tiny_clip
    from tests.kit.diffusion import save_tiny_pipeline, save_tiny_sd15_denoiser
    from tests.kit.preference import write_brightness_pairs

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is much faster than two on a shared CPU
    try:
        save_tiny_sd15_denoiser(tmp_path / "spm_base", resolution=16)
        save_tiny_clip(tmp_path / "clip", seed=2)
        pairs = write_brightness_pairs(tmp_path / "pairs.parquet", 96, size=16)
        r = hw("spm-train", pairs, "--base-model", tmp_path / "spm_base", "--init", tmp_path / "clip", "--out", tmp_path / "spm",
               "--resolution", 16, "--batch-size", 8, "--lr", 2e-3, "--weight-decay", 0.0, "--warmup-steps", 0, "--val-fraction", 0.25,
               "--max-steps", 40, "--eval-every", 40, "--json")  # fmt: skip
        assert r.code == 0, r.err
        assert r.json()["final"]["accuracy"]["0"] >= 0.8
        save_tiny_pipeline(tmp_path / "sdxl", vae="near_identity")
        (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS_16) + "\n")
        r = hw("spo-train", "--base", tmp_path / "sdxl", "--spm", tmp_path / "spm", "--prompts", tmp_path / "prompts.txt", "--out",
               tmp_path / "run", "--resolution", 8, "--lora-rank", 4, "--lr", 2e-2, "--epochs", 2, "--set", "threshold=0.0",
               "--num-samples", 0, "--vae", "base", "--no-tensorboard", "--json")  # fmt: skip
        assert r.code == 0, r.err
        assert r.json()["pairs_kept"] > 0
        r = hw("spo-sample", "--base", tmp_path / "sdxl", "--lora", tmp_path / "run" / "spo_lora_diffusers.safetensors", "--prompts",
               tmp_path / "prompts.txt", "--compare", "--spm", tmp_path / "spm", "--resolution", 8, "--images-per-prompt", 4, "--eta", 1.0,
               "--out", tmp_path / "samples", "--json")  # fmt: skip
        assert r.code == 0, r.err
    finally:
        torch.set_num_threads(n)
    gain = r.json()["score_gain"]
    print(f"SPM score gain of the SPO LoRA on {gain['n']} fixed-seed samples: {gain['mean']:+.3f} ± {gain['se']:.3f}")
    assert gain["n"] == 64 and gain["mean"] > 3 * gain["se"] > 0
