"""The single-process SPO loop: checkpoints, exact resume, LoRA outputs, bad input."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.errors import HwError  # noqa: E402
from pycore.diffusion.text import PromptEncoder  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from tests.kit.diffusion import build_tiny_models  # noqa: E402
from pycore.spo.trainer import latest_checkpoint, run_spo  # noqa: E402

LATENT = (4, 8, 8)
PROMPTS = ["a cat", "a dog", "a car"]
CFG = from_preset("sdxl", resolution=64, lora_rank=2, threshold=0.0, learning_rate=1e-3, num_epochs=2,
                  sample_batch_size=2, train_batch_size=8, gradient_accumulation_steps=2)  # fmt: skip


def brightness_for(prompts):
    return lambda x0, idx, t: 10 * x0.mean(dim=(1, 2, 3))


def fresh(tmp_path, name):
    m = build_tiny_models(tmp_path / f"tok_{name}", sdxl=True, seed=0)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)
    return m.unet, enc


def lora_of(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    unet_a, enc_a = fresh(tmp_path, "a")
    res = run_spo(unet_a, enc_a, PROMPTS, brightness_for, CFG, tmp_path / "a", LATENT)
    assert res.epochs_done == 2 and len(res.history) == 4 and all(h["pairs"] > 0 for h in res.history)
    assert {p.name for p in res.lora_paths} == {"spo_lora_diffusers.safetensors", "spo_lora_kohya.safetensors"}
    assert json.loads((tmp_path / "a" / "spo_config.json").read_text())["lora_rank"] == 2

    unet_b, enc_b = fresh(tmp_path, "b")
    part = run_spo(unet_b, enc_b, PROMPTS, brightness_for, CFG, tmp_path / "b", LATENT, stop_after_epochs=1)
    assert part.epochs_done == 1 and latest_checkpoint(tmp_path / "b").name == "epoch_0001.pt"
    assert not (tmp_path / "b" / "spo_lora_kohya.safetensors").exists()
    unet_c, enc_c = fresh(tmp_path, "c")  # a new process: fresh models, resumed from the checkpoint
    done = run_spo(unet_c, enc_c, PROMPTS, brightness_for, CFG, tmp_path / "b", LATENT)
    assert done.history == res.history
    a, c = lora_of(unet_a), lora_of(unet_c)
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)

    from pycore.lora.convert import load_lora

    ls = load_lora(tmp_path / "a" / "spo_lora_diffusers.safetensors")
    assert len(ls.layers) == len(a) // 2 and all(layer.alpha == 2.0 for layer in ls.layers.values())


def test_bad_input_is_a_clear_error(tmp_path):
    unet, enc = fresh(tmp_path, "x")
    with pytest.raises(HwError, match="no prompts"):
        run_spo(unet, enc, [], brightness_for, CFG, tmp_path / "x", LATENT)


class RecordingLogger:
    def __init__(self):
        self.scalar_calls, self.image_calls, self.epochs, self.infos = [], [], [], []

    def scalars(self, values, step):
        self.scalar_calls.append((step, values))

    def images(self, tag, images, captions, step):
        self.image_calls.append((tag, len(images), captions, step))

    def epoch(self, summary):
        self.epochs.append(summary)

    def info(self, message):
        self.infos.append(message)


def test_logging_and_per_epoch_samples(tmp_path):
    from pycore.diffusion.vae import decode_latents
    from pycore.spo.trainer import Preview

    m = build_tiny_models(tmp_path / "tok", sdxl=True, seed=0)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)
    cfg = CFG.replace(num_epochs=1)
    log = RecordingLogger()
    preview = Preview(prompts=["a cat", "a red car"], seeds=[1, 2], decode=lambda lat: decode_latents(m.vae, lat))
    res = run_spo(m.unet, enc, PROMPTS, brightness_for, cfg, tmp_path / "run", LATENT, logger=log, preview=preview)
    assert res.epochs_done == 1 and len(log.scalar_calls) == 2 and [s for s, _ in log.scalar_calls] == [0, 1]
    keys = set(log.scalar_calls[0][1])
    assert {"train/loss", "train/implicit_accuracy", "pairs/acceptance_rate", "reward/final", "reward/win", "reward/lose",
            "reward/kept", "time/step", "time/sampling", "time/decode_score", "time/training"} <= keys  # fmt: skip
    v = log.scalar_calls[0][1]
    assert v["reward/win"] >= v["reward/lose"] and v["time/step"] >= v["time/sampling"] > 0
    assert [(c[0], c[1], c[3]) for c in log.image_calls] == [("samples", 2, 0), ("samples", 2, 1)]
    assert len(log.epochs) == 1 and log.epochs[0]["epoch"] == 1 and log.epochs[0]["pairs"] > 0
    for e in ("epoch_0000", "epoch_0001"):
        folder = tmp_path / "run" / "samples" / e
        assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "prompts.jsonl"]
    from PIL import Image

    a = Image.open(tmp_path / "run" / "samples" / "epoch_0000" / "00.png")
    assert a.size == (8, 8)  # the tiny VAE has one level: images are latent-sized


def test_nonfinite_log_probs_stop_with_a_message_and_a_checkpoint(tmp_path, monkeypatch):
    import pycore.spo.trainer as trainer
    from pycore.spo.train_step import NonFiniteError

    real = trainer.spo_loss
    calls = []

    def poisoned(unet, batch, cond, config):
        calls.append(1)
        if len(calls) == 2:  # a LoRA weight goes NaN mid-run, as after a divergent update
            with torch.no_grad():
                next(p for n, p in unet.named_parameters() if "lora_B" in n).fill_(float("nan"))
        return real(unet, batch, cond, config)

    monkeypatch.setattr(trainer, "spo_loss", poisoned)
    unet, enc = fresh(tmp_path, "n")
    with pytest.raises(NonFiniteError, match=r"non-finite log-probability.*state saved to .*nonfinite\.pt") as e:
        run_spo(unet, enc, PROMPTS, brightness_for, CFG, tmp_path / "n", LATENT)
    assert "\n" not in str(e.value)
    state = torch.load(tmp_path / "n" / "checkpoints" / "nonfinite.pt", weights_only=True)
    assert state["epoch"] == 0 and any(torch.isnan(t).any() for t in state["lora"].values())
    assert latest_checkpoint(tmp_path / "n") is None  # never resumed from
    assert not (tmp_path / "n" / "spo_lora_diffusers.safetensors").exists()


def test_resume_accepts_more_epochs_but_not_other_changes(tmp_path):
    cfg1 = CFG.replace(num_epochs=1)
    unet, enc = fresh(tmp_path, "r1")
    run_spo(unet, enc, PROMPTS[:2], brightness_for, cfg1, tmp_path / "r", LATENT, save_formats=())
    unet, enc = fresh(tmp_path, "r2")
    with pytest.raises(HwError, match=r"different configuration \(learning_rate 0.001 → 0.002\)"):
        run_spo(unet, enc, PROMPTS[:2], brightness_for, cfg1.replace(num_epochs=2, learning_rate=2e-3), tmp_path / "r", LATENT)
    unet, enc = fresh(tmp_path, "r3")
    log = RecordingLogger()
    res = run_spo(unet, enc, PROMPTS[:2], brightness_for, cfg1.replace(num_epochs=2), tmp_path / "r", LATENT, logger=log, save_formats=())
    assert res.resumed_from == 1 and res.epochs_done == 2 and "resuming from" in log.infos[0]


def test_bf16_mixed_precision_through_accelerate(tmp_path):
    """Frozen UNet in bf16, LoRA in fp32, autocast from accelerate: the run finishes with a finite LoRA."""
    from pycore.spo.run import make_accelerator

    cfg = CFG.replace(num_epochs=1, mixed_precision="bf16")
    acc = make_accelerator(cfg, tmp_path / "bf", cpu=True, log_with=())
    assert acc.mixed_precision == "bf16"
    unet, enc = fresh(tmp_path, "bf")
    unet.to(torch.bfloat16)
    res = run_spo(unet, enc, PROMPTS, brightness_for, cfg, tmp_path / "bf", LATENT, accelerator=acc)
    lora = lora_of(unet)
    assert res.epochs_done == 1 and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
    assert any(h.get("loss") is not None for h in res.history)
    assert any(t.abs().sum() > 0 for n, t in lora.items() if "lora_B" in n)  # it trained
    frozen = [p for n, p in unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    make_accelerator(CFG, tmp_path / "again", cpu=True, log_with=())  # a later run in the same process may change settings
