#!/usr/bin/env bash
# GPU checks for one lent CUDA machine, run from the repository root: `bash benchmarks/gpu_checks.sh`.
# Each check runs with its own timeout and writes its output under $OUT (default: gpu_out/).
# pmakit is not installed there: it is imported from src/ through PYTHONPATH.
#
# The one prepared call for a 10-minute device slot (issue 20): the paper-scale experiment, `perf` and the CUDA
# tests, every figure copied into benchmarks/results/ under the card's name, everything packed into one file
# (the device tool returns at most 8 files). Before it, once, here: the pure-python wheels pmakit needs that the
# GPU image lacks (httpx2 and its two dependencies) go into .whl/ (ignored by git):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5
# then, carrying .whl, with timeout_s 600:
#   mkdir -p /tmp/gpu_out && BUNDLE="$OUT/gpu_checks.tgz" OUT=/tmp/gpu_out bash benchmarks/gpu_checks.sh slot
# `slot` runs `paper` (estimated 4-5.5 min), then `perf` (about 4 min), then `cuda_tests` with whatever is left
# of SLOT_S seconds (default 575): each step's timeout is cut to the time left, and a step with under 20 s
# left is skipped; slot_times.txt says what ran, for how long, and with which exit status.
set -x
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
# The card's name for the result files: "NVIDIA H100 80GB HBM3" -> NVIDIA_H100_80GB_HBM3
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cs 'A-Za-z0-9' '_' | sed 's/_$//')
CARD="${CARD:-unknown_gpu}"
echo "$CARD" > "$OUT/card.txt"

# Phases to run (all by default), so that a lease can be split into short calls:
#   bash benchmarks/gpu_checks.sh update tests     then     bash benchmarks/gpu_checks.sh overhead
# `perf` (issue 12, about 4 min on an H200, at most 6.5 with every timeout hit) is the one short run for the performance figures: the fused
# upcast-lerp tests, the bf16/fp32 sample against the HBM bound, and the step overhead with the fixed timer.
PHASES=" ${*:-update tests overhead} "
if [[ "$PHASES" == *" slot "* ]]; then
  PHASES=" paper perf cuda_tests "
  DEADLINE=$((SECONDS + ${SLOT_S:-575}))
