#!/usr/bin/env bash
# The GPU run in stages, each one device call that ends by DEADLINE_S (default 480 s: 8 minutes):
#
#   bash benchmarks/run_gpu.sh verify     # always first: install, versions, pytest -m cuda, kernel table, one sample
#   bash benchmarks/run_gpu.sh headline   # sampling at batch 64 and 512, four impls, default compile mode
#   bash benchmarks/run_gpu.sh full       # max-autotune at batch 64: ddpm_fast and diffusers-compiled
#   bash benchmarks/run_gpu.sh full2      # batch 1 (four impls) and the ablation at batch 64
#   bash benchmarks/run_gpu.sh full3      # training at batch 128 and the pytest-benchmark pass
#
# Through the device tool (from the repository root; README "Speed" has each command and its predicted time):
#   run(carry=[".whl"], command="OUT=$OUT bash benchmarks/run_gpu.sh verify", timeout_s=540)
#
# Each stage writes $OUT/<date>-<gpu>-<stage>.json and .md (e.g. 2026-12-01-h200-verify.json): the machine
# (nvidia-smi, driver, versions), every step's exact command, time cap, exit status and wall time, and what
# it produced (pytest summary, kernel tables, the sample check, the bench's cases with NVML telemetry),
# rewritten after every step; the steps write their own files after every test, row or case, so a killed
# stage keeps what it finished. Commit the two files under benchmarks/results/. $OUT/<stage>.log holds
# every step's output. At most 8 files per stage (the device tool's limit).
#
# Every step has a time cap (`timeout`), and the caps leave room for the steps after it, so the stage
# reaches its summary even when a step overruns. The predicted wall time of each stage, from its counted
# compiles, is in benchmarks/NOTES.md section 5.
#
# Knobs (environment): OUT (default ./gpu_out), DEADLINE_S (480), DRY_RUN=1 (print each step's command
# and cap, run nothing, write nothing), PYTHON (python3), GPU_TAG (default from nvidia-smi, e.g. h200),
# STEPS (sampler steps timed, default 50), VERIFY_COMPILE_MODE (default "default": max-autotune costs
# minutes; the stage `full` measures it), FAST_COMPILE_MODE (ddpm_fast's mode in `full`; default the
# sampler's own, max-autotune-no-cudagraphs), BENCH_ARGS (extra `ddpm-fast bench` options, any bench
# step), VERIFY_MODEL (the sample check's U-Net preset, default cifar10; tiny for a CPU rehearsal).
#
# The GPU image (python 3.12, torch 2.11, triton 3.6, no internet) lacks diffusers, the comparison peer.
# Fetch its wheels here first and carry them (the `run` tool's carry=[".whl"]); the install step puts any
# wheels it finds in .whl/ into /tmp/site:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

USAGE="usage: bash benchmarks/run_gpu.sh verify|headline|full|full2|full3  (OUT=dir; DRY_RUN=1 prints the commands)"
stage="${1:-}"
if (( $# != 1 )); then echo "$USAGE" >&2; exit 2; fi
case "$stage" in
    verify|headline|full|full2|full3) ;;
    *) echo "$USAGE" >&2; exit 2 ;;
esac

DRY_RUN="${DRY_RUN:-0}"
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_out}"
DEADLINE_S="${DEADLINE_S:-480}"
STEPS="${STEPS:-50}"
if [[ -z "${GPU_TAG:-}" ]]; then
    GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
              | grep -oE '[a-z]{1,2}[0-9]{2,4}[a-z]?' | head -n 1)
    GPU_TAG="${GPU_TAG:-nogpu}"
fi
NAME="$(date -u +%Y-%m-%d)-$GPU_TAG-$stage"
RECORD="$OUT/$NAME.json"
LOG="$OUT/$stage.log"
# shellcheck disable=SC2206  # word splitting of BENCH_ARGS is intended
EXTRA=(${BENCH_ARGS:-})
SECONDS=0
status=0
export PYTHONUNBUFFERED=1  # a step killed at its cap must not lose buffered output

