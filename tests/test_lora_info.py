"""hw lora-info and the warnings given when a written file will not load where the user is heading."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pycore.errors import HwWarning  # noqa: E402
from pycore.lora.convert import save_lora  # noqa: E402
from pycore.lora.info import InfoRequest, lora_info  # noqa: E402
from pycore.lora.io import save_tensors  # noqa: E402
from pycore.lora.layers import LoraLayer, LoraSet  # noqa: E402

KQ = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
TE2Q = "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj"
UPS = "unet.up_blocks.0.upsamplers.0.conv"


def test_lycoris_file_info(tmp_path, hw):
    sd = {f"{KQ}.hada_w1_a": torch.randn(32, 4), f"{KQ}.hada_w1_b": torch.randn(4, 24), f"{KQ}.hada_w2_a": torch.randn(32, 4),
          f"{KQ}.hada_w2_b": torch.randn(4, 24), f"{KQ}.alpha": torch.tensor(2.0),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w1": torch.randn(2, 2), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w2": torch.randn(8, 8)}  # fmt: skip
    save_tensors(tmp_path / "l.safetensors", sd, {"ss_network_module": "lycoris.kohya", "ss_output_name": "x", "other": "y"})
    info = lora_info(InfoRequest(tmp_path / "l.safetensors"))
    assert info.families == {"loha": 1, "lokr": 1} and info.base == "sdxl" and info.layouts == ["kohya", "kohya-sgm"]
    assert info.ranks == {"text_encoder": "-", "unet.down_blocks.1": "4"} and info.alphas == [2.0]
    assert info.modules == {"unet": 1, "text_encoder": 1}
    assert info.metadata == {"ss_network_module": "lycoris.kohya", "ss_output_name": "x"}
    assert info.loaders["ComfyUI/Forge"] == "yes" and info.loaders["A1111"] == "yes" and info.loaders["diffusers"].startswith("no")
    r = hw("lora-info", tmp_path / "l.safetensors", "--json")
    assert r.code == 0 and r.json()["families"] == {"loha": 1, "lokr": 1}
    r = hw("lora-info", tmp_path / "l.safetensors")
    assert r.code == 0 and "loha" in r.err and "A1111" in r.err


def _lora(*names, conv=()):
    ls = LoraSet()
    for n in names:
        ls.layers[n] = LoraLayer(torch.randn(2, 8), torch.randn(8, 2), 2.0)
    for n in conv:
        ls.layers[n] = LoraLayer(torch.randn(2, 8, 3, 3), torch.randn(8, 2, 1, 1), 2.0)
    return ls


def test_warnings_for_where_the_file_is_heading(tmp_path):
    ls = _lora(TE2Q, conv=(UPS,))
    with pytest.warns(HwWarning, match="A1111 loads nothing"):
        save_lora(ls, tmp_path / "d.safetensors", "diffusers")
    info = lora_info(InfoRequest(tmp_path / "d.safetensors"))
    assert info.loaders["A1111"].startswith("no") and info.loaders["ComfyUI/Forge"].startswith("partial") and info.loaders["diffusers"] == "yes"
    with pytest.warns(HwWarning) as rec:
        save_lora(ls, tmp_path / "k.safetensors", "kohya", layout="diffusers")
    msgs = " | ".join(str(w.message) for w in rec)
    assert "upsampler conv" in msgs and "only some of q/k/v/out" in msgs
    info = lora_info(InfoRequest(tmp_path / "k.safetensors"))
    assert info.loaders["A1111"].startswith("partial") and "upsampler" in info.loaders["A1111"] and "3" in info.loaders["A1111"]
    with pytest.warns(HwWarning) as rec:
        save_lora(ls, tmp_path / "s.safetensors", "kohya")
    assert not any("upsampler" in str(w.message) for w in rec)