fi
phase() { [[ "$PHASES" == *" $1 "* ]]; }
# budget CAP: CAP seconds, or the time left before the slot's deadline if less; `go CAP` fails (the step is
# skipped) when under 20 s are left. `timeout 0` would mean no limit, so neither ever gives 0.
budget() { local left=$(( ${DEADLINE:-$((SECONDS + $1))} - SECONDS )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
go() { (( $(budget "$1") >= 20 || $(budget "$1") == $1 )); }
# timed NAME CAP CMD...: run CMD under `timeout` within the budget and note its time and exit status
timed() {
  local name=$1 cap=$2 t0=$SECONDS rc; shift 2
  if ! go "$cap"; then echo "$name skipped: under 20 s left" >> "$OUT/slot_times.txt"; return 0; fi
  timeout "$(budget "$cap")" "$@"; rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s" >> "$OUT/slot_times.txt"
  return 0
}

# pmakit needs httpx2 (Hub pushes), which the GPU image lacks: install the carried wheels into a private folder
if ! "$PY" -c "import httpx2" 2>/dev/null && ls .whl/httpx2-*.whl > /dev/null 2>&1; then
  DEPS="${TMPDIR:-/tmp}/pmakit_deps"
  "$PY" -m pip install -q --no-deps --no-index --target "$DEPS" .whl/httpx2-*.whl .whl/httpcore2-*.whl \
    .whl/truststore-*.whl > "$OUT/deps_install.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$DEPS"
fi
"$PY" -c "import pmakit.training, torch; print('pmakit', pmakit.__version__, 'torch', torch.__version__)" > "$OUT/import.txt" 2>&1

# Per-sample update time vs AveragedModel and the HBM bound (issue 2 item 13; < 1 min on an H100/H200)
phase update && timeout 240 "$PY" -m benchmarks.update --device cuda --out "$OUT/update_gpu.md" --json "$OUT/update_gpu.json" > "$OUT/update_gpu.log" 2>&1
phase update && timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/benchmarks/test_update_smoke.py tests/online/test_kernels.py > "$OUT/update_cuda_tests.log" 2>&1

# The paper-scale experiment (issue 20): a 128.7M-parameter byte-level Llama on the standard library, a
# constant-LR run with its samples, the sweep of merge rules and windows, real linear decays over the last
# 100 and 200 steps; the share of each decay's gain per rule and window. Estimated 4.2 min on a GPU that
# sustains 250 bf16 TFLOP/s, 5.5 min at 150 (`python -m examples.paper_scale --size paper --estimate 250`).
# Its ~12 GB of samples and checkpoints stay outside the repository and $OUT.
if phase paper; then
  PAPER_RUN="${PAPER_RUN:-${TMPDIR:-/tmp}/pmakit_paper_scale}"
  PYTHONUNBUFFERED=1 timed paper 400 "$PY" -m examples.paper_scale --size paper --output_dir "$PAPER_RUN" \
    > "$OUT/paper_scale.log" 2>&1
  for f in results.md results.json paper_scale.png; do
    [[ -f "$PAPER_RUN/$f" ]] || continue
    cp "$PAPER_RUN/$f" "$OUT/paper_scale_$f"
    cp "$PAPER_RUN/$f" "benchmarks/results/paper_scale_${CARD}.${f##*.}"
  done
  cp "$PAPER_RUN/sweep/sweep.md" "$OUT/paper_scale_sweep.md" 2>/dev/null
fi

# Performance to the bound (issue 12): the fused Triton upcast-lerp is bitwise avg.lerp_(x.float(), c) and is
# the path the engine takes (the test prints the probe's choice); one sample vs the HBM bound, fp32 and bf16;
# then the step overhead, PMA vs plain Trainer in interleaved rounds (median and spread), interleave_step
# 1/10/100 with the average on the GPU and 1/100 offloaded to pinned CPU memory, fp32 and bf16 weights.
phase perf && timed perf_tests 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs -s tests/online/test_fused_upcast.py \
  tests/online/test_kernels.py > "$OUT/perf_cuda_tests.log" 2>&1
phase perf && timed perf_update 70 "$PY" -m benchmarks.update --device cuda --reps 30 --out "$OUT/update_gpu.md" \
  --json "$OUT/update_gpu.json" > "$OUT/update_gpu.log" 2>&1
# about 18 runs of ~5 s (fp32 weights: 6 variants x 3 rounds), then 12 (bf16 weights: 4 variants x 3 rounds)
phase perf && timed perf_overhead_fp32 130 "$PY" -m benchmarks.overhead --device cuda --size 100m --steps 40 --warmup 5 --rounds 3 \
  --weights fp32 --interleave 1 10 100 --offload-interleave 1 100 \
  --out "$OUT/overhead_gpu_fp32.md" --json "$OUT/overhead_gpu_fp32.json" > "$OUT/overhead_gpu_fp32.log" 2>&1
phase perf && timed perf_overhead_bf16 90 "$PY" -m benchmarks.overhead --device cuda --size 100m --steps 40 --warmup 5 --rounds 3 \
  --weights bf16 --interleave 1 100 --offload-interleave 100 \
  --out "$OUT/overhead_gpu_bf16.md" --json "$OUT/overhead_gpu_bf16.json" > "$OUT/overhead_gpu_bf16.log" 2>&1
# The summary table with these GPU figures in; the JSON files go into benchmarks/results/ under their usual
# names (which table.py reads) and again under the card's name (which keeps an H100's apart from an H200's).
if phase perf; then
  for f in "$OUT"/update_gpu.json "$OUT"/overhead_gpu_fp32.json "$OUT"/overhead_gpu_bf16.json; do
    [[ -f "$f" ]] && cp "$f" benchmarks/results/ && cp "$f" "benchmarks/results/$(basename "$f" .json)_$CARD.json"
  done
  "$PY" -m benchmarks.table --no-write > "$OUT/summary.md" 2>&1
  cp "$OUT/summary.md" "benchmarks/results/summary_gpu_$CARD.md"
fi

# Every CUDA-marked test of the suite (pytest -m cuda), in the time the slot has left; -v so that a run cut
# by the timeout still shows which tests passed. The two files `perf` ran already are left out after it.
SKIP_PERF_TESTS=()
phase perf && SKIP_PERF_TESTS=(--ignore=tests/online/test_fused_upcast.py --ignore=tests/online/test_kernels.py)
phase cuda_tests && timed cuda_tests 420 "$PY" -m pytest -v -p no:cacheprovider -m cuda -rs "${SKIP_PERF_TESTS[@]}" \
  tests > "$OUT/cuda_tests.log" 2>&1

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
phase tests && timeout 420 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs -s tests/online/test_offload_cuda.py \
  tests/online/test_engine.py tests/distributed/test_fsdp2.py tests/distributed/test_trainer_backends.py \
  tests/training/test_spike.py tests/training/test_wsa.py > "$OUT/scale_cuda_tests.log" 2>&1
phase overhead && timeout 300 "$PY" -m benchmarks.overhead --device cuda --size 100m --steps 200 --rounds 3 \
  --out "$OUT/overhead_gpu.md" --json "$OUT/overhead_gpu.json" > "$OUT/overhead_gpu.log" 2>&1
phase overhead && timeout 120 "$PY" -m benchmarks.wsa_overhead --device cuda --dtype bfloat16 --hidden_size 1024 --num_layers 8 \
  --vocab_size 32000 --batch_size 8 --seq 512 --steps 40 --json "$OUT/wsa_overhead_cuda.json" > "$OUT/wsa_overhead_cuda.log" 2>&1

# Pack $OUT and benchmarks/results into one file when BUNDLE names it (the device tool returns 8 files at most).
if [[ -n "${BUNDLE:-}" ]]; then
  tar -czf "$BUNDLE" "$OUT" benchmarks/results 2>/dev/null
fi
