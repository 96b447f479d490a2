"""The single-process SPO loop: checkpoints, exact resume, LoRA outputs, bad input."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.errors import HwError  # noqa: E402
from pycore.spo.conditioning import PromptEncoder  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from pycore.spo.tiny import build_tiny_models  # noqa: E402
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
