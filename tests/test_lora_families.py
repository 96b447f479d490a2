"""Every LoRA family and layout merges exactly: checked against an independent re-implementation
of each formula (loops and explicit products, not hw's code) on tiny SDXL- and SD1.5-layout
single-file checkpoints, and DoRA against PEFT's own merge."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pycore.lora.io import LoraError, load_tensors, save_tensors  # noqa: E402
from pycore.lora.merge import LoraSpec, merge_into_checkpoint  # noqa: E402

U = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
TE2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
Q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
CONV = U + "input_blocks.1.0.in_layers.2.weight"
CONVB = U + "input_blocks.1.0.in_layers.2.bias"
NORM = U + "input_blocks.1.0.in_layers.0.weight"
PIN = U + "middle_block.1.proj_in.weight"
KQ, KCONV, KPIN = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_middle_block_1_proj_in"
KTE1, KTE2V = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"


def rnd(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def sdxl_base(path):
    sd = {Q: rnd(32, 24), CONV: rnd(16, 8, 3, 3), CONVB: rnd(16), NORM: rnd(8) + 1, PIN: rnd(32, 32), TE1: rnd(20, 20), TE2: rnd(72, 24),
          "first_stage_model.decoder.conv_in.weight": rnd(8, 4, 3, 3)}  # fmt: skip
    save_tensors(path, sd)
    return sd


# --- the reference: each family's ΔW written out by hand -----------------------------------------


def ref_lora(up, down, alpha):
    r = down.shape[0]
    return (alpha / r) * (up.flatten(1) @ down.flatten(1))


def ref_tucker(t, wb, wa):
    """Σ_ij t[i,j,k,l] wa[i,p] wb[j,r] → [p, r, k, l], with loops over the core's ranks."""
    out = torch.zeros(wa.shape[1], wb.shape[1], t.shape[2], t.shape[3])
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out += wa[i][:, None, None, None] * wb[j][None, :, None, None] * t[i, j][None, None]
    return out


def ref_kron(a, b):
    out = torch.zeros(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0] : (i + 1) * b.shape[0], j * b.shape[1] : (j + 1) * b.shape[1]] = a[i, j] * b
    return out


def ref_dora(w, dw, m, on_out=True):
    v = w + dw
    if on_out:
        n = torch.stack([v[i].norm() for i in range(v.shape[0])]).reshape(-1, *[1] * (v.dim() - 1))
    else:
        n = torch.stack([v[:, j].norm() for j in range(v.shape[1])]).reshape(1, -1, *[1] * (v.dim() - 2))
    return m.reshape(n.shape) * v / n - w


