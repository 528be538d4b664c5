#!/usr/bin/env bash
# One call that measures everything vitmerge can measure on a GPU machine (under 8 minutes on one H100):
#
#   bash bench/gpu.sh OUTDIR              # selftest, PyTorch CUDA latency (eager / CUDA graphs, fp32 / fp16,
#                                         # batch 1 / 8 / 64, ViT-S and ViT-B: unmerged vs ToMe vs hash), the Triton
#                                         # merge kernel vs the PyTorch merge, NVML energy per image
#   bash bench/gpu.sh --dry-run OUTDIR    # the same script on the CPU at tiny sizes, CUDA parts skipped with why
#
# Self-contained: nothing is downloaded or installed; the checkout is put on PYTHONPATH (the GPU machines lent
# to this project have PyTorch, Triton, timm, transformers, onnx and CPU onnxruntime). Writes OUTDIR/gpu.json and
# OUTDIR/gpu.md and prints the tables. PYTHON names the interpreter (default: python3).
set -euo pipefail
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
out="${1:?usage: bash bench/gpu.sh [--dry-run] OUTDIR}"
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$root/bench/gpu_bench.py" --out "$out" "${dry[@]}" --budget-s "${GPU_BUDGET_S:-450}"
