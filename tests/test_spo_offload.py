"""offload_scorer: the SPM and the VAE leave the accelerator for every training pass and come back for every
rollout and preview — the phase boundaries, checked on the CPU with a probe module standing in for them."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.diffusion.text import PromptEncoder  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from pycore.spo.trainer import Preview, run_spo  # noqa: E402
from tests.kit.diffusion import build_tiny_models  # noqa: E402

LATENT = (4, 8, 8)
CFG = from_preset("sdxl", resolution=64, lora_rank=2, threshold=0.0, learning_rate=1e-3, num_epochs=1, num_inference_steps=8,
                  divert_start_step=1, num_inner_step=1, sample_batch_size=2, train_batch_size=4, gradient_accumulation_steps=1)  # fmt: skip
#: Stands in for the offload target: the probe only records where it is asked to go (a real module can't return from meta).
OFFLOAD = torch.device("meta")


class Probe(torch.nn.Module):
    """Records every .to(device) the trainer asks for; stays where it is (so it works on a CPU-only machine)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.at, self.moves = "cpu", []

    def to(self, device, *args, **kwargs):  # type: ignore[override]
        self.at = torch.device(device).type
        self.moves.append(self.at)
        return self


def _run(tmp_path, offload: bool):
    m = build_tiny_models(tmp_path / "tok", sdxl=True, seed=0)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)
    spm, vae = Probe(), Probe()
    seen: list[tuple[str, str, str]] = []

    def scorer_for(prompts):
        def score(x0, idx, t):
            seen.append(("score", spm.at, vae.at))
            return x0.mean(dim=(1, 2, 3))

        return score

    def in_training(module, args):
        if torch.is_grad_enabled():  # the policy forward of a training micro-step (rollout and reference run without grad)
            seen.append(("train", spm.at, vae.at))

    m.unet.register_forward_pre_hook(in_training)

    def decode(lat):
        seen.append(("preview", spm.at, vae.at))
        return lat[:, :3]

    preview = Preview(prompts=["a cat"], seeds=[1], decode=decode)
    run_spo(m.unet, enc, ["a cat", "a dog", "a car"], scorer_for, CFG.replace(offload_scorer=offload), tmp_path / "out", LATENT,
            preview=preview, scorer_modules=(spm, vae), offload_device=OFFLOAD)  # fmt: skip
    return seen, spm, vae


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()  # tiny tensors: one thread is much faster than two on a shared CPU
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_scorer_is_off_the_device_exactly_while_training(tmp_path):
    seen, spm, vae = _run(tmp_path / "on", offload=True)
    phases = {p for p, _, _ in seen}
    assert phases == {"score", "train", "preview"}
    assert all(s == v == "cpu" for p, s, v in seen if p in ("score", "preview")), seen  # on the device to decode and score
    assert all(s == v == "meta" for p, s, v in seen if p == "train"), seen  # offloaded for every training forward
    # two prompt batches: device for the rollout, offload for training, each time; device again for the previews
    assert spm.moves.count("meta") == 2 and spm.moves == vae.moves
    # the option off: nothing moves
    seen, spm, vae = _run(tmp_path / "off", offload=False)
    assert spm.moves == [] and vae.moves == [] and {s for _, s, _ in seen} == {"cpu"}


def test_a_run_may_resume_with_the_offload_switched():
    """It changes no value, so a run started on a large card may resume on a small one (and `--memory auto` there adds it)."""
    from pathlib import Path

    from pycore.errors import HwError
    from pycore.spo.trainer import _check_resumable

    _check_resumable(CFG.to_dict(), CFG.replace(offload_scorer=True), Path("epoch_0001.pt"))
    with pytest.raises(HwError, match="different configuration"):
        _check_resumable(CFG.to_dict(), CFG.replace(spm_dtype="float16"), Path("epoch_0001.pt"))