def test_every_family_and_layout_merges_exactly_into_sdxl(tmp_path):
    base = sdxl_base(tmp_path / "base.safetensors")
    want = {k: v.clone() for k, v in base.items()}
    files = []

    def add(name, sd, weight, deltas):
        save_tensors(tmp_path / name, sd)
        files.append(LoraSpec(tmp_path / name, weight))
        for key, d in deltas.items():
            if key == "te2v":
                want[TE2][48:72] += weight * d
            else:
                want[key] += weight * d.reshape(want[key].shape)

    # LoHa (linear) + LoHa conv without Tucker, kohya SGM names
    a = {s: rnd(*sh) for s, sh in (("q1a", (32, 2)), ("q1b", (2, 24)), ("q2a", (32, 2)), ("q2b", (2, 24)),
                                   ("c1a", (16, 3)), ("c1b", (3, 72)), ("c2a", (16, 3)), ("c2b", (3, 72)))}  # fmt: skip
    add("loha.safetensors", {f"{KQ}.hada_w1_a": a["q1a"], f"{KQ}.hada_w1_b": a["q1b"], f"{KQ}.hada_w2_a": a["q2a"], f"{KQ}.hada_w2_b": a["q2b"],
                             f"{KQ}.alpha": torch.tensor(1.0), f"{KCONV}.hada_w1_a": a["c1a"], f"{KCONV}.hada_w1_b": a["c1b"],
                             f"{KCONV}.hada_w2_a": a["c2a"], f"{KCONV}.hada_w2_b": a["c2b"]},  # fmt: skip
        0.7, {Q: 0.5 * (a["q1a"] @ a["q1b"]) * (a["q2a"] @ a["q2b"]), CONV: (a["c1a"] @ a["c1b"]) * (a["c2a"] @ a["c2b"])})
    # LoHa with Tucker cores on the 3×3 conv, LyCORIS names in the diffusers layout
    t1, t2, w1a, w1b, w2a, w2b = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3), rnd(2, 16), rnd(2, 8), rnd(2, 16), rnd(2, 8)
    k = "lora_unet_down_blocks_0_resnets_0_conv1"
    add("loha_tucker.safetensors", {f"{k}.hada_t1": t1, f"{k}.hada_t2": t2, f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b,
                                    f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b, f"{k}.alpha": torch.tensor(4.0)},  # fmt: skip
        -0.3, {CONV: 2.0 * ref_tucker(t1, w1b, w1a) * ref_tucker(t2, w2b, w2a)})
    # LoKr: full factors (scale 1, alpha ignored), factorised w2 (scale alpha/dim), text encoder 2's fused v
    f1, f2, g1, g2a, g2b, h1, h2 = rnd(4, 4), rnd(8, 6), rnd(4, 4), rnd(8, 2), rnd(2, 8), rnd(4, 4), rnd(6, 6)
    add("lokr.safetensors", {f"{KQ}.lokr_w1": f1, f"{KQ}.lokr_w2": f2, f"{KQ}.alpha": torch.tensor(99.0),
                             f"{KPIN}.lokr_w1": g1, f"{KPIN}.lokr_w2_a": g2a, f"{KPIN}.lokr_w2_b": g2b, f"{KPIN}.alpha": torch.tensor(4.0),
                             f"{KTE2V}.lokr_w1": h1, f"{KTE2V}.lokr_w2": h2},  # fmt: skip
        1.0, {Q: ref_kron(f1, f2), PIN: 2.0 * ref_kron(g1, g2a @ g2b), "te2v": ref_kron(h1, h2)})
    # LoCon with a Tucker mid core
    up, mid, down = rnd(16, 3, 1, 1), rnd(3, 3, 3, 3), rnd(3, 8, 1, 1)
    ref = torch.einsum("oa,abkl,bi->oikl", up.flatten(1), mid, down.flatten(1)) * (6.0 / 3)
    add("locon_mid.safetensors", {f"{KCONV}.lora_up.weight": up, f"{KCONV}.lora_mid.weight": mid, f"{KCONV}.lora_down.weight": down,
                                  f"{KCONV}.alpha": torch.tensor(6.0)}, 0.5, {CONV: ref})  # fmt: skip
    # DoRA, kohya/LyCORIS dora_scale on the output axis (to_q) and the input axis (CLIP-L q_proj)
    qu, qd, mq, tu, td, mt = rnd(32, 2), rnd(2, 24), rnd(32, 1).abs() + 1, rnd(20, 2), rnd(2, 20), rnd(1, 20).abs() + 1
    add("dora.safetensors", {f"{KQ}.lora_up.weight": qu, f"{KQ}.lora_down.weight": qd, f"{KQ}.alpha": torch.tensor(1.0), f"{KQ}.dora_scale": mq,
                             f"{KTE1}.lora_up.weight": tu, f"{KTE1}.lora_down.weight": td, f"{KTE1}.dora_scale": mt},  # fmt: skip
        0.8, {Q: ref_dora(base[Q], ref_lora(qu, qd, 1.0), mq), TE1: ref_dora(base[TE1], ref_lora(tu, td, 2.0), mt, on_out=False)})
    # IA3 on proj_in (output axis)
    s = rnd(32)
    add("ia3.safetensors", {f"{KPIN}.weight": s, f"{KPIN}.on_input": torch.tensor(False)}, 2.0, {PIN: base[PIN] * s[:, None]})
    # ComfyUI "Save LoRA" layout: lora_up/down, .diff_b on a bias, .diff on a norm weight, both text encoders
    cu, cd, bd, nd, lu, ld, gu, gd = rnd(32, 2), rnd(2, 24), rnd(16), rnd(8), rnd(20, 1), rnd(1, 20), rnd(24, 3), rnd(3, 24)
    te = "text_encoders.clip_{}.transformer.text_model.encoder.layers.0.self_attn.{}_proj"
    add("comfy.safetensors", {"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up.weight": cu,
                              "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight": cd,
                              "diffusion_model.input_blocks.1.0.in_layers.2.diff_b": bd, "diffusion_model.input_blocks.1.0.in_layers.0.diff": nd,
                              te.format("l", "q") + ".lora_up.weight": lu, te.format("l", "q") + ".lora_down.weight": ld,
                              te.format("g", "v") + ".lora_up.weight": gu, te.format("g", "v") + ".lora_down.weight": gd},  # fmt: skip
        -1.0, {Q: cu @ cd, CONVB: bd, NORM: nd, TE1: lu @ ld, "te2v": gu @ gd})  # no alpha stored: alpha = rank
    # PEFT-style DoRA in a diffusers file (lora_A/lora_B + lora_magnitude_vector, alpha from metadata-less default: alpha = r)
    pa, pb, pm = rnd(2, 32), rnd(32, 2), rnd(32).abs() + 1
    p = "unet.mid_block.attentions.0.proj_in"
    add("peft_dora.safetensors", {f"{p}.lora_A.weight": pa, f"{p}.lora_B.weight": pb, f"{p}.lora_magnitude_vector": pm}, 0.5,
        {PIN: ref_dora(base[PIN], pb @ pa, pm)})

    rep = merge_into_checkpoint(tmp_path / "base.safetensors", files, tmp_path / "out.safetensors")
    assert rep.base_family == "sdxl"
    fams = {f for lo in rep.loras for f in lo["families"]}
    assert {"loha", "loha-tucker", "lokr", "lokr-factorised", "locon-tucker", "dora+lora", "ia3", "full", "lora"} <= fams
    out, _ = load_tensors(tmp_path / "out.safetensors")
    for k in base:
        torch.testing.assert_close(out[k], want[k], atol=2e-5, rtol=2e-5, msg=k)


