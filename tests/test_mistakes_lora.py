"""Issue 13, LoRA commands: each user mistake ends with one `hw: error:` line (no traceback), the
right exit code, and every input byte-identical afterwards; nothing is written."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from pycore.lora.io import save_tensors  # noqa: E402
from tests.conftest import assert_one_line_error, tree_digest  # noqa: E402

U = "model.diffusion_model."
Q = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
KQ = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
KTE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    base = {Q: torch.randn(32, 24, generator=g), te1: torch.randn(20, 20, generator=g), te2: torch.randn(72, 24, generator=g)}
    save_tensors(tmp_path / "base.safetensors", {k: v.half() for k, v in base.items()})
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_tensors(tmp_path / "tuned.safetensors", {k: v.half() for k, v in tuned.items()})
    save_tensors(tmp_path / "xl.safetensors", {f"{KQ}.lora_up.weight": torch.randn(32, 2, generator=g) * 30, f"{KQ}.lora_down.weight": torch.randn(2, 24, generator=g) * 30,
                                              f"{KTE2}.lora_up.weight": torch.randn(24, 2, generator=g), f"{KTE2}.lora_down.weight": torch.randn(2, 24, generator=g)})  # fmt: skip
    k15 = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_tensors(tmp_path / "sd15.safetensors", {f"{KQ}.lora_up.weight": torch.randn(32, 2, generator=g), f"{KQ}.lora_down.weight": torch.randn(2, 24, generator=g),
                                                f"{k15}.lora_up.weight": torch.randn(20, 2, generator=g), f"{k15}.lora_down.weight": torch.randn(2, 20, generator=g)})  # fmt: skip
    save_tensors(tmp_path / "loha.safetensors", {f"{KQ}.hada_w1_a": torch.randn(32, 2), f"{KQ}.hada_w1_b": torch.randn(2, 24), f"{KQ}.hada_w2_a": torch.randn(32, 2)})
    save_tensors(tmp_path / "loha_ok.safetensors", {f"{KQ}.hada_w1_a": torch.randn(32, 2), f"{KQ}.hada_w1_b": torch.randn(2, 24),
                                                   f"{KQ}.hada_w2_a": torch.randn(32, 2), f"{KQ}.hada_w2_b": torch.randn(2, 24)})  # fmt: skip
    os.link(tmp_path / "tuned.safetensors", tmp_path / "tuned_link.safetensors")
    return tmp_path


CASES = [
    # (name, argv with {d} for the folder, exit code, text in the error line)
    ("extract over its tuned input", "extract-lora {d}/tuned.safetensors {d}/base.safetensors --rank 2 --out {d}/tuned.safetensors --overwrite", 1, "also an input"),
    ("extract over a hard link of an input", "extract-lora {d}/tuned.safetensors {d}/base.safetensors --rank 2 --out {d}/tuned_link.safetensors --overwrite", 1, "also an input"),
    ("extract from a different family", "extract-lora {d}/tuned.safetensors {d}/xl.safetensors --rank 2 --out {d}/o.safetensors", 1, "no sdxl/sd1.5 single-file keys"),
    ("merge over the base", "merge-lora {d}/base.safetensors {d}/xl.safetensors --out {d}/base.safetensors --overwrite", 1, "also an input"),
    ("merge over a LoRA", "merge-lora {d}/base.safetensors {d}/xl.safetensors --out {d}/xl.safetensors --overwrite", 1, "also an input"),
    ("convert over its input", "convert-lora {d}/xl.safetensors --to kohya --out {d}/xl.safetensors --overwrite", 1, "also an input"),
    ("into-lora mixing SDXL and SD1.5", "merge-lora --into-lora {d}/xl.safetensors {d}/sd15.safetensors --out {d}/o.safetensors", 1, "different model families"),
    ("SD1.5 LoRA into SDXL", "merge-lora {d}/base.safetensors {d}/sd15.safetensors --out {d}/o.safetensors", 1, "SD1.5 LoRA"),
    ("SD1.5 LoRA into SDXL, --allow-unused", "merge-lora {d}/base.safetensors {d}/sd15.safetensors --out {d}/o.safetensors --allow-unused", 1, "SD1.5 LoRA"),
    ("strength 1e30", "merge-lora {d}/base.safetensors {d}/xl.safetensors:1e30 --out {d}/o.safetensors", 1, "in [-1000, 1000]"),
    ("strength that overflows fp16", "merge-lora {d}/base.safetensors {d}/xl.safetensors:900 --out {d}/o.safetensors", 1, "NaN/Inf once stored as F16"),
    ("strength nan", "merge-lora {d}/base.safetensors {d}/xl.safetensors:nan --out {d}/o.safetensors", 1, "finite number"),
    ("--device cuda without a GPU", "merge-lora {d}/base.safetensors {d}/xl.safetensors --out {d}/o.safetensors --device cuda", 1, "--device cuda"),
    ("--device tpu", "merge-lora {d}/base.safetensors {d}/xl.safetensors --out {d}/o.safetensors --device tpu", 1, "--device must be"),
    ("extract --device tpu", "extract-lora {d}/tuned.safetensors {d}/base.safetensors --rank 2 --out {d}/o.safetensors --device tpu", 1, "--device must be"),
    ("--rank 0", "extract-lora {d}/tuned.safetensors {d}/base.safetensors --rank 0 --out {d}/o.safetensors", 1, "--rank must be between 1"),
    ("--rank -3", "merge-lora --into-lora {d}/xl.safetensors --rank -3 --out {d}/o.safetensors", 1, "--rank must be between 1"),
    ("--rank huge", "convert-lora {d}/loha_ok.safetensors --rank 99999999999999999999 --out {d}/o.safetensors", 1, "--rank must be between 1"),
    ("--energy 0", "extract-lora {d}/tuned.safetensors {d}/base.safetensors --energy 0 --out {d}/o.safetensors", 1, "--energy must be"),
    ("--energy 2", "convert-lora {d}/loha_ok.safetensors --energy 2 --out {d}/o.safetensors", 1, "--energy must be"),
    ("--energy nan", "convert-lora {d}/loha_ok.safetensors --energy nan --out {d}/o.safetensors", 1, "--energy must be"),
    ("--max-rank 0", "extract-lora {d}/tuned.safetensors {d}/base.safetensors --energy 0.5 --max-rank 0 --out {d}/o.safetensors", 1, "--max-rank must be"),
    ("--min-diff -1", "extract-lora {d}/tuned.safetensors {d}/base.safetensors --rank 2 --min-diff -1 --out {d}/o.safetensors", 1, "--min-diff must be"),
    ("--dtype fp8", "merge-lora {d}/base.safetensors {d}/xl.safetensors --out {d}/o.safetensors --dtype fp8", 1, "--dtype must be"),
    ("--to onnx", "convert-lora {d}/xl.safetensors --to onnx --out {d}/o.safetensors", 1, "--to must be"),
    ("--kohya-layout foo", "convert-lora {d}/xl.safetensors --kohya-layout foo --out {d}/o.safetensors", 1, "--kohya-layout must be"),
    ("LoHa missing hada_w2_b", "merge-lora {d}/base.safetensors {d}/loha.safetensors --out {d}/o.safetensors", 1, f"lacks {KQ}.hada_w2_b"),
    ("LoHa to LoRA without a rank", "convert-lora {d}/loha_ok.safetensors --out {d}/o.safetensors", 1, "give --rank or --energy"),
    ("missing LoRA file", "merge-lora {d}/base.safetensors {d}/nope.safetensors --out {d}/o.safetensors", 1, "nope.safetensors"),
    ("lora-info of a missing file", "lora-info {d}/nope.safetensors", 1, "does not exist"),
    ("lora-info of a checkpoint", "lora-info {d}/base.safetensors", 1, "not LoRA keys"),
    ("extract from identical models", "extract-lora {d}/base.safetensors {d}/base.safetensors --rank 2 --out {d}/o.safetensors", 3, "do not differ"),
]


@pytest.mark.parametrize("name,argv,code,text", CASES, ids=[c[0] for c in CASES])
def test_lora_mistake(hw, files, name, argv, code, text):
    before = tree_digest(files)
    r = hw(*argv.format(d=files).split())
    assert_one_line_error(r, code, text)
    assert tree_digest(files) == before
    assert not (files / "o.safetensors").exists()
