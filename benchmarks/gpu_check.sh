#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU and this project installed (a .venv with
# CUDA-enabled torch, else python3):
#
#   bash benchmarks/gpu_check.sh                        # results in bench-out/gpu-check/
#   OUT=/some/dir DEADLINE=900 bash benchmarks/gpu_check.sh
#
# Stages, in order; each has its own time cap (cut to what is left of DEADLINE seconds, default 515, after which
# nothing runs), so a slow stage costs only its own numbers and the compiled stages at the end get what is left:
#   1. correctness on CUDA: the hand-written VJP against autograd (TF32 off inside those tests), the runs'
#      precision switches, and the golden tests (CPU, float32);
#   2. precision drift: the golden replay on the GPU in float32, tf32 and bf16 against the original's numbers
#      (`precision: auto`, the default, is tf32 on CUDA, as the original ran);
#   3. one state gradient per implementation, tf32 and float32;
#   4. the benchmark grid eager, tf32 (the default; the original's timings are TF32 too) and float32;
#   5. a short 12-block training run per implementation and residual option;
#   6. aggregate throughput of 1, 2 and 4 processes sharing the GPU;
#   7. compiled: tf32, then float32.
#
# Files in $OUT: env.txt (card, driver, versions, commit), tests.txt, drift.jsonl, grads.jsonl, results.jsonl
# (benchmark lines), train.jsonl, summary.md (tables from summarize.py) and log.txt (everything printed).
# Record the run in benchmarks/RESULTS.md: card, date, torch version, summary.md and the drift lines.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
    && PY=.venv/bin/python
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$SCRATCH/inductor}
START=$(date +%s)
DEADLINE=${DEADLINE:-515}  # seconds after START by which every stage has ended
stage() {  # stage NAME CAP COMMAND...: run with a time cap (cut to the time left), log it, never stop the script
    local name=$1 cap=$2 left; shift 2
    left=$(( DEADLINE - ($(date +%s) - START) - 12 ))
    (( cap > left )) && cap=$left
    if (( cap < 15 )); then echo "=== $name: skipped, ${left}s left" | tee -a "$OUT/log.txt"; return; fi
    echo "=== $name (cap ${cap}s, at $(( $(date +%s) - START ))s)" | tee -a "$OUT/log.txt"
    timeout --kill-after=5 "$cap" "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s" | tee -a "$OUT/log.txt"
}

{
    date -u; nvidia-smi
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'tf32 default', torch.backends.cuda.matmul.allow_tf32)"
    git log -1 --format='commit %H %s' 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. correctness: the VJP against autograd on CUDA, the CUDA runs' TF32 switches, the golden files (CPU)
stage tests 60 env PCVIT_TEST_DEVICE=cuda "$PY" -m pytest tests/test_energy_vjp.py tests/golden \
    "tests/test_train.py::test_a_cuda_run_sets_tf32_as_its_precision_says" -q -p no:cacheprovider -o addopts="" \
    | tee "$OUT/tests.txt"

# 2. how far each precision moves the golden replay from the original's float32 numbers
stage drift 40 "$PY" benchmarks/precision_drift.py --device cuda --precision float32,tf32,bf16 --out "$OUT"

# 3. one state gradient alone (autograd vs the VJP with explicit and fused attention)
stage grads-tf32 20 "$PY" benchmarks/bench_grads.py --device cuda --shape 12/128/4/200 --shape 12/64/1/200 \
    --precision tf32 --out "$OUT"
stage grads-float32 20 "$PY" benchmarks/bench_grads.py --device cuda --shape 12/128/4/200 --shape 12/64/1/200 \
    --precision float32 --out "$OUT"

# 4. the GPU grid (12/64/1, 12/128/4, 6/64/1 at B=200, T=20, and the largest, 12/128/4 at B=256, T=40), eager
stage bench-eager-tf32 100 "$PY" benchmarks/bench_train.py --device cuda --no-compile --batches 10 --warmup 3 \
    --precision tf32 --out "$OUT"
stage bench-eager-float32 35 "$PY" benchmarks/bench_train.py --device cuda --no-compile --batches 10 --warmup 3 \
    --precision float32 --impl plain,vjp --config 12/128/4/200/20 --config 12/64/1/200/20 --out "$OUT"

# 5. a short real training run, 12 blocks, both residual options, reference and vjp (default precision: tf32)
stage train 50 "$PY" benchmarks/train_check.py --device cuda --epochs 3 --train-subset 2000 --out "$OUT"

# 6. aggregate throughput of 1, 2 and 4 processes on the one GPU (eager vjp, 12/128/4); their scratch files stay
#    out of $OUT and their lines are appended to results.jsonl after
for n in 1 2 4; do
    stage "concurrent-$n" 25 "$PY" benchmarks/bench_train.py --device cuda --concurrent "$n" --impl vjp \
        --config 12/128/4/200/20 --batches 8 --warmup 3 --out "$SCRATCH/concurrent"
done
cat "$SCRATCH/concurrent/results.jsonl" >> "$OUT/results.jsonl" 2>/dev/null

# 7. compiled, with whatever time is left: the whole in-place vjp step (and the weight step's energy) under
#    torch.compile, TF32 first (as the original ran), then float32 and compiled autograd for comparison.
#    plain (eager) is the reference of every line's differences.
stage bench-compiled-tf32 170 "$PY" benchmarks/bench_train.py --device cuda --batches 10 --warmup 3 \
    --impl plain,vjp+compile --config 12/128/4/200/20 --config 12/64/1/200/20 --precision tf32 --out "$OUT"
stage bench-compiled-float32 300 "$PY" benchmarks/bench_train.py --device cuda --batches 10 --warmup 3 \
    --impl plain,vjp+compile,parallel+compile --config 12/128/4/200/20 --precision float32 --out "$OUT"

"$PY" benchmarks/summarize.py "$OUT/results.jsonl" > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
echo "=== done after $(( $(date +%s) - START ))s"