def test_dora_matches_peft_merge(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(24, 32, bias=False)
            self.conv = torch.nn.Conv2d(8, 16, 3, bias=False)

    torch.manual_seed(0)
    m = get_peft_model(M(), LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "conv"], use_dora=True))
    with torch.no_grad():
        for n, prm in m.named_parameters():
            if "lora_" in n:
                prm.add_(torch.randn_like(prm) * 0.3)
    sd = get_peft_model_state_dict(m)
    names = {"base_model.model.lin": Q, "base_model.model.conv": CONV}
    base = sdxl_base(tmp_path / "base.safetensors")
    base[Q], base[CONV] = m.base_model.model.lin.base_layer.weight.detach().clone(), m.base_model.model.conv.base_layer.weight.detach().clone()
    save_tensors(tmp_path / "base.safetensors", base, overwrite=True)
    ren = {"base_model.model.lin": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "base_model.model.conv": "unet.down_blocks.0.resnets.0.conv1"}
    lora = {}
    for k, v in sd.items():
        mod = next(x for x in ren if k.startswith(x + "."))
        lora[ren[mod] + k[len(mod) :]] = v.detach()
    save_tensors(tmp_path / "dora.safetensors", lora, {"lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": 3}'})
    merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "dora.safetensors")], tmp_path / "out.safetensors")
    out, _ = load_tensors(tmp_path / "out.safetensors")
    merged = m.merge_and_unload()
    torch.testing.assert_close(out[Q], merged.lin.weight.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[CONV], merged.conv.weight.detach(), atol=1e-5, rtol=1e-5)
    assert set(names.values()) <= set(out)


