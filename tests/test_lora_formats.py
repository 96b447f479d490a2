"""Key maps on the real SDXL architecture (meta device, no weights) and the streaming safetensors I/O."""

from __future__ import annotations

import os
import re

import pytest

torch = pytest.importorskip("torch")

from pycore.errors import HwError  # noqa: E402
from pycore.lora import formats as fm  # noqa: E402
from pycore.lora.checkpoint import target_kind  # noqa: E402
from pycore.lora.io import LoraError, SafeReader, SafeWriter, file_body_sha256, load_tensors, save_tensors  # noqa: E402

from tests.kit.sdxl_arch import CLIP_G, CLIP_L  # noqa: E402
from tests.kit.sdxl_arch import UNET as SDXL_UNET  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sdxl_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    return unet, te1, te2


def kohya_targets(model, classes: tuple[str, ...]) -> list[str]:
    """kohya sd-scripts' rule: every Linear / Conv2d inside modules of the given classes."""
    out = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in classes:
            for cn, child in mod.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    out.append(fm.te_path(f"{name}.{cn}"))
    return sorted(set(out))


def test_sdxl_unet_kohya_count_and_roundtrip(sdxl_meta):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers

    unet = sdxl_meta[0]
    attn = kohya_targets(unet, ("Transformer2DModel",))
    assert len(attn) == 722  # kohya's SDXL UNet module count: Linear layers of the 11 Transformer2DModels
    conv = kohya_targets(unet, ("ResnetBlock2D", "Downsample2D", "Upsample2D"))
    # 17 ResnetBlock2D × (conv1, conv2, time_emb_proj) + 11 conv_shortcut + 2 Downsample2D + 2 Upsample2D (LoCon)
    assert len(conv) == 17 * 3 + 11 + 2 + 2
    mods = dict(unet.named_modules())
    for path in attn + conv:
        canon = f"unet.{path}"
        kind = target_kind(canon, mods[path].weight.dim())
        assert kind == ("attn" if path in attn else "conv"), path
        for layout in ("sgm", "diffusers"):
            assert fm.kohya_to_canonical(fm.canonical_to_kohya(canon, layout)) == canon
    # diffusers' own kohya loader (SGM block mapping + kohya renaming) lands every name on our module
    sgm = {}
    for p in attn + conv:
        k = fm.canonical_to_kohya(f"unet.{p}", "sgm")
        sgm[k + ".lora_down.weight"] = torch.zeros(1, 1)
        sgm[k + ".lora_up.weight"] = torch.zeros(1, 1)
        sgm[k + ".alpha"] = torch.tensor(1.0)
    peft_sd, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(sgm, unet.config))
    theirs = set()
    for k in peft_sd:  # diffusers' intermediate names: ….attn1.processor.to_q_lora.down.weight, ….proj_in.lora.down.weight
        if k.endswith("lora.down.weight"):
            name = re.sub(r"\.processor\.(to_[qkv]|to_out)$", lambda m: f".{m.group(1)}" + (".0" if m.group(1) == "to_out" else ""), k[: -len(".lora.down.weight")])
            theirs.add(name)
    assert theirs == {f"unet.{p}" for p in attn + conv}


