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
echo "== hw dedup: exact and near duplicates, image quality flags and outliers, with a review page"
"$hw" dedup out/sample.parquet --out out/sample_dedup.parquet --quality --review out/dedup_review.html \
  --plot out/dedup_stats.svg --overwrite
echo
echo "== what dedup added: kept or not, sharpness, brightness, JPEG quality, flags, outlier rank"
"$venv/bin/python" - <<'PY'
import polars as pl
f = pl.read_parquet("out/sample_dedup.parquet").filter(pl.col("status") == "ok")
with pl.Config(tbl_rows=12, tbl_cols=9, fmt_str_lengths=30, tbl_width_chars=160, fmt_table_cell_list_len=3):
    print(f.select(pl.col("path").str.replace(r".*/sample/", ""), "dup_group", "keep", "q_sharpness", "q_luma_mean",
                   "q_jpeg_quality", "q_flags", "q_outlier_rank").sort("q_outlier_rank").head(12))
PY
echo
echo "== hw caption: OpenAI Batch API request files for the sample (no network, no key needed)"
"$hw" caption out/sample_dedup.parquet --out out/sample_captioned.parquet --model gpt-4o-mini \
  --batch-export out/caption_batch --overwrite
echo
echo "== hw caption: the caption server is down (nothing listens on the port yet): one line at once, nothing stored"
port=$("$venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
rm -rf out/caption_store  # the demo's own store: start fresh so the outage is visible on every run
caption_args=(out/sample_dedup.parquet --out out/sample_captioned.parquet --base-url "http://127.0.0.1:$port/v1"
  --model fake-vision --prefix hwstyle --keep-tokens --metadata out/sample_captions.jsonl --store out/caption_store --overwrite)
rc=0
"$hw" caption "${caption_args[@]}" || rc=$?
echo "   (exit $rc)"
echo
echo "== hw caption: the same command with the server up (the bundled fake OpenAI-compatible server, 10% injected"
echo "   faults): every image is asked again — no --retry-failed needed — and captioned; kohya metadata"
"$venv/bin/python" -m tests.kit.fake_openai --port "$port" --fault-rate 0.1 --forever >/dev/null &
fake=$!
trap 'kill $fake 2>/dev/null || true' EXIT
sleep 1
"$hw" caption "${caption_args[@]}"
kill $fake 2>/dev/null || true
"$venv/bin/python" - <<'PY'
import polars as pl
f = pl.read_parquet("out/sample_captioned.parquet")
print(f["caption_status"].value_counts(sort=True))
for p, c in f.filter(pl.col("caption_status") == "ok").select("path", "caption").head(3).iter_rows():
    print(f"{p.rsplit('/', 1)[-1]}: {c}")
PY
echo
echo "== hw spm-score: score the sample with a step-aware preference model (a tiny random one built here:"
echo "   no downloads in the demo; real use: --model spo-sdxl or yuvalkirstain/PickScore_v1)"
"$venv/bin/python" -c 'from tests.kit.clip import save_tiny_spm; save_tiny_spm("out/tiny_spm")'
"$hw" spm-score out/sample_captioned.parquet --prompt-column caption --model out/tiny_spm --timestep 0 \
  --out out/sample_scored.parquet --overwrite
echo
echo "== hw spo-train: SPO of a tiny SDXL-shaped pipeline (built here; real use: --base stabilityai/stable-diffusion-xl-base-1.0"
echo "   --spm spo-sdxl) on the sample's captions, then hw spo-sample: before/after with the same seeds, scored by the SPM"
"$venv/bin/python" -c 'from tests.kit.diffusion import save_tiny_pipeline; save_tiny_pipeline("out/tiny_sdxl", full_layout=True)'
"$hw" spo-train --base out/tiny_sdxl --spm out/tiny_spm --prompts out/sample_captioned.parquet --prompt-column caption \
  --out out/spo_run --resolution 8 --lora-rank 4 --lr 1e-3 --epochs 1 --set threshold=0.0 --num-samples 2 --vae base --overwrite
"$hw" spo-sample --base out/tiny_sdxl --lora out/spo_run/spo_lora_diffusers.safetensors --prompts out/sample_captioned.parquet \
  --prompt-column caption --limit 4 --compare --spm out/tiny_spm --resolution 8 --out out/spo_samples --overwrite
echo
echo "== LoRA tools on a tiny generated SDXL-named checkpoint: inspect, convert to kohya, merge, extract, combine; a LyCORIS LoHa file too"
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
k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # a LyCORIS LoHa, as downloaded from model sites
save_tensors("out/lora_demo/detail_loha.safetensors", {f"{k}.hada_w1_a": torch.randn(64, 4, generator=g), f"{k}.hada_w1_b": torch.randn(4, 64, generator=g),
             f"{k}.hada_w2_a": torch.randn(64, 4, generator=g), f"{k}.hada_w2_b": torch.randn(4, 64, generator=g), f"{k}.alpha": torch.tensor(2.0)}, overwrite=True)
PY
"$hw" lora-info out/lora_demo/style_diffusers.safetensors
"$hw" lora-info out/lora_demo/detail_loha.safetensors
"$hw" convert-lora out/lora_demo/style_diffusers.safetensors --to kohya --out out/lora_demo/style_kohya.safetensors --overwrite
"$hw" merge-lora out/lora_demo/base.safetensors out/lora_demo/style_kohya.safetensors:0.8 --out out/lora_demo/merged.safetensors --overwrite
"$hw" extract-lora out/lora_demo/merged.safetensors out/lora_demo/base.safetensors --rank 4 --out out/lora_demo/extracted.safetensors --overwrite
"$hw" merge-lora --into-lora out/lora_demo/style_kohya.safetensors:0.5 out/lora_demo/extracted.safetensors:0.5 --out out/lora_demo/combined.safetensors --overwrite
# the LoHa: merged exactly with the kohya LoRA; as plain LoRA, rank 16 (= 4·4, the Hadamard product's rank) is exact, rank 4 is not
"$hw" merge-lora out/lora_demo/base.safetensors out/lora_demo/style_kohya.safetensors:0.8 out/lora_demo/detail_loha.safetensors:0.5 --out out/lora_demo/merged_mix.safetensors --overwrite
"$hw" convert-lora out/lora_demo/detail_loha.safetensors --to kohya --rank 16 --out out/lora_demo/detail_lora.safetensors --overwrite
"$hw" convert-lora out/lora_demo/detail_loha.safetensors --to kohya --rank 4 --out out/lora_demo/detail_lora_r4.safetensors --overwrite
"$hw" lora-info out/lora_demo/detail_lora.safetensors
echo
echo "== mistakes: a typo in an option, a word for a number, a missing --out: one line each, exit 2, nothing written"
for args in "bucket data_manifests/sample --out out/typo.parquet --thread 4" \
            "bucket data_manifests/sample --out out/typo.parquet --threads four" "dedup out/sample.parquet"; do
  rc=0
  "$hw" $args || rc=$?
  echo "   (exit $rc; out/typo.parquet $([ -e out/typo.parquet ] && echo exists || echo 'not written'))"
done
echo
echo "Outputs in out/: sample.parquet (manifest), buckets.png (histogram), kohya_meta.json (kohya metadata),"
echo "sample_dedup.parquet + dedup_review.html + dedup_stats.svg, caption_batch/ + sample_captioned.parquet + sample_captions.jsonl,"
echo "sample_scored.parquet, spo_run/ (SPO LoRA, config, checkpoints, samples, logs), spo_samples/ (before/after grid),"
echo "lora_demo/ (converted, merged, extracted and combined LoRAs; a LoHa merged and converted to plain LoRA)"
