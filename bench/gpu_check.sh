#!/usr/bin/env bash
# Measured CUDA memory of one SDXL-shaped SPO step per option set `hw spo-train --memory auto` plans,
# next to the plan's figures, and the fp16/bf16 SPM score agreement. Random weights: no downloads.
#   bash bench/gpu_check.sh [--cards 80,24,16,12] [--json out.json]     (a CUDA card; a few minutes)
#   bash bench/gpu_check.sh --cpu --tiny                                 (tiny models on the CPU: checks the code path)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
