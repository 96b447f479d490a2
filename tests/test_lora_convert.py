"""convert-lora: exact for LoRA families, SVD with the measured error reported for the others,
no relabelling of SD1.5 files."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pycore.lora.convert import ConvertRequest, convert, load_lora  # noqa: E402
from pycore.lora.io import LoraError, load_tensors, save_tensors  # noqa: E402

KQ = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
KCONV = "lora_unet_input_blocks_1_0_in_layers_2"
Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.0.resnets.0.conv1"


def g(seed):
    return torch.Generator().manual_seed(seed)


def loha_lokr_file(path):
    a = [torch.randn(s, generator=g(i)) for i, s in enumerate([(32, 3), (3, 24), (32, 3), (3, 24), (16, 2), (2, 72), (16, 2), (2, 72)])]
    w1, w2 = torch.randn(4, 4, generator=g(20)), torch.randn(8, 6, generator=g(21))
    sd = {f"{KQ}.hada_w1_a": a[0], f"{KQ}.hada_w1_b": a[1], f"{KQ}.hada_w2_a": a[2], f"{KQ}.hada_w2_b": a[3], f"{KQ}.alpha": torch.tensor(3.0),
          f"{KCONV}.hada_w1_a": a[4], f"{KCONV}.hada_w1_b": a[5], f"{KCONV}.hada_w2_a": a[6], f"{KCONV}.hada_w2_b": a[7],
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lokr_w1": w1, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lokr_w2": w2}  # fmt: skip
    save_tensors(path, sd)
    want = {Q: (a[0] @ a[1]) * (a[2] @ a[3]), CONV: ((a[4] @ a[5]) * (a[6] @ a[7])).reshape(16, 8, 3, 3),
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": torch.kron(w1, w2)}  # fmt: skip
    return want


def test_loha_lokr_need_a_rank_and_report_the_measured_error(tmp_path):
    want = loha_lokr_file(tmp_path / "l.safetensors")
    with pytest.raises(LoraError, match="no exact kohya LoRA form; give --rank or --energy"):
        convert(ConvertRequest(tmp_path / "l.safetensors", tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()
    for rank, exact in ((24, True), (2, False)):
        out = tmp_path / f"r{rank}.safetensors"
        rep = convert(ConvertRequest(tmp_path / "l.safetensors", out, rank=rank, svd="full"))
        assert rep.factorised == 3 and not rep.lossless
        back = load_lora(out)
        assert back.is_plain() and back.base == "sdxl"
        for k, d in want.items():
            got = back.layers[k].delta().reshape(d.shape)
            measured = float((got - d).norm() / d.norm())
            assert measured == pytest.approx(rep.errors[k], abs=1e-4)
            assert (measured < 1e-5) if exact else (measured > 1e-3)
        assert back.layers[CONV].down.shape[1:] == (8, 3, 3)  # the conv is a real 3×3 LoCon again
        assert set(rep.error_by_block) == {"unet.down_blocks.0", "unet.down_blocks.1", "text_encoder_2"}


def test_tucker_locon_and_dora_convert_exactly(tmp_path):
    up, mid, down = torch.randn(16, 2, 1, 1, generator=g(1)), torch.randn(2, 2, 3, 3, generator=g(2)), torch.randn(2, 8, 1, 1, generator=g(3))
    qu, qd, m = torch.randn(32, 2, generator=g(4)), torch.randn(2, 24, generator=g(5)), torch.rand(32, 1, generator=g(6)) + 1
    save_tensors(tmp_path / "l.safetensors", {f"{KCONV}.lora_up.weight": up, f"{KCONV}.lora_mid.weight": mid, f"{KCONV}.lora_down.weight": down,
                                             f"{KCONV}.alpha": torch.tensor(1.0), f"{KQ}.lora_up.weight": qu, f"{KQ}.lora_down.weight": qd,
                                             f"{KQ}.dora_scale": m})  # fmt: skip
    rep = convert(ConvertRequest(tmp_path / "l.safetensors", tmp_path / "k.safetensors"))
    assert rep.lossless and rep.factorised == 0
    back = load_lora(tmp_path / "k.safetensors")
    torch.testing.assert_close(back.layers[CONV].delta(), 0.5 * torch.einsum("oa,abkl,bi->oikl", up.flatten(1), mid, down.flatten(1)))
    assert back.families[Q] == "dora+lora" and torch.equal(back.layers[Q].magnitude, m)
    with pytest.raises(LoraError, match="dora\\+lora layer depends on the base weights and has no diffusers LoRA form"):
        convert(ConvertRequest(tmp_path / "l.safetensors", tmp_path / "d.safetensors", to="diffusers"))


def test_sd15_is_not_relabelled(tmp_path):
    k1, k2 = "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_output_blocks_5_2_conv"
    save_tensors(tmp_path / "sd15.safetensors", {f"{k1}.lora_up.weight": torch.randn(12, 2), f"{k1}.lora_down.weight": torch.randn(2, 12),
                                                f"{k2}.lora_up.weight": torch.randn(8, 2, 1, 1), f"{k2}.lora_down.weight": torch.randn(2, 8, 3, 3)},
                 {"ss_base_model_version": "sd_v1"})  # fmt: skip
    rep = convert(ConvertRequest(tmp_path / "sd15.safetensors", tmp_path / "k.safetensors"))
    assert rep.base == "sd15"
    sd, meta = load_tensors(tmp_path / "k.safetensors")
    assert meta["ss_base_model_version"] == "sd_v1" and "xl" not in meta["modelspec.architecture"]
    assert {k.rsplit(".", 2)[0] if "lora_" in k.rsplit(".", 2)[-2] else k.rsplit(".", 1)[0] for k in sd} == {k1, k2}


def test_into_lora_with_lycoris_needs_a_rank_and_is_exact_at_full_rank(tmp_path):
    from pycore.lora.combine import merge_loras
    from pycore.lora.merge import LoraSpec

    want = loha_lokr_file(tmp_path / "l.safetensors")
    with pytest.raises(LoraError, match="no exact LoRA form; give --rank or --energy"):
        merge_loras([LoraSpec(tmp_path / "l.safetensors", 0.5)], tmp_path / "x.safetensors")
    rep = merge_loras([LoraSpec(tmp_path / "l.safetensors", 0.5), LoraSpec(tmp_path / "l.safetensors", 0.25)], tmp_path / "m.safetensors", rank=24, svd="full")
    assert rep.mode == "svd" and rep.max_error < 1e-5
    back = load_lora(tmp_path / "m.safetensors")
    for k, d in want.items():
        torch.testing.assert_close(back.layers[k].delta().reshape(d.shape), 0.75 * d, atol=1e-4, rtol=1e-4)
