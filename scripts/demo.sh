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
echo "Outputs: out/sample.parquet (manifest), out/buckets.png (histogram), out/kohya_meta.json (kohya metadata)"
