"""SDXL/SD1.5 prompt conditioning against diffusers' own encode_prompt; CFG ε; the embedding cache."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.errors import HwError  # noqa: E402
from pycore.diffusion.text import PromptEncoder, cfg_eps, encode_sd15, sdxl_time_ids  # noqa: E402
from tests.kit.diffusion import TE_HIDDEN, build_tiny_models  # noqa: E402

PROMPTS = ["a cat", "a dog on a sofa"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tok"), sdxl=True, seed=0)


def diffusers_pipe(m):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
                                     tokenizer_2=m.tokenizer_2, unet=m.unet, scheduler=DDIMScheduler())  # fmt: skip


def test_sdxl_embeddings_match_diffusers_encode_prompt(tiny):
    enc = PromptEncoder(tiny.tokenizer, tiny.text_encoder, tiny.tokenizer_2, tiny.text_encoder_2, resolution=1024)
    cond = enc(PROMPTS)
    pe, npe, pooled, npooled = diffusers_pipe(tiny).encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert cond.embeds.shape == (2, 77, 2 * TE_HIDDEN) and cond.pooled.shape == (2, 16)
    torch.testing.assert_close(cond.embeds, pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    # penultimate states of both encoders, concatenated; pooled = text_encoder_2's projection
    ids = tiny.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = tiny.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = tiny.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(cond.embeds, torch.cat([h1, out2.hidden_states[-2]], -1))
    torch.testing.assert_close(cond.pooled, out2.text_embeds)
    # negatives: all zeros, as diffusers does with force_zeros_for_empty_prompt
    assert torch.count_nonzero(cond.neg_embeds) == 0 and torch.count_nonzero(cond.neg_pooled) == 0
    assert torch.count_nonzero(npe) == 0 and torch.count_nonzero(npooled) == 0
    assert cond.time_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2
    assert sdxl_time_ids(768, 512).tolist() == [[768, 512, 0, 0, 768, 512]]


def test_sdxl_negative_prompt_is_encoded_without_force_zeros(tiny):
    enc = PromptEncoder(tiny.tokenizer, tiny.text_encoder, tiny.tokenizer_2, tiny.text_encoder_2, force_zeros_for_empty_prompt=False)
    cond = enc(PROMPTS)
    empty = enc([""])
    assert torch.count_nonzero(cond.neg_embeds) > 0
    torch.testing.assert_close(cond.neg_embeds, empty.embeds)
    torch.testing.assert_close(cond.neg_pooled, empty.pooled)


def test_cache_encodes_each_prompt_once(tiny):
    calls = []
    enc = PromptEncoder(tiny.tokenizer, tiny.text_encoder, tiny.tokenizer_2, tiny.text_encoder_2)
    orig = enc._encode
    enc._encode = lambda ps: (calls.append(list(ps)), orig(ps))[1]
    a = enc(PROMPTS)
    b = enc(["a dog on a sofa", "a cat", "a cat"])
    assert calls == [PROMPTS] and enc.cache_size == 2
    torch.testing.assert_close(b.embeds[1], a.embeds[0])
    torch.testing.assert_close(b.select([2, 0]).embeds, a.select([0, 1]).embeds)
    with pytest.raises(HwError, match="no prompts"):
        enc([])


def test_sd15_path(tmp_path):
    m = build_tiny_models(tmp_path / "tok", sdxl=False)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, resolution=512, force_zeros_for_empty_prompt=True)
    cond = enc(PROMPTS)
    assert not cond.is_sdxl and cond.time_ids is None and cond.embeds.shape == (2, 77, TE_HIDDEN)
    torch.testing.assert_close(cond.neg_embeds, encode_sd15([""], m.tokenizer, m.text_encoder))  # SD1.5 never zeros
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = cfg_eps(m.unet, x, 501, cond, 5.0)
        u = m.unet(x, 501, encoder_hidden_states=cond.neg_embeds.expand(2, -1, -1)).sample
        c = m.unet(x, 501, encoder_hidden_states=cond.embeds).sample
    torch.testing.assert_close(eps, u + 5.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_cfg_eps_sdxl_matches_two_unet_calls(tiny):
    enc = PromptEncoder(tiny.tokenizer, tiny.text_encoder, tiny.tokenizer_2, tiny.text_encoder_2, resolution=64)
    cond = enc(PROMPTS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([951, 1])
    with torch.no_grad():
        eps = cfg_eps(tiny.unet, x, t, cond, 5.0)
        plain = cfg_eps(tiny.unet, x, t, cond, 1.0)
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        c = tiny.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample
        nadded = {"text_embeds": torch.zeros_like(cond.pooled), "time_ids": cond.time_ids}
        u = tiny.unet(x, t, encoder_hidden_states=torch.zeros_like(cond.embeds), added_cond_kwargs=nadded).sample
    torch.testing.assert_close(plain, c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps, u + 5.0 * (c - u), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        cfg_eps(tiny.unet, x[:1], t[:1], cond, 5.0)
