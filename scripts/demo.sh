#!/usr/bin/env bash
# The demo: run hw's commands on the bundled sample (data_manifests/sample) into ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: scripts/demo.sh VENV}
hw="$venv/bin/hw"
mkdir -p out
echo "== hw bucket: scan the sample folder and assign HelloWorld buckets (snapped to multiples of 32)"
"$hw" bucket data_manifests/sample --out out/sample.parquet --snap 32 \
  --plot out/buckets.png --export-kohya out/kohya_meta.json --overwrite
echo
echo "== the manifest (first rows)"
"$venv/bin/python" - <<'PY'
import polars as pl
f = pl.read_parquet("out/sample.parquet")
with pl.Config(tbl_rows=12, tbl_cols=9, fmt_str_lengths=40, tbl_width_chars=160):
    print(f.select(pl.col("path").str.replace(r".*/sample/", ""), "status", "format", "width", "height",
                   "bucket_width", "bucket_height", "crop_left", "crop_top").head(12))
PY
echo
echo "== hw dedup: exact and near duplicates, with a review page"
"$hw" dedup out/sample.parquet --out out/sample_dedup.parquet --review out/dedup_review.html --overwrite
echo
echo "== hw caption: OpenAI Batch API request files for the sample (no network, no key needed)"
"$hw" caption out/sample_dedup.parquet --out out/sample_captioned.parquet --model gpt-4o-mini \
  --batch-export out/caption_batch --overwrite
echo
echo "== hw caption: against the bundled fake OpenAI-compatible server (10% injected faults), kohya metadata"
port=$("$venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$venv/bin/python" tests/fake_openai.py --port "$port" --fault-rate 0.1 --forever >/dev/null &
fake=$!
trap 'kill $fake 2>/dev/null || true' EXIT
sleep 1
"$hw" caption out/sample_dedup.parquet --out out/sample_captioned.parquet --base-url "http://127.0.0.1:$port/v1" \
  --model fake-vision --prefix hwstyle --keep-tokens --metadata out/sample_captions.jsonl --overwrite
kill $fake 2>/dev/null || true
echo
echo "== hw spm-score: score the sample with a step-aware preference model (a tiny random one built here:"
echo "   no downloads in the demo; real use: --model spo-sdxl or yuvalkirstain/PickScore_v1)"
"$venv/bin/python" - <<'PY'
from pycore.spo.preference import StepAwarePreferenceModel, tiny_spm_config, write_tiny_clip_tokenizer
tok = write_tiny_clip_tokenizer("out/tiny_spm")
StepAwarePreferenceModel.from_config(tiny_spm_config(tok), tok).save_pretrained("out/tiny_spm", overwrite=True)
PY
"$hw" spm-score out/sample_captioned.parquet --prompt-column caption --model out/tiny_spm --timestep 0 \
  --out out/sample_scored.parquet --overwrite
echo
echo "== hw spo-train: SPO of a tiny SDXL-shaped pipeline (built here; real use: --base stabilityai/stable-diffusion-xl-base-1.0"
echo "   --spm spo-sdxl) on the sample's captions, then hw spo-sample: before/after with the same seeds, scored by the SPM"
"$venv/bin/python" - <<'PY'
from pycore.spo.tiny import save_tiny_pipeline
save_tiny_pipeline("out/tiny_sdxl", full_layout=True)
PY
"$hw" spo-train --base out/tiny_sdxl --spm out/tiny_spm --prompts out/sample_captioned.parquet --prompt-column caption \
  --out out/spo_run --resolution 8 --lora-rank 4 --lr 1e-3 --epochs 1 --set threshold=0.0 --num-samples 2 --vae base --overwrite
"$hw" spo-sample --base out/tiny_sdxl --lora out/spo_run/spo_lora_diffusers.safetensors --prompts out/sample_captioned.parquet \
  --prompt-column caption --limit 4 --compare --spm out/tiny_spm --resolution 8 --out out/spo_samples --overwrite
echo
echo "== LoRA tools on a tiny generated SDXL-named checkpoint: convert to kohya, merge, extract, combine"
mkdir -p out/lora_demo
"$venv/bin/python" - <<'PY'
import torch
from pycore.lora import LoraLayer, LoraSet, save_lora
from pycore.lora.io import save_tensors
g, U = torch.Generator().manual_seed(0), "model.diffusion_model."
save_tensors("out/lora_demo/base.safetensors", {
    U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(64, 64, generator=g).half(),
    U + "input_blocks.1.0.in_layers.2.weight": torch.randn(32, 32, 3, 3, generator=g).half(),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(192, 64, generator=g).half(),
}, overwrite=True)
save_lora(LoraSet({
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LoraLayer(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 2.0),
    "unet.down_blocks.0.resnets.0.conv1": LoraLayer(torch.randn(4, 32, 3, 3, generator=g), torch.randn(32, 4, 1, 1, generator=g), 4.0),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj": LoraLayer(torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), 4.0),
}), "out/lora_demo/style_diffusers.safetensors", "diffusers", overwrite=True)
PY
"$hw" convert-lora out/lora_demo/style_diffusers.safetensors --to kohya --out out/lora_demo/style_kohya.safetensors --overwrite
"$hw" merge-lora out/lora_demo/base.safetensors out/lora_demo/style_kohya.safetensors:0.8 --out out/lora_demo/merged.safetensors --overwrite
"$hw" extract-lora out/lora_demo/merged.safetensors out/lora_demo/base.safetensors --rank 4 --out out/lora_demo/extracted.safetensors --overwrite
"$hw" merge-lora --into-lora out/lora_demo/style_kohya.safetensors:0.5 out/lora_demo/extracted.safetensors:0.5 --out out/lora_demo/combined.safetensors --overwrite
echo
echo "Outputs in out/: sample.parquet (manifest), buckets.png (histogram), kohya_meta.json (kohya metadata),"
echo "sample_dedup.parquet + dedup_review.html, caption_batch/ + sample_captioned.parquet + sample_captions.jsonl,"
echo "sample_scored.parquet, spo_run/ (SPO LoRA, config, checkpoints, samples, logs), spo_samples/ (before/after grid),"
echo "lora_demo/ (converted, merged, extracted and combined LoRAs)"
