"""Issue 12 on the CPU: autocast only around the policy UNet, one UNet call for the first branch,
non-finite values stop loudly at each point, accumulation across rollout batches, nothing trained → exit 3."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.errors import NothingDone  # noqa: E402
from pycore.diffusion.text import PromptEncoder  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from pycore.spo.losses import NonFiniteError  # noqa: E402
from pycore.spo.sampler import spm_scorer, spo_rollout  # noqa: E402
from tests.kit.diffusion import build_tiny_models  # noqa: E402
from pycore.spo.trainer import run_spo  # noqa: E402

LATENT = (4, 8, 8)
PROMPTS = ["a cat", "a dog"]
#: a short SDXL-shaped rollout: 2 plain steps, branches at 2 and 4 (1 inner step each), judged at t of step 4 and at 0
CFG = from_preset("sdxl", resolution=64, num_inference_steps=6, divert_start_step=2, num_inner_step=1, threshold=0.0,
                  lora_rank=2, learning_rate=1e-3, num_epochs=1, sample_batch_size=2, train_batch_size=4,
                  gradient_accumulation_steps=1)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = build_tiny_models(tmp_path_factory.mktemp("tok"), sdxl=True, seed=0)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)
    return m, enc


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    from pycore.spm.model import StepAwarePreferenceModel
    from tests.kit.clip import tiny_spm_config
    from tests.kit.tokenizer import write_tiny_clip_tokenizer

    tok = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("spm_tok"))
    s = StepAwarePreferenceModel.from_config(tiny_spm_config(tok), tok, seed=0)
    with torch.no_grad():
        for n, p in s.model.named_parameters():
            if "adaLN_modulation" in n or "t_embedder" in n:
                p.normal_(0, 0.2)
    return s.eval()


def brightness(x0, idx, t):
    return 10 * x0.mean(dim=(1, 2, 3))


class Calls:
    """Counts UNet forward calls and their batch sizes (a forward pre-hook; the UNet is not changed)."""

    def __init__(self, unet):
        self.sizes: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda mod, args, kw: self.sizes.append(int(args[0].shape[0])), with_kwargs=True)

    def close(self):
        self.handle.remove()


def test_first_branch_calls_the_unet_once_on_the_shared_latents(tiny):
    m, enc = tiny
    cond = enc(PROMPTS)
    calls = Calls(m.unet)
    try:
        spo_rollout(m.unet, cond, brightness, CFG, LATENT, torch.Generator().manual_seed(0))
    finally:
        calls.close()
    b, k = len(PROMPTS), CFG.num_candidates
    # CFG doubles each batch: 2 plain steps and the first branch's ε on b latents (one call), then per segment
    # the inner step and the judge on k·b (the second segment starts from the judge's cached ε), then the final inner step
    assert calls.sizes == [2 * b] * 3 + [2 * b * k] * 2 + [2 * b * k]
    assert calls.sizes.count(2 * b) == CFG.divert_start_step + 1


def test_scorer_and_decoder_run_outside_autocast_in_their_own_dtypes(tiny, spm):
    m, _ = tiny
    seen: dict[str, list] = {"vae_in": [], "vae_out": [], "spm_out": [], "autocast": []}

    def hook(name):
        def f(mod, args, out):
            t = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            seen[name].append(t.dtype)
            seen["autocast"].append(torch.is_autocast_enabled("cpu"))

        return f

    hs = [m.vae.decoder.register_forward_hook(hook("vae_out")), spm.model.vision_model.register_forward_hook(hook("spm_out")),
          m.vae.decoder.register_forward_pre_hook(lambda mod, args: seen["vae_in"].append(args[0].dtype))]  # fmt: skip
    score = spm_scorer(spm, m.vae, PROMPTS)
    x0 = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(0))
    idx, t = torch.tensor([0, 1, 0, 1]), torch.tensor([551, 551, 0, 0])
    try:
        plain = score(x0, idx, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = score(x0, idx, t)
    finally:
        for h in hs:
            h.remove()
    assert set(seen["vae_in"]) == {torch.float32} and set(seen["vae_out"]) == {torch.float32}
    assert set(seen["spm_out"]) == {torch.float32} and not any(seen["autocast"])
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-6)
    assert mixed.dtype == torch.float32
    # for contrast: the same scorer under bf16 autocast *without* the guard would differ
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from pycore.diffusion.vae import decode_latents

        leaked = spm.score(decode_latents(m.vae, x0), ["a cat", "a dog"] * 2, t)
    assert not torch.allclose(leaked.float(), plain, rtol=1e-6, atol=1e-6)


def test_rollout_autocast_reaches_the_unet_but_not_the_scorer(tiny):
    m, enc = tiny
    inside: list[bool] = []
    unet_dtypes: list[torch.dtype] = []
    h = m.unet.conv_out.register_forward_hook(lambda mod, a, out: unet_dtypes.append(out.dtype))

    def scorer(x0, idx, t):
        inside.append(torch.is_autocast_enabled("cpu"))
        return brightness(x0, idx, t)

    try:
        spo_rollout(m.unet, enc(PROMPTS), scorer, CFG, LATENT, torch.Generator().manual_seed(0),
                    unet_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))  # fmt: skip
    finally:
        h.remove()
    assert inside == [False, False] and set(unet_dtypes) == {torch.bfloat16}


def _nan_at(call: int):
    """A scorer-side or UNet-side poison: returns NaN on the ``call``-th invocation."""
    n = {"i": 0}

    def poison(t: torch.Tensor) -> torch.Tensor:
        n["i"] += 1
        return torch.full_like(t, float("nan")) if n["i"] == call else t

    return poison


def test_nan_in_x0_stops_the_rollout_with_the_fix(tiny):
    m, enc = tiny
    poison = _nan_at(5)  # the 5th UNet call is the first judge's ε: x̂0 turns NaN
    h = m.unet.register_forward_hook(lambda mod, a, out: (poison(out[0]),) if isinstance(out, tuple) else type(out)(sample=poison(out.sample)))
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite x̂0 of the candidates at t = \d+ .*--mixed-precision bf16") as e:
            spo_rollout(m.unet, enc(PROMPTS), brightness, CFG, LATENT, torch.Generator().manual_seed(0))
    finally:
        h.remove()
    assert "\n" not in str(e.value)


def test_nan_in_decoded_image_and_score_stop_with_the_fix(tiny, spm):
    m, _ = tiny
    x0 = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    idx, t = torch.tensor([0, 1]), torch.tensor([551, 551])
    h = m.vae.decoder.register_forward_hook(lambda mod, a, out: out * float("nan"))
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite decoded image at t = 551 .*sdxl-vae-fp16-fix"):
            spm_scorer(spm, m.vae, PROMPTS)(x0, idx, t)
    finally:
        h.remove()
    h = spm.model.vision_model.register_forward_hook(lambda mod, a, out: (out * float("inf")) if torch.is_tensor(out) else out)
    try:
        with pytest.raises(NonFiniteError, match=r"non-finite preference score .*--spm-dtype float32"):
            spm_scorer(spm, m.vae, PROMPTS)(x0, idx, t)
    finally:
        h.remove()
    # a scorer that returns NaN (any scorer, not only the SPM) is caught by the rollout, not dropped as "no pair"
    with pytest.raises(NonFiniteError, match="non-finite preference score at t = "):
        spo_rollout(m.unet, _enc(tiny)(PROMPTS), lambda x, i, tt: brightness(x, i, tt) * float("nan"), CFG, LATENT,
                    torch.Generator().manual_seed(0))  # fmt: skip


def _enc(tiny):
    return tiny[1]


def _fresh(tmp_path, name):
    m = build_tiny_models(tmp_path / f"tok_{name}", sdxl=True, seed=0)
    return m.unet, PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)


def test_nan_loss_and_nan_gradients_stop_the_run(tmp_path, monkeypatch):
    import pycore.spo.train_step as ts

    real = ts.spo_dpo_loss
    monkeypatch.setattr(ts, "spo_dpo_loss", lambda *a, **kw: (lambda r: (r[0] * float("nan"), r[1]))(real(*a, **kw)))
    unet, enc = _fresh(tmp_path, "l")
    with pytest.raises(NonFiniteError, match=r"non-finite SPO loss: lower the learning rate.*state saved to"):
        run_spo(unet, enc, PROMPTS, lambda ps: brightness, CFG, tmp_path / "l", LATENT, save_formats=())
    monkeypatch.setattr(ts, "spo_dpo_loss", real)

    unet, enc = _fresh(tmp_path, "g")
    from pycore.spo.train_step import add_spo_lora

    orig_add = add_spo_lora

    def add_poisoned(u, config):  # every LoRA gradient becomes NaN in backward (a hook, the math is untouched)
        params = orig_add(u, config)
        for p in params:
            p.register_hook(lambda g: g * float("nan"))
        return params

    import pycore.spo.trainer as tr

    monkeypatch.setattr(tr, "add_spo_lora", add_poisoned)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm in the SPO step: .*(epoch 1, batch 1)"):
        run_spo(unet, enc, PROMPTS, lambda ps: brightness, CFG, tmp_path / "g", LATENT, save_formats=())


def test_accumulation_carries_across_rollout_batches(tmp_path, monkeypatch):
    """4 prompts in batches of 1 (each rollout keeps ≤ 4 transitions = 1 micro-step), accumulation 3: the
    optimizer steps after micro-steps 3 and then once at the end of the epoch — not after every batch."""
    import pycore.spo.trainer as tr

    steps: list[int] = []
    real_step = tr._Loop.optimizer_step

    def counted(self, epoch, b):
        steps.append(b)
        return real_step(self, epoch, b)

    monkeypatch.setattr(tr._Loop, "optimizer_step", counted)
    cfg = CFG.replace(sample_batch_size=1, train_batch_size=4, gradient_accumulation_steps=3)
    unet, enc = _fresh(tmp_path, "a")
    res = run_spo(unet, enc, ["a", "b", "c", "d"], lambda ps: brightness, cfg, tmp_path / "a", LATENT, save_formats=())
    trained = [h["trained"] for h in res.history]
    micro = sum((n + 3) // 4 for n in trained)
    assert micro == 4 and len(steps) == 2 and steps[0] == 2 and steps[1] == 3


def test_no_pair_kept_over_the_whole_run_is_nothing_done(tmp_path):
    cfg = CFG.replace(threshold=0.9)  # the toy scores never differ that much
    unet, enc = _fresh(tmp_path, "z")
    with pytest.raises(NothingDone, match=r"no pair passed the threshold 0.9 in 1 epoch\(s\).*no LoRA was written; the largest softmax gap"):
        run_spo(unet, enc, PROMPTS, lambda ps: lambda x, i, t: 1e-3 * x.mean(dim=(1, 2, 3)), cfg, tmp_path / "z", LATENT)
    assert not (tmp_path / "z" / "spo_lora_diffusers.safetensors").exists()
