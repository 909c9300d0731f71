#!/usr/bin/env bash
# One device call: install the checkout, run the GPU tests, then every benchmark, results under $OUT.
#
#   bash benchmarks/run_gpu.sh            # on the GPU machine, from the repository root
#
# Sized for one call of at most 10 minutes: every step has its own time cap and the whole script aims to
# end by DEADLINE_S (default 530 s). The sampling/training benchmark gets whatever time is left after the
# tests and the kernel benchmarks, and skips (records as skipped) the cases it cannot start in time; it
# rewrites its JSON after every case, so even a killed run leaves its finished cases in $OUT.
#
# Files in $OUT (8): env.txt, tests.log, kernels-fp32.json, kernels-bf16.json, bench.json, bench.md,
# pytest-benchmark.json, run.log (stdout+stderr of every benchmark step).
#
# Knobs (environment): DEADLINE_S, STEPS (sampler steps timed, default 50), BATCH_SIZES (default 1,64,512),
# TEST_TIMEOUT_S (default 150), FAST_COMPILE_MODE (ddpm_fast's torch.compile mode; default the sampler's own),
# DIFFUSERS_COMPILE_MODE (default "default"), SKIP_TESTS=1 / SKIP_KERNELS=1 / SKIP_PYTEST_BENCH=1 (for a second
# call), BENCH_ARGS (extra `ddpm-fast bench` options). A second call for what the first had to skip, e.g.:
#   SKIP_TESTS=1 SKIP_KERNELS=1 SKIP_PYTEST_BENCH=1 BENCH_ARGS="--impls ablation" bash benchmarks/run_gpu.sh
#   (the ablation and the training cases; `--only training` for training alone)
#
# The GPU image (python 3.12, torch 2.11, triton 3.6, no internet) lacks diffusers, the comparison peer.
# Fetch its wheels here first and carry them (the `run` tool's carry=[".whl"]); this script installs any
# wheels it finds in .whl/ into /tmp/site:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
set -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
DEADLINE_S="${DEADLINE_S:-530}"
STEPS="${STEPS:-50}"
BATCH_SIZES="${BATCH_SIZES:-1,64,512}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-150}"
DIFFUSERS_COMPILE_MODE="${DIFFUSERS_COMPILE_MODE:-default}"
LOG="$OUT/run.log"
SECONDS=0
status=0

step() {  # step NAME: a timestamped marker in run.log and on stdout
    echo "=== [$SECONDS s] $*" | tee -a "$LOG"
}

left() {  # seconds left before the deadline, minus a reserve for the steps after this one
    local reserve="$1"
    local n=$((DEADLINE_S - SECONDS - reserve))
    (( n < 10 )) && n=10
    echo "$n"
}

step "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { echo "install failed" | tee -a "$LOG"; status=1; }

step "environment"
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total --format=csv || true
    python3 -c "import torch, triton, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print('triton', triton.__version__); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing"
    python3 -c "import pytest_benchmark; print('pytest-benchmark', pytest_benchmark.__version__)" || echo "pytest-benchmark missing"
    python3 -c "import pynvml; pynvml.nvmlInit(); print('nvml driver', pynvml.nvmlSystemGetDriverVersion())" || echo "pynvml unusable"
    nproc
    free -g || true
} >"$OUT/env.txt" 2>&1
head -n 3 "$OUT/env.txt"

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    step "GPU tests (cap ${TEST_TIMEOUT_S} s)"
    timeout -k 10 "$TEST_TIMEOUT_S" python3 -m pytest -q -p no:cacheprovider tests >"$OUT/tests.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/tests.log"
    echo "tests exit code $rc (124 = hit the cap)" | tee -a "$LOG"
    (( rc != 0 )) && status=1
fi

if [[ -f benchmarks/bench_kernels.py && "${SKIP_KERNELS:-0}" != 1 ]]; then
    for dtype in fp32 bf16; do
        step "kernel benchmarks ($dtype)"
        timeout -k 5 45 python3 benchmarks/bench_kernels.py --dtype "$dtype" --out "$OUT/kernels-$dtype.json" >>"$LOG" 2>&1
        rc=$?
        echo "bench_kernels $dtype exit code $rc" | tee -a "$LOG"
        (( rc != 0 )) && status=1
    done
fi

# The sampling + training benchmark: everything left except ~60 s for the pytest-benchmark pass.
reserve=60
[[ "${SKIP_PYTEST_BENCH:-0}" == 1 ]] && reserve=0
cap=$(left "$reserve")
budget=$((cap - 45))  # stop starting new cases 45 s before the cap: one compile fits in that
(( budget < 10 )) && budget=10
step "sampling + training benchmark (cap $cap s, case budget $budget s)"
extra=()
[[ -n "${FAST_COMPILE_MODE:-}" ]] && extra+=(--fast-compile-mode "$FAST_COMPILE_MODE")
# shellcheck disable=SC2206  # word splitting of BENCH_ARGS is intended
[[ -n "${BENCH_ARGS:-}" ]] && extra+=(${BENCH_ARGS})
timeout -k 10 "$cap" python3 -m ddpm_fast.bench --batch-sizes "$BATCH_SIZES" --steps "$STEPS" \
    --compile-mode "$DIFFUSERS_COMPILE_MODE" --time-budget "$budget" --case-seconds 20 \
    --out "$OUT/bench.json" "${extra[@]}" 2>&1 | tee -a "$LOG" | tail -n 45
rc=$?
echo "bench exit code $rc (124 = hit the cap; finished cases are in bench.json)" | tee -a "$LOG"
(( rc != 0 )) && status=1

# pytest-benchmark: the same case code through pytest-benchmark, eager impls + ddpm_fast at one size.
if [[ "${SKIP_PYTEST_BENCH:-0}" != 1 ]]; then
    cap=$(left 0)
    step "pytest-benchmark suite (cap $cap s)"
    DDPM_FAST_BENCH_IMPLS="${PYTEST_BENCH_IMPLS:-reference,diffusers,ddpm_fast}" DDPM_FAST_BENCH_BATCH_SIZES=64 \
    DDPM_FAST_BENCH_TRAIN_BATCH_SIZES=128 DDPM_FAST_BENCH_STEPS=10 DDPM_FAST_BENCH_ROUNDS=3 \
        timeout -k 5 "$cap" python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$OUT/pytest-benchmark.json" >>"$LOG" 2>&1
    rc=$?
    echo "pytest-benchmark exit code $rc" | tee -a "$LOG"
    (( rc != 0 )) && status=1
fi

step "done (exit status $status)"
ls -la "$OUT"
exit "$status"
