#!/usr/bin/env bash
# GPU check: build the extension with its CUDA kernels for this GPU, run the GPU tests, then the
# benchmark suites, a host-time trace of the small calls and the memory profile, in that order,
# within one time budget.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]
#
# For a GPU machine whose python3 already holds torch, triton, pytest and pytest-xdist (PY=... picks
# another interpreter). Each stage runs under its own cap, cut to what is left of the budget
# (default 540 s), and logs to OUT_DIR/logs.tgz; a stage that fails does not stop the next. The suites' reports (JSON, Markdown,
# plots) go to benchmarks/results/<gpu>/ and, packed, to OUT_DIR/results.tgz; OUT_DIR/summary.txt
# says how each stage ended. The GPU tests run twice over the attention kernels: with the largest
# and with the smallest of their autotuned tiles (FASTSEQ_AUTOTUNE), one config each, so that a
# first run compiles a few kernels rather than every config of every test (on a GPU with 99 KiB of
# shared memory per block, sm_86/89, the largest tiles do not fit: expect those tests to fail there).
set -u
if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]" >&2
  exit 2
fi
out=$(realpath -m "$1")
budget=${2:-540}
cd "$(dirname "$0")/.." || exit 2  # the repository root: builds, tests and results are relative
PY=${PY:-python3}
logs=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + budget - 20))  # the last 20 s pack the logs and results

pack() {
  tar czf "$out/logs.tgz" -C "$logs" . 2>/dev/null
  [ -d benchmarks/results/"$slug" ] && tar czf "$out/results.tgz" benchmarks/results/"$slug"
  return 0
}

# stage NAME CAP_SECONDS COMMAND...: run COMMAND under min(CAP, time left), log it, record how it ended.
stage() {
  local name=$1 cap=$2 left=$((deadline - SECONDS)) start=$SECONDS
  shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 5 ]; then
    echo "$name: not run, out of time" | tee -a "$out/summary.txt"
    return
  fi
  timeout -k 10 "$cap" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (cap $cap s)" | tee -a "$out/summary.txt"
  tail -n 4 "$logs/$name.log"
  pack
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv >"$out/summary.txt" 2>&1
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
if [ -z "$arch" ]; then
  echo "gpu_check: $PY's torch sees no CUDA GPU" | tee -a "$out/summary.txt" >&2
  exit 2
fi
gpu_slug() {
  $PY -c "from fastseq.bench.report import device_slug; print(device_slug('cuda'))" 2>/dev/null \
    || echo gpu
}
slug=$(gpu_slug)

stage build 240 env FASTSEQ_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
  $PY -m pip install -q --no-build-isolation --no-deps -e .
stage info 30 $PY -m fastseq info
slug=$(gpu_slug)
# xdist spreads the Triton compiles over the CPU's cores; the GPU is shared by the workers.
workers=$(($(nproc) > 8 ? 8 : $(nproc)))
stage tests_largest_tiles 240 env FASTSEQ_AUTOTUNE=largest \
  $PY -m pytest -q -m cuda -n "$workers" -p no:cacheprovider tests
# The suites whose GPU results are the oldest come first: the LSTM recurrence's kernel kinds and
# block sizes (tensor cores against CUDA cores), then the LSTM's (they predate the persistent
# kernel as the GPU default); attention autotunes every shape it meets. The smallest tiles' tests
# come after the suites: a short budget spends itself on results first.
stage bench_lstm_recurrence 120 $PY -m fastseq bench lstm_recurrence
stage bench_lstm 180 $PY -m fastseq bench lstm
stage bench_rnn 90 $PY -m fastseq bench rnn
stage trace_dispatch 60 $PY -m fastseq trace dispatch
stage bench_dispatch 60 $PY -m fastseq bench dispatch
stage bench_rotary 90 $PY -m fastseq bench rotary
stage bench_cross_attention 150 $PY -m fastseq bench cross_attention
stage bench_attention_quick 240 $PY -m fastseq bench attention --quick
stage bench_gpt 120 $PY -m fastseq bench gpt
stage bench_seq_models 120 $PY -m fastseq bench seq_models
stage bench_vit 60 $PY -m fastseq bench vit
stage bench_clip 60 $PY -m fastseq bench clip
stage bench_unet 90 $PY -m fastseq bench unet
stage tests_smallest_tiles 90 env FASTSEQ_AUTOTUNE=smallest \
  $PY -m pytest -q -m cuda -n "$workers" -p no:cacheprovider -k on_the_gpu \
  tests/test_attention.py tests/test_attention_decode.py
stage profile 90 $PY -m fastseq profile lstm attention rotary cross_attention
pack
cat "$out/summary.txt"
