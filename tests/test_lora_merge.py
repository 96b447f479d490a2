"""Merge / extract / convert math and error handling on small SGM-named checkpoints, through the API and the CLI."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from pycore.lora import formats as fm  # noqa: E402
from pycore.lora.convert import convert_lora, load_lora, save_lora  # noqa: E402
from pycore.lora.extract import SvdOptions, extract_lora, factorize  # noqa: E402
from pycore.lora.io import LoraError, file_body_sha256, load_tensors, save_tensors  # noqa: E402
from pycore.lora.layers import LoraLayer, LoraSet  # noqa: E402
from pycore.lora.combine import concat_loras, merge_loras  # noqa: E402
from pycore.lora.merge import LoraSpec, merge_into_checkpoint  # noqa: E402

U = fm.SGM_UNET
Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.0.resnets.0.conv1"
PIN = "unet.mid_block.attentions.0.proj_in"
TE1 = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
TE2V = "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj"


def make_base(path, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        f"{U}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(32, 24, generator=g),
        f"{U}input_blocks.1.0.in_layers.2.weight": torch.randn(16, 8, 3, 3, generator=g),
        f"{U}input_blocks.1.0.in_layers.2.bias": torch.randn(16, generator=g),
        f"{U}middle_block.1.proj_in.weight": torch.randn(32, 32, generator=g),
        f"{fm.SGM_TE1}text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(20, 20, generator=g),
        f"{fm.SGM_TE2}transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * 24, 24, generator=g),
        f"{fm.SGM_TE2}transformer.resblocks.0.attn.in_proj_bias": torch.randn(3 * 24, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.step": torch.tensor([7], dtype=torch.int64),
    }
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_tensors(path, sd, {"modelspec.title": "tiny"})
    return sd


def make_lora(seed=1, rank=3, alpha=6.0, which=(Q, CONV, PIN, TE1, TE2V)) -> LoraSet:
    g = torch.Generator().manual_seed(seed)
    shapes = {Q: (32, 24), CONV: (16, 8, 3, 3), PIN: (32, 32), TE1: (20, 20), TE2V: (24, 24)}
    ls = LoraSet()
    for k in which:
        s = shapes[k]
        if len(s) == 4:
            ls.layers[k] = LoraLayer(torch.randn(rank, s[1], 3, 3, generator=g), torch.randn(s[0], rank, 1, 1, generator=g), alpha)
        else:
            ls.layers[k] = LoraLayer(torch.randn(rank, s[1], generator=g), torch.randn(s[0], rank, generator=g), alpha)
    return ls


BASE_KEY = {Q: f"{U}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", CONV: f"{U}input_blocks.1.0.in_layers.2.weight",
            PIN: f"{U}middle_block.1.proj_in.weight", TE1: f"{fm.SGM_TE1}text_model.encoder.layers.0.self_attn.q_proj.weight"}  # fmt: skip


def module_weight(sd, canon):
    if canon == TE2V:
        return sd[f"{fm.SGM_TE2}transformer.resblocks.0.attn.in_proj_weight"][48:72]
    return sd[BASE_KEY[canon]]


def test_weighted_multi_lora_merge_is_exact(tmp_path):
    base = make_base(tmp_path / "base.safetensors")
    a, b = make_lora(1, rank=3, alpha=6.0), make_lora(2, rank=5, alpha=1.0, which=(Q, CONV, TE2V))
    save_lora(a, tmp_path / "a.safetensors", "kohya")
    save_lora(b, tmp_path / "b.safetensors", "diffusers")
    rep = merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec.parse(f"{tmp_path}/a.safetensors:0.5"), LoraSpec.parse(f"{tmp_path}/b.safetensors:-1")], tmp_path / "out.safetensors")
    out, meta = load_tensors(tmp_path / "out.safetensors")
    assert list(out) == list(base) and meta["modelspec.title"] == "tiny"
    for canon in (Q, CONV, PIN, TE1, TE2V):
        want = module_weight(base, canon) + 0.5 * a.layers[canon].delta()
        if canon in b.layers:
            want = want - b.layers[canon].delta()
        torch.testing.assert_close(module_weight(out, canon), want, atol=1e-5, rtol=0)
    for k in ("first_stage_model.decoder.conv_in.weight", "model.diffusion_model.step", f"{U}input_blocks.1.0.in_layers.2.bias"):
        assert torch.equal(out[k], base[k])
    # q and k thirds of the fused OpenCLIP in_proj are untouched
    fused = f"{fm.SGM_TE2}transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(out[fused][:48], base[fused][:48])
    assert rep.modules_merged == {"text_encoder": 1, "text_encoder_2": 1, "unet": 3}


def test_dtype_is_cast_once(tmp_path):
    base = make_base(tmp_path / "base.safetensors", dtype=torch.float16)
    save_lora(make_lora(), tmp_path / "a.safetensors", "kohya")
    merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "a.safetensors")], tmp_path / "o16.safetensors")
    merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "a.safetensors")], tmp_path / "o32.safetensors", dtype="fp32")
    o16, o32 = load_tensors(tmp_path / "o16.safetensors")[0], load_tensors(tmp_path / "o32.safetensors")[0]
    assert o16[BASE_KEY[Q]].dtype == torch.float16 and o32[BASE_KEY[Q]].dtype == torch.float32
    assert o32["model.diffusion_model.step"].dtype == torch.int64
    assert torch.equal(o16[BASE_KEY[Q]], o32[BASE_KEY[Q]].half())  # fp32 math, one rounding
    assert torch.equal(o32["first_stage_model.decoder.conv_in.weight"], base["first_stage_model.decoder.conv_in.weight"].float())


def test_concat_merge_equals_weighted_sum_exactly(tmp_path):
    a, b = make_lora(1, rank=3, alpha=6.0), make_lora(2, rank=4, alpha=2.0, which=(Q, CONV))
    cat = concat_loras([(0.75, a), (-2.0, b)])
    for k, layer in cat.layers.items():
        want = 0.75 * a.layers[k].delta() + (-2.0 * b.layers[k].delta() if k in b.layers else 0)
        torch.testing.assert_close(layer.delta(), want, atol=1e-5, rtol=1e-6)
        assert layer.rank == 3 + (4 if k in b.layers else 0)
    # through the file API: exact concat, and SVD compression with an honest error report
    save_lora(a, tmp_path / "a.safetensors", "kohya")
    save_lora(b, tmp_path / "b.safetensors", "kohya")
    specs = [LoraSpec(tmp_path / "a.safetensors", 0.75), LoraSpec(tmp_path / "b.safetensors", -2.0)]
    merge_loras(specs, tmp_path / "cat.safetensors")
    back = load_lora(tmp_path / "cat.safetensors")
    for k in cat.layers:
        torch.testing.assert_close(back.layers[k].delta(), cat.layers[k].delta(), atol=1e-5, rtol=1e-6)
    rep = merge_loras(specs, tmp_path / "r2.safetensors", rank=2, svd="full")
    small = load_lora(tmp_path / "r2.safetensors")
    for k, layer in small.layers.items():
        d = cat.layers[k].delta()
        err = float(torch.linalg.norm(layer.delta() - d) / torch.linalg.norm(d))
        assert layer.rank == 2 and err == pytest.approx(rep.errors[k], rel=1e-3, abs=1e-5)
    assert rep.max_error > 0


def test_merge_then_extract_full_rank_reproduces_delta(tmp_path):
    base = make_base(tmp_path / "base.safetensors")
    lora = make_lora(3, rank=4)
    save_lora(lora, tmp_path / "l.safetensors", "kohya")
    merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "l.safetensors")], tmp_path / "tuned.safetensors")
    rep = extract_lora(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", tmp_path / "x.safetensors", SvdOptions(rank=72, method="full"), dtype="fp32")
    got = load_lora(tmp_path / "x.safetensors")
    assert set(got.layers) == set(lora.layers)
    for k, layer in got.layers.items():
        torch.testing.assert_close(layer.delta(), lora.layers[k].delta(), atol=2e-4, rtol=0)
    assert rep.kept_overall == pytest.approx(1.0, abs=1e-6)
    assert base  # the fixture wrote real tensors


def test_extract_recovers_known_low_rank_delta_and_energy(tmp_path):
    base = make_base(tmp_path / "base.safetensors")
    lora = make_lora(4, rank=3, which=(Q, CONV, PIN))
    tuned = dict(base)
    for k, layer in lora.layers.items():
        tuned[BASE_KEY[k]] = base[BASE_KEY[k]] + layer.delta()
    save_tensors(tmp_path / "tuned.safetensors", tuned)
    rep = extract_lora(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", tmp_path / "x.safetensors", SvdOptions(rank=3), dtype="fp32", fmt="diffusers")
    got = load_lora(tmp_path / "x.safetensors")
    assert rep.unchanged == {"text_encoder": 1, "text_encoder_2": 3}  # identical encoders are reported, not silently dropped
    for k in lora.layers:
        torch.testing.assert_close(got.layers[k].delta(), lora.layers[k].delta(), atol=2e-4, rtol=0)
    rep = extract_lora(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", tmp_path / "e.safetensors", SvdOptions(energy=0.9999, max_rank=16), dtype="fp32")
    assert {v.rank for v in load_lora(tmp_path / "e.safetensors").layers.values()} == {3}
    assert rep.kept_overall > 0.9999


def test_lowrank_svd_matches_full_svd_error():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(320, 320, generator=g))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    s = torch.logspace(0, -3, 256)
    d = u[:, :256] @ torch.diag(s) @ v.T + 1e-4 * torch.randn(320, 256, generator=g)
    full = factorize(d, SvdOptions(rank=16, method="full"))
    low = factorize(d, SvdOptions(rank=16, method="lowrank"))
    assert low.method == "lowrank" and full.method == "full"
    assert low.rel_error <= full.rel_error * 1.01
    actual = float(torch.linalg.norm(d - low.up @ low.down) / torch.linalg.norm(d))
    assert actual == pytest.approx(low.rel_error, rel=1e-3)
    clamped = factorize(d, SvdOptions(rank=16, clamp_quantile=0.9))
    assert clamped.rel_error >= full.rel_error and clamped.up.abs().max() <= low.up.abs().max()


def test_convert_roundtrip_is_lossless(tmp_path):
    lora = make_lora(5, rank=3, alpha=1.5)
    lora.layers[PIN] = LoraLayer(lora.layers[PIN].down[:2], lora.layers[PIN].up[:, :2], 7.0)
    save_lora(lora, tmp_path / "k.safetensors", "kohya")
    convert_lora(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")
    convert_lora(tmp_path / "d.safetensors", tmp_path / "p", "peft")
    convert_lora(tmp_path / "p", tmp_path / "k2.safetensors", "kohya", layout="diffusers")
    convert_lora(tmp_path / "k2.safetensors", tmp_path / "k3.safetensors", "kohya")
    for p in ("d.safetensors", "p", "k2.safetensors", "k3.safetensors"):
        back = load_lora(tmp_path / p)
        assert set(back.layers) == set(lora.layers)
        for k, layer in back.layers.items():
            assert torch.equal(layer.down, lora.layers[k].down) and torch.equal(layer.up, lora.layers[k].up)
            assert layer.alpha == lora.layers[k].alpha
    assert (tmp_path / "k.safetensors").read_bytes() == (tmp_path / "k3.safetensors").read_bytes()
    sd, meta = load_tensors(tmp_path / "k.safetensors")
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["sshs_model_hash"] == file_body_sha256(tmp_path / "k.safetensors")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj.alpha" in sd


def test_malformed_loras_fail_with_one_line_errors(tmp_path):
    make_base(tmp_path / "base.safetensors")
    good = make_lora()
    sd, _ = _kohya(good, tmp_path)
    cases = {
        "unknown": ({**sd, "lora_unet_foo_bar.lora_down.weight": torch.zeros(1, 1)}, "not LoRA keys hw understands: lora_unet_foo_bar"),
        "half": ({k: v for k, v in sd.items() if not k.endswith("attn1_to_q.lora_up.weight")}, "lack a LoRA half.*to_q \\(up missing\\)"),
        "nan": ({**sd, next(k for k in sd if k.endswith("lora_down.weight")): torch.full_like(sd[next(k for k in sd if k.endswith("lora_down.weight"))], float("nan"))}, "NaN/Inf"),
        "lycoris": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.zeros(2, 2)}, "LoHa module .*to_q lacks .*hada_w1_b"),
        "rank": ({**sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(20, 5)}, "ranks differ"),
    }
    for name, (bad, msg) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_tensors(p, bad)
        with pytest.raises(LoraError, match=msg) as e:
            merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(p)], tmp_path / f"o_{name}.safetensors")
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"o_{name}.safetensors").exists()
    # a LoRA for a layer of another shape
    wrong = LoraSet({Q: LoraLayer(torch.zeros(2, 30), torch.zeros(32, 2), 2.0)})
    save_lora(wrong, tmp_path / "wrong.safetensors", "kohya")
    with pytest.raises(LoraError, match="shape mismatch.*to_q: LoRA delta \\[32, 30\\] vs weight \\[32, 24\\]"):
        merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "wrong.safetensors")], tmp_path / "o.safetensors")


def _kohya(lora, tmp_path):
    save_lora(lora, tmp_path / "good.safetensors", "kohya")
    return load_tensors(tmp_path / "good.safetensors")


def test_unplaced_layers_fail_unless_allowed(tmp_path):
    make_base(tmp_path / "base.safetensors")
    extra = make_lora()
    extra.layers["unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"] = LoraLayer(torch.zeros(1, 8), torch.zeros(8, 1), 1.0)
    save_lora(extra, tmp_path / "x.safetensors", "kohya")
    with pytest.raises(LoraError, match="1 LoRA module\\(s\\) have no weight in base.safetensors: unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"):
        merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "x.safetensors")], tmp_path / "o.safetensors")
    warned = []
    rep = merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "x.safetensors")], tmp_path / "o.safetensors", allow_unused=True, warn=warned.append)
    assert len(rep.unused) == 1 and "have no weight" in warned[0]
    with pytest.raises(Exception, match="exists"):
        merge_into_checkpoint(tmp_path / "base.safetensors", [LoraSpec(tmp_path / "x.safetensors")], tmp_path / "o.safetensors", allow_unused=True)


def test_pickles_are_refused_unless_trusted(tmp_path):
    lora = make_lora(which=(Q,))
    sd, _ = _kohya(lora, tmp_path)
    torch.save(sd, tmp_path / "l.ckpt")
    with pytest.raises(LoraError, match="pickle file.*--trust-pickle"):
        load_lora(tmp_path / "l.ckpt")
    back = load_lora(tmp_path / "l.ckpt", trust_pickle=True)
    assert torch.equal(back.layers[Q].down, lora.layers[Q].down)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(LoraError, match="weights_only"):
        load_lora(tmp_path / "evil.pt", trust_pickle=True)


def test_cli_commands(hw, tmp_path):
    make_base(tmp_path / "base.safetensors")
    save_lora(make_lora(1), tmp_path / "a.safetensors", "diffusers")
    save_lora(make_lora(2, which=(Q,)), tmp_path / "b.safetensors", "kohya")
    r = hw("convert-lora", tmp_path / "a.safetensors", "--to", "kohya", "--out", tmp_path / "a_k.safetensors", "--json")
    assert r.code == 0, r.err
    assert r.json()["layers"] == 5 and r.json()["from"] == "diffusers"
    r = hw("merge-lora", tmp_path / "base.safetensors", f"{tmp_path}/a_k.safetensors:0.8", f"{tmp_path}/b.safetensors:0.2", "--out", tmp_path / "m.safetensors", "--dtype", "fp32", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert [lo["weight"] for lo in rep["loras"]] == [0.8, 0.2] and rep["dtype"] == "F32"
    r = hw("extract-lora", tmp_path / "m.safetensors", tmp_path / "base.safetensors", "--out", tmp_path / "x.safetensors", "--rank", "4", "--json")
    assert r.code == 0, r.err
    assert r.json()["layers"] == 5 and 0.9 < r.json()["kept_overall"] <= 1.0
    r = hw("extract-lora", tmp_path / "m.safetensors", tmp_path / "base.safetensors", "--out", tmp_path / "x2.safetensors", "--rank", "2")
    assert r.code == 0 and "overall" in r.err and "text_encoder" in r.err
    r = hw("merge-lora", "--into-lora", tmp_path / "a_k.safetensors", f"{tmp_path}/b.safetensors:-1", "--out", tmp_path / "ab", "--format", "peft")
    assert r.code == 0, r.err
    assert (tmp_path / "ab" / "unet" / "adapter_config.json").is_file()
    r = hw("merge-lora", tmp_path / "base.safetensors", tmp_path / "a_k.safetensors", "--out", tmp_path / "m.safetensors")
    assert r.code == 1 and "exists; pass --overwrite" in r.err and r.err.count("\n") == 1
    (tmp_path / "junk.pt").write_bytes(b"not really")
    r = hw("convert-lora", tmp_path / "junk.pt", "--to", "kohya", "--out", tmp_path / "j.safetensors")
    assert r.code == 1 and "--trust-pickle" in r.err
    r = hw("convert-lora", tmp_path / "a.safetensors", "--to", "webui", "--out", tmp_path / "j.safetensors")
    assert r.code == 1 and "--to must be one of" in r.err