def test_sdxl_unet_single_file_names_match_diffusers_converter(sdxl_meta):
    """Every UNet tensor: our diffusers -> SGM names, fed to diffusers' single-file converter, come back identical."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = sdxl_meta[0]
    sd = unet.state_dict()
    ck = {}
    for k, v in sd.items():
        sgm, fuse, tr = fm.diffusers_to_sgm_key("unet", k)
        assert fuse is None and not tr
        ck[sgm] = v
        want = [f"unet.{k[: -len('.weight')]}"] if k.endswith(".weight") else [f"unet.{k[: -len('.bias')]}@bias"] if k.endswith(".bias") else []
        assert [t.canonical for t in fm.sgm_targets(sgm)] == want
    back = convert_ldm_unet_checkpoint(ck, dict(unet.config))
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_sdxl_text_encoder_counts_and_single_file_names(sdxl_meta):
    _, te1, te2 = sdxl_meta
    for comp, model, n in (("text_encoder", te1, 72), ("text_encoder_2", te2, 192)):
        mods = kohya_targets(model, ("CLIPAttention", "CLIPMLP"))
        assert len(mods) == n
        for path in mods:
            canon = f"{comp}.{path}"
            assert target_kind(canon, 2) == "te"
            assert fm.kohya_to_canonical(fm.canonical_to_kohya(canon)) == canon
            assert fm.canonical_to_kohya(canon).startswith("lora_te1_" if comp == "text_encoder" else "lora_te2_")
        # every LoRA target has a home in the single file (OpenCLIP-G: q/k/v are thirds of in_proj)
        homes = {}
        for k, v in model.state_dict().items():
            m = fm.diffusers_to_sgm_key(comp, k)
            if m is None:
                continue
            for t in fm.sgm_targets(m[0]):
                homes[t.canonical] = t
        assert {f"{comp}.{p}" for p in mods} <= set(homes)
        if comp == "text_encoder_2":
            assert [homes[f"text_encoder_2.text_model.encoder.layers.3.self_attn.{x}_proj"].rows for x in "qkv"] == [(0, 3), (1, 3), (2, 3)]
            assert homes["text_encoder_2.text_projection"].transpose


def test_openclip_fused_names_match_diffusers_converter(tmp_path):
    """Tiny bigG-shaped encoder (the kit's SDXL text_encoder_2): our SGM layout, converted back by
    diffusers' open_clip converter, is the same model."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from pycore.lora.checkpoint import sgm_entries
    from tests.kit.diffusion import build_tiny_models

    te2 = build_tiny_models(tmp_path / "tok", sdxl=True, full_layout=True).text_encoder_2
    sd = te2.state_dict()
    plan = sgm_entries({"text_encoder_2": {k: ("F32", tuple(v.shape)) for k, v in sd.items()}})
    ck = {}
    for key, _, shape, src in plan:
        parts = [sd[k].T if tr else sd[k] for _, k, _, tr in src]
        ck[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
        assert tuple(ck[key].shape) == shape
    back = convert_open_clip_checkpoint(te2, ck, prefix=fm.SGM_TE2)
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    assert {k for k in sd if "position_ids" not in k} == set(back)


def test_kohya_names_from_the_field():
    c = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert fm.canonical_to_kohya(c) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert fm.canonical_to_kohya(c, "diffusers") == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert fm.kohya_to_canonical("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert fm.kohya_to_canonical("lora_unet_output_blocks_2_2_conv") == "unet.up_blocks.0.upsamplers.0.conv"
    assert fm.kohya_to_canonical("lora_unet_input_blocks_3_0_op") == "unet.down_blocks.0.downsamplers.0.conv"
    assert fm.kohya_to_canonical("lora_unet_middle_block_2_in_layers_2") == "unet.mid_block.resnets.1.conv1"
    assert fm.kohya_to_canonical("lora_unet_input_blocks_4_1_transformer_blocks_0_attn9_to_q") is None
    assert fm.kohya_to_canonical("lora_vae_decoder_conv_in") is None


def test_stream_writer_reader_interop(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.tensor(2.5), "d": torch.zeros(0, 3),
               "e": torch.arange(6, dtype=torch.int64).reshape(2, 3), "f": torch.randn(2, 2).half()}  # fmt: skip
    p = tmp_path / "x.safetensors"
    save_tensors(p, tensors, {"k": "v"})
    theirs = load_file(p)
    assert set(theirs) == set(tensors) and all(torch.equal(theirs[k], tensors[k]) for k in tensors)
    q = tmp_path / "y.safetensors"
    save_file(tensors, q, metadata={"k": "v"})
    ours, meta = load_tensors(q)
    assert meta == {"k": "v"} and all(torch.equal(ours[k], tensors[k]) and ours[k].dtype == tensors[k].dtype for k in tensors)
    with pytest.raises(HwError, match="exists"):
        save_tensors(p, tensors)
    import hashlib

    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert file_body_sha256(p) == hashlib.sha256(raw[8 + n :]).hexdigest()


def test_stream_writer_rejects_misuse(tmp_path):
    w = SafeWriter(tmp_path / "z.safetensors", [("a", "F32", (2,)), ("b", "F16", (1,))])
    with pytest.raises(LoraError, match="out of order"):
        w.write("b", torch.zeros(1, dtype=torch.float16))
    with pytest.raises(LoraError, match="header says"):
        w.write("a", torch.zeros(3))
    with pytest.raises(LoraError, match="only 0 of 2"):
        w.close()


def test_reader_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(LoraError, match="not a safetensors file"):
        SafeReader(bad)
    short = tmp_path / "short.safetensors"
    save_tensors(short, {"a": torch.zeros(100)})
    short.write_bytes(short.read_bytes()[:-8])
    with pytest.raises(LoraError, match="offsets"):
        SafeReader(short)
