"""LoRA tools against the real ecosystem on a tiny SDXL pipeline: diffusers' load_lora_weights,
convert_state_dict_to_kohya, PEFT adapters, single-file (SGM) and diffusers-folder checkpoints."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.lora import formats as fm  # noqa: E402
from pycore.lora.checkpoint import save_single_file  # noqa: E402
from pycore.lora.convert import load_lora, save_lora  # noqa: E402
from pycore.lora.io import load_tensors  # noqa: E402
from pycore.lora.layers import LoraLayer, LoraSet  # noqa: E402
from pycore.lora.merge import LoraSpec, merge_into_checkpoint  # noqa: E402
from tests.kit.diffusion import save_tiny_pipeline, tiny_unet_config  # noqa: E402

#: The UNet of the `tiny` pipeline: SDXL's three levels and two layers per block (tests.kit).
TINY_UNET = tiny_unet_config(sdxl=True, full_layout=True, levels=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The kit's tiny SDXL pipeline (three levels, full layout) as a diffusers folder and as a single SGM-named file."""
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "base"
    pipe = save_tiny_pipeline(folder, sdxl=True, full_layout=True, levels=3)
    single = root / "base.safetensors"
    save_single_file({"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
                      "text_encoder_2": pipe.text_encoder_2.state_dict()}, single)  # fmt: skip
    return {"root": root, "pipe": pipe, "folder": folder, "single": single}


def random_lora(pipe, seed: int = 1, rank: int = 2, alpha: float = 3.0) -> LoraSet:
    """A LoRA on attention, conv (3x3 and 1x1) and both text encoders' layers, with alpha != rank."""
    g = torch.Generator().manual_seed(seed)
    mods = {"unet": dict(pipe.unet.named_modules()), "text_encoder": dict(pipe.text_encoder.named_modules()), "text_encoder_2": dict(pipe.text_encoder_2.named_modules())}
    picks = [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), ("unet", "down_blocks.1.attentions.0.proj_in"),
        ("unet", "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj"), ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0"),
        ("unet", "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"), ("unet", "down_blocks.0.resnets.1.conv1"),
        ("unet", "up_blocks.0.resnets.0.conv_shortcut"), ("unet", "down_blocks.0.downsamplers.0.conv"), ("unet", "up_blocks.0.upsamplers.0.conv"),
        ("unet", "mid_block.resnets.1.time_emb_proj"),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj"), ("text_encoder", "encoder.layers.1.mlp.fc2"),
        ("text_encoder_2", "text_model.encoder.layers.0.self_attn.k_proj"), ("text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj"),
        ("text_encoder_2", "text_model.encoder.layers.1.self_attn.q_proj"), ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
    ]  # fmt: skip
    out = LoraSet()
    for comp, path in picks:
        w = mods[comp][path].weight
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
        out.layers[f"{comp}.{fm.te_path(path) if comp != 'unet' else path}"] = LoraLayer(down, up, alpha)
    return out


def unet_inputs(pipe):
    g, c = torch.Generator().manual_seed(5), pipe.unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 6, c.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.randn(1, 6, generator=g)})  # fmt: skip