def test_sd15_loha_merges_and_families_do_not_mix(tmp_path):
    q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    base = {q: rnd(16, 16), te: rnd(12, 12)}
    save_tensors(tmp_path / "sd15.safetensors", base)
    w = {n: rnd(*s) for n, s in (("a", (16, 2)), ("b", (2, 16)), ("c", (16, 2)), ("d", (2, 16)), ("e", (12, 2)), ("f", (2, 12)), ("g", (12, 2)), ("h", (2, 12)))}
    k1, k2 = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_tensors(tmp_path / "l.safetensors", {f"{k1}.hada_w1_a": w["a"], f"{k1}.hada_w1_b": w["b"], f"{k1}.hada_w2_a": w["c"], f"{k1}.hada_w2_b": w["d"],
                                             f"{k2}.hada_w1_a": w["e"], f"{k2}.hada_w1_b": w["f"], f"{k2}.hada_w2_a": w["g"], f"{k2}.hada_w2_b": w["h"]})  # fmt: skip
    rep = merge_into_checkpoint(tmp_path / "sd15.safetensors", [LoraSpec(tmp_path / "l.safetensors", 2.0)], tmp_path / "o.safetensors")
    assert rep.base_family == "sd15" and rep.loras[0]["base"] == "sd15"
    out, _ = load_tensors(tmp_path / "o.safetensors")
    torch.testing.assert_close(out[q], base[q] + 2 * (w["a"] @ w["b"]) * (w["c"] @ w["d"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[te], base[te] + 2 * (w["e"] @ w["f"]) * (w["g"] @ w["h"]), atol=1e-5, rtol=1e-5)
    sdxl_base(tmp_path / "xl.safetensors")
    for allow in (False, True):
        with pytest.raises(LoraError, match="SD1.5 LoRA .* is an SDXL checkpoint"):
            merge_into_checkpoint(tmp_path / "xl.safetensors", [LoraSpec(tmp_path / "l.safetensors")], tmp_path / "x.safetensors", allow_unused=allow)
    assert not (tmp_path / "x.safetensors").exists()


def _merge_fails(tmp_path, sd, match):
    save_tensors(tmp_path / "bad.safetensors", sd, overwrite=True)
    with pytest.raises(LoraError, match=match) as e:
        merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "bad.safetensors")], tmp_path / "out.safetensors")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_malformed_family_files_name_the_key(tmp_path):
    sdxl_base(tmp_path / "base.safetensors")
    loha = {f"{KQ}.hada_w1_a": rnd(32, 2), f"{KQ}.hada_w1_b": rnd(2, 24), f"{KQ}.hada_w2_a": rnd(32, 2), f"{KQ}.hada_w2_b": rnd(2, 24)}
    _merge_fails(tmp_path, {k: v for k, v in loha.items() if not k.endswith("w2_b")}, f"lacks {KQ}.hada_w2_b")
    _merge_fails(tmp_path, {**loha, f"{KQ}.hada_w2_b": rnd(2, 20)}, "LoHa halves differ in shape")
    _merge_fails(tmp_path, {**loha, f"{KQ}.hada_w1_b": torch.full((2, 24), float("nan"))}, "to_q \\(hada_w1_b\\) contains NaN/Inf")
    _merge_fails(tmp_path, {f"{KQ}.lokr_w1": rnd(4, 4), f"{KQ}.lokr_w2": rnd(8, 5)}, "shape mismatch .*to_q: LoKr: kron of the factors is \\[32, 20\\]")
    _merge_fails(tmp_path, {f"{KQ}.lokr_w1": rnd(4, 4)}, "LoKr needs lokr_w2")
    _merge_fails(tmp_path, {f"{KQ}.dora_scale": rnd(32, 1)}, f"{KQ}.dora_scale: a DoRA magnitude without")
    _merge_fails(tmp_path, {**loha, f"{KQ}.lora_zzz": rnd(2)}, f"not LoRA keys hw understands: {KQ}.lora_zzz")


def test_module_named_twice(tmp_path):
    sdxl_base(tmp_path / "base.safetensors")
    up, down = rnd(32, 2), rnd(2, 24)
    comfy = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    sd = {f"{KQ}.lora_up.weight": up, f"{KQ}.lora_down.weight": down, f"{comfy}.lora_up.weight": up.clone(), f"{comfy}.lora_down.weight": down.clone()}
    save_tensors(tmp_path / "twice.safetensors", sd)
    warned: list[str] = []
    merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "twice.safetensors")], tmp_path / "o.safetensors", warn=warned.append)
    assert any("named twice" in w and KQ in w and comfy in w for w in warned)
    _merge_fails(tmp_path, {**sd, f"{comfy}.lora_up.weight": up + 1}, "stored twice with different values")