# The stage's prediction (NOTES.md section 5): seconds and what was counted.
case "$stage" in
    verify) PREDICTED_S=350 COMPILES="<=80 Triton kernel specialisations (~1 s each), 1 tiny U-Net in default mode (~20 s), 1 tiny U-Net in max-autotune-no-cudagraphs (~75 s), 1 CIFAR-10 U-Net in default mode (~50 s)" ;;
    headline) PREDICTED_S=390 COMPILES="4 CIFAR-10 U-Nets in default mode (2 ddpm_fast ~50 s, 2 diffusers-compiled ~80 s)" ;;
    full) PREDICTED_S=450 COMPILES="2 CIFAR-10 U-Nets in max-autotune (~200 s each)" ;;
    full2) PREDICTED_S=420 COMPILES="6 CIFAR-10 U-Nets in default mode (diffusers-compiled ~80 s, 5 ddpm_fast ~50 s)" ;;
    full3) PREDICTED_S=300 COMPILES="1 training graph (forward+backward, ~100 s), 1 sampling U-Net (~50 s), 1 training graph from the cache (~15 s)" ;;
esac

cap_for() {  # cap_for WANT RESERVE: seconds this step may take, leaving RESERVE for the steps after it
    local n=$((DEADLINE_S - SECONDS - $2))
    (( n > $1 )) && n=$1
    (( n < 10 )) && n=10
    echo "$n"
}

# step NAME CAP KIND RESULT OUTPUT -- COMMAND...: run under `timeout` (which signals the whole process
# group), its output streamed to OUTPUT (default the stage log), then fold what it wrote into the record.
step() {
    local name="$1" cap="$2" kind="$3" result="$4" output="${5:-$LOG}"
    shift 6
    local cmdline="" arg
    for arg in "$@"; do  # shell-quoted only where needed, so the recorded command reads as typed
        if [[ "$arg" =~ ^[A-Za-z0-9_./,=:+-]+$ ]]; then cmdline+="$arg "; else cmdline+="$(printf '%q' "$arg") "; fi
    done
    cmdline="${cmdline% }"
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "[dry-run] $name (cap ${cap} s): $cmdline"
        return 0
    fi
    echo "=== [$SECONDS s] $name (cap ${cap} s): $cmdline" | tee -a "$LOG"
    local t0=$SECONDS rc
    timeout -k 10 "$cap" "$@" >>"$output" 2>&1
    rc=$?
    echo "=== [$SECONDS s] $name: exit $rc$( (( rc == 124 || rc == 137 )) && echo ' (hit its cap)')" | tee -a "$LOG"
    (( rc != 0 )) && status=1
    local args=(step --json "$RECORD" --name "$name" --command "$cmdline" --cap "$cap" --rc "$rc"
                --wall $((SECONDS - t0)) --elapsed "$SECONDS" --kind "$kind")
    [[ -n "$result" ]] && args+=(--result "$result")
    [[ "$output" != "$LOG" ]] && args+=(--log "$output")
    "$PY" benchmarks/gpu_stage.py "${args[@]}" >>"$LOG" 2>&1 || echo "recording step $name failed" | tee -a "$LOG"
}

# --- install and describe the machine (every stage) --------------------------------------------------
install_cmd=("$PY" -m pip install -q --no-deps --no-build-isolation -e .)
if [[ "$DRY_RUN" == 1 ]]; then
    echo "[dry-run] stage $stage: $RECORD and .md, log $LOG; predicted ${PREDICTED_S} s ($COMPILES); deadline ${DEADLINE_S} s"
    compgen -G ".whl/*.whl" >/dev/null && echo "[dry-run] install wheels: $PY -m pip install --target /tmp/site .whl/*.whl"
    echo "[dry-run] install: ${install_cmd[*]}"
else
    mkdir -p "$OUT"
    echo "=== [$SECONDS s] install" | tee -a "$LOG"
    if compgen -G ".whl/*.whl" >/dev/null; then
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    timeout 120 "${install_cmd[@]}" >>"$LOG" 2>&1
    install_rc=$?
    install_s=$SECONDS
    if ! "$PY" benchmarks/gpu_stage.py start --json "$RECORD" --stage "$stage" --predicted-s "$PREDICTED_S" \
            --compiles "$COMPILES" --argv "$0 $stage" >>"$LOG" 2>&1; then
        echo "cannot write the stage record $RECORD (see $LOG)" | tee -a "$LOG"
        exit 1
    fi
    "$PY" benchmarks/gpu_stage.py step --json "$RECORD" --name install --command "${install_cmd[*]}" --cap 120 \
        --rc "$install_rc" --wall "$install_s" --elapsed "$SECONDS" >>"$LOG" 2>&1
    (( install_rc != 0 )) && { echo "install failed (exit $install_rc, see $LOG)" | tee -a "$LOG"; status=1; }
    grep -E '"(device|torch|triton|diffusers)"' "$RECORD" | head -n 4
fi

