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

# Phases to run (all by default), so that a lease can be split into short calls:
#   bash benchmarks/gpu_checks.sh update tests     then     bash benchmarks/gpu_checks.sh overhead
# `perf` (issue 12, about 4 min on an H200, at most 6.5 with every timeout hit) is the one short run for the performance figures: the fused
# upcast-lerp tests, the bf16/fp32 sample against the HBM bound, and the step overhead with the fixed timer.
PHASES=" ${*:-update tests overhead} "
phase() { [[ "$PHASES" == *" $1 "* ]]; }

# Per-sample update time vs AveragedModel and the HBM bound (issue 2 item 13; < 1 min on an H100/H200)
phase update && timeout 240 "$PY" benchmarks/update.py --device cuda --out "$OUT/update_gpu.md" --json "$OUT/update_gpu.json" > "$OUT/update_gpu.log" 2>&1
phase update && timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/benchmarks/test_update_smoke.py tests/test_fused_fold.py > "$OUT/update_cuda_tests.log" 2>&1

# Performance to the bound (issue 12): the fused Triton upcast-lerp is bitwise avg.lerp_(x.float(), c) and is
# the path the engine takes (the test prints the probe's choice); one sample vs the HBM bound, fp32 and bf16;
# then the step overhead, PMA vs plain Trainer in interleaved rounds (median and spread), interleave_step
# 1/10/100 with the average on the GPU and 1/100 offloaded to pinned CPU memory, fp32 and bf16 weights.
phase perf && timeout 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs -s tests/online/test_fused_upcast.py \
  tests/online/test_kernels.py > "$OUT/perf_cuda_tests.log" 2>&1
phase perf && timeout 70 "$PY" benchmarks/update.py --device cuda --reps 30 --out "$OUT/update_gpu.md" \
  --json "$OUT/update_gpu.json" > "$OUT/update_gpu.log" 2>&1
# about 18 runs of ~5 s (fp32 weights: 6 variants x 3 rounds), then 12 (bf16 weights: 4 variants x 3 rounds)
phase perf && timeout 130 "$PY" benchmarks/overhead.py --device cuda --size 100m --steps 40 --warmup 5 --rounds 3 \
  --weights fp32 --interleave 1 10 100 --offload-interleave 1 100 \
  --out "$OUT/overhead_gpu_fp32.md" --json "$OUT/overhead_gpu_fp32.json" > "$OUT/overhead_gpu_fp32.log" 2>&1
phase perf && timeout 90 "$PY" benchmarks/overhead.py --device cuda --size 100m --steps 40 --warmup 5 --rounds 3 \
  --weights bf16 --interleave 1 100 --offload-interleave 100 \
  --out "$OUT/overhead_gpu_bf16.md" --json "$OUT/overhead_gpu_bf16.json" > "$OUT/overhead_gpu_bf16.log" 2>&1
# The summary table with these GPU figures in (copy the JSON files into benchmarks/results/ to keep them).
if phase perf; then
  cp "$OUT"/update_gpu.json "$OUT"/overhead_gpu_*.json benchmarks/results/ 2>/dev/null
  "$PY" benchmarks/table.py --no-write > "$OUT/summary.md" 2>&1
fi

# Scale (issue 4; about 5 min on an H200): CUDA offload tests (pinned-CPU average, side stream, GPU memory
# added by PMA), PmaTrainer on FSDP2 and DeepSpeed ZeRO-1/2/3 (one process per GPU), step overhead on GPU.
# DeepSpeed is not preinstalled there: its pure-python wheel (built here with DS_BUILD_OPS=0) and its
# dependencies travel in .whl/ (carry it) and go into a private folder, never into the machine's python.
if phase tests && ! "$PY" -c "import deepspeed" 2>/dev/null && ls .whl/deepspeed-*.whl > /dev/null 2>&1; then
  PYV=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  DSENV="${TMPDIR:-/tmp}/pmakit_dsenv"
  "$PY" -m pip install -q --no-deps --no-index --target "$DSENV" .whl/deepspeed-*.whl .whl/einops-*.whl \
    .whl/hjson-*.whl .whl/ninja-*.whl .whl/py_cpuinfo-*.whl .whl/msgpack-*-"$PYV"-*.whl \
    .whl/pydantic-*.whl .whl/pydantic_core-*-"$PYV"-*.whl .whl/annotated_types-*.whl .whl/typing_inspection-*.whl .whl/typing_extensions-*.whl > "$OUT/deepspeed_install.log" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:$DSENV"
fi
"$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" > "$OUT/deepspeed_version.txt" 2>&1
phase tests && timeout 420 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs -s tests/test_offload_cuda.py tests/test_engine.py \
  tests/distributed/test_fsdp2.py tests/distributed/test_trainer_backends.py tests/test_spike.py tests/test_wsa.py > "$OUT/scale_cuda_tests.log" 2>&1
phase overhead && timeout 300 "$PY" benchmarks/overhead.py --device cuda --size 100m --steps 200 --rounds 3 \
  --out "$OUT/overhead_gpu.md" --json "$OUT/overhead_gpu.json" > "$OUT/overhead_gpu.log" 2>&1
phase overhead && timeout 120 "$PY" benchmarks/wsa_overhead.py --device cuda --dtype bfloat16 --hidden_size 1024 --num_layers 8 \
  --vocab_size 32000 --batch_size 8 --seq 512 --steps 40 --json "$OUT/wsa_overhead_cuda.json" > "$OUT/wsa_overhead_cuda.log" 2>&1