def load_folder_models(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return (UNet2DConditionModel.from_pretrained(folder / "unet"), CLIPTextModel.from_pretrained(folder / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sgm", "diffusers"])
def test_kohya_export_loads_in_diffusers_like_our_merge(tiny, tmp_path, layout):
    """UNet: diffusers' own load_lora_weights on our kohya file == our merged checkpoint.

    Text encoders: PEFT's own adapter on our peft export == our merged encoders. (diffusers 0.42's
    kohya text-encoder path does not load into transformers 5 CLIP models, so it is not the reference.)
    """
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel

    lora = random_lora(tiny["pipe"])
    path = tmp_path / "lora.safetensors"
    save_lora(lora, path, "kohya", layout=layout)
    unet_only = tmp_path / "lora_unet.safetensors"
    save_lora(LoraSet({k: v for k, v in lora.layers.items() if k.startswith("unet.")}), unet_only, "kohya", layout=layout)
    peft_dir = tmp_path / "peft"
    save_lora(lora, peft_dir, "peft")
    merged = tmp_path / "merged"
    rep = merge_into_checkpoint(tiny["folder"], [LoraSpec(path, 0.7)], merged)
    assert rep.modules_merged == {"text_encoder": 2, "text_encoder_2": 4, "unet": 10}
    unet_m, te1_m, te2_m = load_folder_models(merged)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["folder"])
    pipe.load_lora_weights(str(unet_only), adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    inp = unet_inputs(pipe)
    with torch.no_grad():
        ours = unet_m(**inp).sample
        theirs = pipe.unet(**inp).sample
        base = tiny["pipe"].unet(**inp).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    _, _, te2_base = load_folder_models(tiny["folder"])
    te2_peft = PeftModel.from_pretrained(te2_base, peft_dir / "text_encoder_2")
    for mod in te2_peft.modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
            mod.scaling["default"] *= 0.7  # the strength we merged with
    tok = tiny["pipe"].tokenizer
    ids = torch.tensor([[tok.bos_token_id, 5, 9, 30, tok.eos_token_id, tok.eos_token_id]])
    with torch.no_grad():
        torch.testing.assert_close(te2_m(ids).text_embeds, te2_peft(input_ids=ids).text_embeds, atol=1e-4, rtol=0)
    te1_base = tiny["pipe"].text_encoder.state_dict()
    for k, layer in lora.layers.items():
        if k.startswith("text_encoder."):
            key = fm.split_canonical(k)[1].removeprefix("text_model.") + ".weight"
            torch.testing.assert_close(te1_m.state_dict()[key], te1_base[key] + 0.7 * layer.delta(), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_diffusers_format_loads_in_diffusers(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    lora = random_lora(tiny["pipe"], seed=3)
    lora.layers = {k: v for k, v in lora.layers.items() if k.startswith("unet.")}
    pin = lora.layers["unet.down_blocks.1.attentions.0.proj_in"]
    lora.layers["unet.down_blocks.1.attentions.0.proj_in"] = LoraLayer(pin.down[:1], pin.up[:, :1], 5.0)  # other rank and alpha
    path = tmp_path / "lora_diffusers.safetensors"
    save_lora(lora, path, "diffusers")
    merged = tmp_path / "merged"
    merge_into_checkpoint(tiny["folder"], [LoraSpec(path)], merged)
    unet_m, _, _ = load_folder_models(merged)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["folder"])
    pipe.load_lora_weights(str(path))
    inp = unet_inputs(pipe)
    with torch.no_grad():
        torch.testing.assert_close(unet_m(**inp).sample, pipe.unet(**inp).sample, atol=1e-4, rtol=0)


def test_reads_diffusers_convert_state_dict_to_kohya(tiny, tmp_path):
    """A PEFT adapter on the tiny UNet -> diffusers' convert_state_dict_to_kohya -> our reader: same deltas."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    sd = get_peft_model_state_dict(unet)
    for k in sd:  # gaussian init leaves lora_B at zero; give it values
        if "lora_B" in k:
            sd[k] = torch.randn_like(sd[k])
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in sd.items()})
    p = tmp_path / "from_diffusers.safetensors"
    save_file(kohya, p)
    lora = load_lora(p)
    assert lora.source_format == "kohya"
    assert len(lora.layers) == len(sd) // 2
    for k, layer in lora.layers.items():
        path = fm.split_canonical(k)[1]
        want = (sd[f"{path}.lora_B.weight"].flatten(1) @ sd[f"{path}.lora_A.weight"].flatten(1)).reshape(layer.delta_shape)
        torch.testing.assert_close(layer.delta(), want)


def test_save_lora_from_peft_model_keeps_alpha(tmp_path):
    from peft import LoraConfig

    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v"], rank_pattern={"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2}))
    mods = dict(unet.named_modules())
    for name, m in mods.items():
        if name.endswith("lora_B.default"):
            torch.nn.init.normal_(m.weight)
    for fmt in ("kohya", "diffusers", "peft"):
        out = tmp_path / f"spo_{fmt}{'.safetensors' if fmt != 'peft' else ''}"
        rep = save_lora(unet, out, fmt, metadata={"hw_config": "{}"})
        back = load_lora(out)
        n_adapted = sum(name.endswith("lora_A.default") for name in mods)
        assert rep.layers == len(back.layers) == n_adapted == 68  # to_q, to_v of attn1 and attn2 in 17 transformer blocks
        for k, layer in back.layers.items():
            path = fm.split_canonical(k)[1]
            r = 2 if path == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" else 4
            assert layer.rank == r and layer.scale == 8 / r
            want = 8 / r * (mods[f"{path}.lora_B.default"].weight @ mods[f"{path}.lora_A.default"].weight)
            torch.testing.assert_close(layer.delta(), want.detach())


def test_single_file_merge_matches_folder_merge_including_fused_qkv(tiny, tmp_path):
    lora = random_lora(tiny["pipe"], seed=4)
    path = tmp_path / "l.safetensors"
    save_lora(lora, path, "kohya")
    out_single = tmp_path / "merged.safetensors"
    rep = merge_into_checkpoint(tiny["single"], [LoraSpec(path, 1.5)], out_single, dtype="fp32")
    assert rep.modules_merged["text_encoder_2"] == 4
    merged, meta = load_tensors(out_single)
    base, _ = load_tensors(tiny["single"])
    assert json.loads(meta["hw_merge"])["loras"][0]["weight"] == 1.5
    # OpenCLIP-G fused in_proj: k delta lands on rows d..2d only
    key = fm.SGM_TE2 + "transformer.resblocks.0.attn.in_proj_weight"
    d = tiny["pipe"].text_encoder_2.config.hidden_size
    k_delta = 1.5 * lora.layers["text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"].delta()
    torch.testing.assert_close(merged[key][d : 2 * d], base[key][d : 2 * d] + k_delta)
    assert torch.equal(merged[key][:d], base[key][:d]) and torch.equal(merged[key][2 * d :], base[key][2 * d :])
    # same numbers as the diffusers-folder merge, tensor by tensor
    out_folder = tmp_path / "merged_folder"
    merge_into_checkpoint(tiny["folder"], [LoraSpec(path, 1.5)], out_folder)
    unet_m, te1_m, te2_m = load_folder_models(out_folder)
    for comp, model in (("unet", unet_m), ("text_encoder", te1_m), ("text_encoder_2", te2_m)):
        sd = model.state_dict()
        for k, v in sd.items():
            m = fm.diffusers_to_sgm_key(comp, k)
            if m is None:
                continue
            sgm, fuse, tr = m
            got = merged[sgm]
            if fuse is not None:
                got = got[fuse * v.shape[0] : (fuse + 1) * v.shape[0]]
            torch.testing.assert_close(got.T if tr else got, v, atol=1e-6, rtol=0)
    for rel in ("model_index.json", "tokenizer/tokenizer_config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert (out_folder / rel).read_bytes() == (tiny["folder"] / rel).read_bytes()  # the rest of the folder is copied
