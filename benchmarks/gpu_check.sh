#!/usr/bin/env bash
# The whole GPU check of issue 3 in one command, sized for a 9-minute limit on one H100 (it ends by 515 s):
# equivalence tests on CUDA (TF32 off), the benchmark grid eager and compiled, a short real training run, and
# aggregate throughput of 1, 2 and 4 benchmark processes sharing the GPU. Every stage has its own time cap, so a
# slow stage costs its own numbers only, and the compiled stages at the end get whatever time is left; results
# land in $OUT as they are produced.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # on the device tool, $OUT is set already
#
# Files in $OUT (at most 8, as the device tool brings back): env.txt, tests.txt, results.jsonl (bench lines),
# grads.jsonl, train.jsonl, summary.md, log.txt. The golden tests read their data from $PCVIT_GOLDEN_DIR (or
# ../shared/golden, which does not travel to the device machine): copy /work/shared/golden into .golden/ (listed
# in .git/info/exclude) and carry it; the script then finds it. Without it those tests skip and say so.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
    && PY=.venv/bin/python
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/pcvit-inductor}
[[ -z "${PCVIT_GOLDEN_DIR:-}" && -d .golden ]] && export PCVIT_GOLDEN_DIR=$PWD/.golden
START=$(date +%s)
DEADLINE=${DEADLINE:-515}  # seconds after START by which every stage has ended (the device call allows 540)
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

# 1. the VJP against autograd on CUDA (TF32 off inside the tests), and the golden files (CPU, this torch)
stage tests 60 env PCVIT_TEST_DEVICE=cuda "$PY" -m pytest tests/test_fast.py tests/golden -q -p no:cacheprovider \
    -o addopts="" | tee "$OUT/tests.txt"

# 2. one state gradient alone (autograd vs the VJP with explicit and fused attention), float32 and TF32
stage grads 30 "$PY" benchmarks/bench_grads.py --device cuda --shape 12/128/4/200 --shape 12/64/1/200 --out "$OUT"
stage grads-tf32 20 "$PY" benchmarks/bench_grads.py --device cuda --shape 12/128/4/200 --shape 12/64/1/200 \
    --precision tf32 --out "$OUT"

# 3. issue 3's grid + the largest config, eager, float32 (TF32 off); the two goal configs again with TF32
stage bench-eager 100 "$PY" benchmarks/bench_train.py --device cuda --no-compile --batches 10 --warmup 3 \
    --out "$OUT"
stage bench-eager-tf32 35 "$PY" benchmarks/bench_train.py --device cuda --no-compile --batches 10 --warmup 3 \
    --precision tf32 --impl plain,vjp --config 12/128/4/200/20 --config 12/64/1/200/20 --out "$OUT"

# 4. a short real training run, 12 blocks, both residual options, reference and vjp
stage train 50 "$PY" benchmarks/train_check.py --device cuda --epochs 3 --train-subset 2000 --out "$OUT"

# 5. aggregate throughput of 1, 2 and 4 processes on the one GPU (eager vjp, the goal config)
#    (their scratch files stay out of $OUT, which brings back 8 files at most; the lines are appended after)
for n in 1 2 4; do
    stage "concurrent-$n" 25 "$PY" benchmarks/bench_train.py --device cuda --concurrent "$n" --impl vjp \
        --config 12/128/4/200/20 --batches 8 --warmup 3 --out /tmp/pcvit-concurrent
done
cat /tmp/pcvit-concurrent/results.jsonl >> "$OUT/results.jsonl" 2>/dev/null

# 6. compiled, with whatever time is left: the whole in-place vjp step (and the weight step's energy) under
#    torch.compile, TF32 first (the issue's compiled baseline is TF32: 117 ms and 63 ms), then float32 and
#    compiled autograd for comparison. plain (eager) is the reference of every line's differences.
stage bench-compiled-tf32 170 "$PY" benchmarks/bench_train.py --device cuda --batches 10 --warmup 3 \
    --impl plain,vjp+compile --config 12/128/4/200/20 --config 12/64/1/200/20 --precision tf32 --out "$OUT"
stage bench-compiled-float32 300 "$PY" benchmarks/bench_train.py --device cuda --batches 10 --warmup 3 \
    --impl plain,vjp+compile,parallel+compile --config 12/128/4/200/20 --precision float32 --out "$OUT"

"$PY" benchmarks/summarize.py "$OUT/results.jsonl" > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
echo "=== done after $(( $(date +%s) - START ))s"
