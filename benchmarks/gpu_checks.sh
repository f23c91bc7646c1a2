#!/usr/bin/env bash
# GPU checks for one lent CUDA machine, run from the repository root: `bash benchmarks/gpu_checks.sh`.
# Each check runs with its own timeout and writes its output under $OUT (default: gpu_out/).
# pmakit is not installed there: it is imported from src/ through PYTHONPATH.
set -x
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1

# Per-sample update time vs AveragedModel and the HBM bound (issue 2 item 13; < 1 min on an H100/H200)
timeout 240 "$PY" benchmarks/update.py --device cuda --out "$OUT/update_gpu.md" --json "$OUT/update_gpu.json" > "$OUT/update_gpu.log" 2>&1