bench=("$PY" -m ddpm_fast.bench --steps "$STEPS" --case-seconds 20)

# --- the stages --------------------------------------------------------------------------------------
case "$stage" in
verify)
    # Caps: pytest leaves 2 x 40 s for the kernel tables and 110 s for the sample.
    cap=$(cap_for 280 190)
    # -v streams one line per finished test to the log: a run cut at its cap is summarised from it
    step pytest-cuda "$cap" pytest "$OUT/pytest-cuda.xml" "$OUT/pytest-cuda.log" -- \
        "$PY" -m pytest -m cuda tests -v -rA -p no:cacheprovider --junitxml "$OUT/pytest-cuda.xml"
    for dtype in fp32 bf16; do
        reserve=110
        [[ $dtype == fp32 ]] && reserve=150
        step "kernels-$dtype" "$(cap_for 40 "$reserve")" kernels "$OUT/kernels-$dtype.json" "" -- \
            "$PY" benchmarks/bench_kernels.py --dtype "$dtype" --no-compile --iters 20 --repeats 3 \
            --out "$OUT/kernels-$dtype.json"
    done
    step verify-sample "$(cap_for 110 0)" sample "$OUT/verify-sample.json" "" -- \
        "$PY" benchmarks/verify_sample.py --model "${VERIFY_MODEL:-cifar10}" --batch 8 --steps 10 \
        --compile-mode "${VERIFY_COMPILE_MODE:-default}" --out "$OUT/verify-sample.json"
    ;;
headline)
    cap=$(cap_for 450 0)
    step bench-headline "$cap" bench "$OUT/bench-headline.json" "" -- "${bench[@]}" --only sampling \
        --impls reference,diffusers,diffusers-compiled,ddpm_fast --batch-sizes 64,512 \
        --compile-mode default --fast-compile-mode default --time-budget $((cap - 100)) \
        --out "$OUT/bench-headline.json" "${EXTRA[@]}"
    ;;
full)
    cap=$(cap_for 450 0)
    fast_mode=()
    [[ -n "${FAST_COMPILE_MODE:-}" ]] && fast_mode=(--fast-compile-mode "$FAST_COMPILE_MODE")
    step bench-max-autotune "$cap" bench "$OUT/bench-full.json" "" -- "${bench[@]}" --only sampling \
        --impls ddpm_fast,diffusers-compiled --batch-sizes 64 --compile-mode max-autotune "${fast_mode[@]}" \
        --time-budget $((cap - 240)) --out "$OUT/bench-full.json" "${EXTRA[@]}"
    ;;
full2)
    cap=$(cap_for 450 0)
    step bench-batch1-ablation "$cap" bench "$OUT/bench-full2.json" "" -- "${bench[@]}" --only sampling \
        --impls reference,diffusers,diffusers-compiled,ddpm_fast,ablation --batch-sizes 1 --ablation-batch 64 \
        --compile-mode default --fast-compile-mode default --time-budget $((cap - 90)) \
        --out "$OUT/bench-full2.json" "${EXTRA[@]}"
    ;;
full3)
    cap=$(cap_for 200 200)
    step bench-training "$cap" bench "$OUT/bench-full3.json" "" -- "${bench[@]}" --only training \
        --train-batch-sizes 128 --train-steps 10 --time-budget $((cap - 120)) \
        --out "$OUT/bench-full3.json" "${EXTRA[@]}"
    # The same case code through pytest-benchmark: eager impls + ddpm_fast at batch 64, the training pair
    # at 128 (its compiled graph comes from inductor's cache, warmed by the step above).
    step pytest-benchmark "$(cap_for 250 0)" pytest-benchmark "$OUT/pytest-benchmark.json" "" -- \
        env DDPM_FAST_BENCH_IMPLS=reference,diffusers,ddpm_fast DDPM_FAST_BENCH_BATCH_SIZES=64 \
        DDPM_FAST_BENCH_TRAIN_BATCH_SIZES=128 DDPM_FAST_BENCH_STEPS=10 DDPM_FAST_BENCH_ROUNDS=3 \
        DDPM_FAST_BENCH_FAST_COMPILE_MODE=default \
        "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$OUT/pytest-benchmark.json"
    ;;
esac

if [[ "$DRY_RUN" == 1 ]]; then
    exit 0
fi
echo "=== [$SECONDS s] done: exit status $status, predicted ${PREDICTED_S} s; $RECORD" | tee -a "$LOG"
cat "${RECORD%.json}.md"
ls -la "$OUT"
exit "$status"
