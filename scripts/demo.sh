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
echo "== shards: the same sample packed as WebDataset tar shards (KEY.jpg + KEY.txt alt text), scanned in place"
echo "   (nothing extracted); rows per shard, and the same sizes/statuses/hashes/buckets as the loose files"
"$venv/bin/python" - <<'PY'
import io, os, tarfile
files = sorted(os.path.join(d, f) for d, _, fs in os.walk("data_manifests/sample") for f in fs if not f.endswith(".txt"))
os.makedirs("out/shards", exist_ok=True)
for s in range(0, len(files), 8):
    with tarfile.open(f"out/shards/{s // 8:05d}.tar", "w") as tf:
        for i, f in enumerate(files[s : s + 8], start=s):
            tf.add(f, arcname=f"{i:09d}{os.path.splitext(f)[1].lower()}")
            alt = f"alt text of {os.path.basename(f)}".encode()
            info = tarfile.TarInfo(f"{i:09d}.txt"); info.size = len(alt); tf.addfile(info, io.BytesIO(alt))
print(f"{len(files)} images → {len(os.listdir('out/shards'))} shards in out/shards/")
PY
"$hw" bucket 'out/shards/{00000..00005}.tar' --out out/shards_manifest --snap 32 --sidecars --overwrite | tail -3
"$venv/bin/python" - <<'PY'
import polars as pl
shards = pl.read_parquet("out/shards_manifest/*.parquet")  # a folder of parts, read as one table
folder = pl.read_parquet("out/sample.parquet")
print(shards.group_by(pl.col("path").str.extract(r"(\d+\.tar)::").alias("shard")).agg(
    pl.len().alias("rows"), (pl.col("status") == "ok").sum().alias("ok")).sort("shard"))
with pl.Config(fmt_str_lengths=40, tbl_width_chars=160):
    print(shards.select(pl.col("path").str.replace(r".*/out/", ""), "status", "width", "height", "source_caption").head(4))
cols = ["status", "width", "height", "file_size", "content_hash", "bucket_width", "bucket_height"]
key = lambda f: sorted(map(tuple, f.select(cols).fill_null(-1).rows()))
print("same sizes, statuses, hashes and buckets as the loose files:", key(shards) == key(folder))
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
echo "   --spm spo-sdxl) on the sample's captions, then hw spo-sample: before/after with the same seeds, scored by the SPM."
echo "   A random SPM's preference is noise no LoRA can follow, so first hw spm-train teaches a tiny SPM one the tiny UNet"
echo "   can move: brighter images (96 generated pairs, 40 steps; its pipeline decodes latents near-identically to pixels)."
mkdir -p out/spo_demo
"$venv/bin/python" - <<'PY'
from tests.kit.clip import save_tiny_clip
from tests.kit.diffusion import save_tiny_pipeline, save_tiny_sd15_denoiser
from tests.kit.preference import write_brightness_pairs
save_tiny_sd15_denoiser("out/spo_demo/spm_base", resolution=16)  # the frozen base of spm-train's noising
save_tiny_clip("out/spo_demo/clip_init", seed=2)                 # PickScore's stand-in
write_brightness_pairs("out/spo_demo/pairs.parquet", 96, size=16)
save_tiny_pipeline("out/tiny_sdxl", vae="near_identity")
PY
export OMP_NUM_THREADS=1  # tiny tensors: one thread is several times faster than two on a busy 2-core machine
"$hw" spm-train out/spo_demo/pairs.parquet --base-model out/spo_demo/spm_base --init out/spo_demo/clip_init --out out/spo_demo/spm \
  --resolution 16 --batch-size 8 --lr 2e-3 --weight-decay 0 --warmup-steps 0 --val-fraction 0.25 --max-steps 40 --eval-every 40 \
  --log-every 20 --overwrite
spo_settings=(--resolution 8 --lora-rank 4 --lr 2e-2 --epochs 2 --set threshold=0.0)
echo "-- SPO settings for a tiny model (official SDXL: 1024², rank 64, lr 1e-5, 10 epochs, threshold 0.4): ${spo_settings[*]}"
echo "   (few prompts and epochs: a high learning rate, and threshold 0 trains on every best/worst pair for the most signal)"
"$hw" spo-train --base out/tiny_sdxl --spm out/spo_demo/spm --prompts out/sample_captioned.parquet --prompt-column caption \
  --out out/spo_run "${spo_settings[@]}" --num-samples 2 --vae base --overwrite
echo "-- before/after: the same 80 seeds (40 captions × 2) without and with the LoRA, scored by the SPM at t = 0"
"$hw" spo-sample --base out/tiny_sdxl --lora out/spo_run/spo_lora_diffusers.safetensors --prompts out/sample_captioned.parquet \
  --prompt-column caption --images-per-prompt 2 --compare --spm out/spo_demo/spm --resolution 8 --out out/spo_samples --overwrite
unset OMP_NUM_THREADS
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
echo "Outputs in out/: sample.parquet (manifest), shards/ + shards_manifest/ (the sample as tar shards, a manifest folder), buckets.png (histogram), kohya_meta.json (kohya metadata),"
echo "sample_dedup.parquet + dedup_review.html + dedup_stats.svg, caption_batch/ + sample_captioned.parquet + sample_captions.jsonl,"
echo "sample_scored.parquet, spo_demo/ (brightness pairs + the SPM trained on them), spo_run/ (SPO LoRA, config, checkpoints,"
echo "samples, logs), spo_samples/ (before/after grid),"
echo "lora_demo/ (converted, merged, extracted and combined LoRAs; a LoHa merged and converted to plain LoRA)"
