#!/usr/bin/env bash
# The GPU run in stages, each one device call sized to the device time left (BUDGET_S):
#
#   bash benchmarks/run_gpu.sh first     # ALWAYS the first call: install; is the default fast path correct on this
#                                        # GPU (verify_sample.py, CIFAR-10 U-Net, batch 64); how fast against diffusers
#                                        # and diffusers-compiled at batch 64 and 512 (default compile mode)
#   bash benchmarks/run_gpu.sh verify    # the second call: pytest -m cuda, then the kernel bandwidth tables
#   bash benchmarks/run_gpu.sh full      # later sessions: max-autotune at batch 64, ddpm_fast and diffusers-compiled
#   bash benchmarks/run_gpu.sh full2     # batch 1 (four impls, the fp32 reference too) and the ablation at batch 64
#   bash benchmarks/run_gpu.sh full3     # training at batch 128 and the pytest-benchmark pass
#   DRY_RUN=1 bash benchmarks/run_gpu.sh plan   # the first two calls against a fresh 15-minute budget, printed
#
# Budget (the device tool's README): a session has 15 minutes of device time in all; a fresh machine's start
# (1-2 min), every idle second of a warm one (30 s after each call) and each call count; one call runs at most
# 10 minutes; no machine starts with under 4 minutes left. So the script takes the time left and sizes its
# deadline and every step's cap to it:
#   BUDGET_S   device seconds left: status's budget_left_s, read just before the call (default 900, a fresh session)
#   WARM=1     status said warm: true (no start-up to pay); default 0 counts STARTUP_S (120 s) for a fresh machine
# deadline = min(the stage's own, 600 - 30, BUDGET_S - start-up - 60 (the tool's kill margin and the transfers)
# - what the stage leaves for the call after it: `first` leaves 240 s, the floor under which no machine starts).
# The call's timeout_s is the deadline + 30 (DRY_RUN prints the exact run(...) call). A step whose cap falls
# under its minimum is not started and is recorded as skipped for want of budget, never silently dropped.
#
# Through the device tool (from the repository root, after `bash benchmarks/fetch_wheels.sh`; README "GPU"
# has the two calls and what each returns):
#   run(carry=[".whl"], command="BUDGET_S=900 OUT=$OUT bash benchmarks/run_gpu.sh first", timeout_s=480)
#
# Each stage writes $OUT/<date>-<gpu>-<stage>.json and .md (e.g. 2026-12-01-h200-first.json): the machine
# (nvidia-smi, driver, versions), every step's exact command, time cap, exit status and wall time, and what
# it produced (pytest summary, kernel tables, the sample check, the bench's cases with NVML telemetry),
# rewritten after every step; the steps write their own files after every test, row or case, so a killed
# stage keeps what it finished. Commit the two files under benchmarks/results/. $OUT/<stage>.log holds
# every step's output. At most 8 files per stage (the device tool's limit).
#
# Knobs (environment): OUT (default ./gpu_out), BUDGET_S, WARM, STARTUP_S (120), DEADLINE_S (overrides the
# stage's own deadline, still capped by the budget), DRY_RUN=1 (print each step's command and cap, run
# nothing, write nothing), PYTHON (python3), GPU_TAG (default from nvidia-smi, e.g. h200), STEPS (sampler
# steps timed, default 50), VERIFY_COMPILE_MODE (default "default": max-autotune costs minutes; the stage
# `full` measures it), FAST_COMPILE_MODE (ddpm_fast's mode in `full`; default the sampler's own,
# max-autotune-no-cudagraphs), BENCH_ARGS (extra `ddpm-fast bench` options, any bench step), VERIFY_MODEL
# (the sample check's U-Net preset, default cifar10; tiny for a CPU rehearsal).
#
# The GPU image (python 3.12, torch 2.11, triton 3.6, no internet) lacks diffusers, the comparison peer:
# `bash benchmarks/fetch_wheels.sh` puts it and what it needs beyond the image's packages in .whl/ (carry it);
# the install step puts every wheel it finds there into /tmp/site. Then `pip install -e .`, checked by importing
# ddpm_fast.kernels (the package maps it to kernels/); if that fails, a plain install into /tmp/site-ddpm on
# PYTHONPATH (with PYTHONSAFEPATH=1, so the checkout's own ddpm_fast/ does not shadow it).
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

USAGE="usage: bash benchmarks/run_gpu.sh first|verify|full|full2|full3|plan  (BUDGET_S=seconds left, WARM=0|1, OUT=dir; DRY_RUN=1 prints the commands)"
stage="${1:-}"
if (( $# != 1 )); then echo "$USAGE" >&2; exit 2; fi
case "$stage" in
    first|verify|full|full2|full3|plan) ;;
    *) echo "$USAGE" >&2; exit 2 ;;
esac

DRY_RUN="${DRY_RUN:-0}"
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_out}"
STEPS="${STEPS:-50}"

# --- the budget (device tool README: Limits) -------------------------------------------------------
CALL_MAX_S=600     # one command's run at most
KILL_MARGIN_S=30   # timeout_s = deadline + this: the stage ends itself before the tool kills it
TRANSFER_S=30      # copying the tree there and $OUT back, the record, the close
NEXT_FLOOR_S=240   # no machine starts with under 4 minutes left: `first` leaves that for `verify`
IDLE_S=30          # a warm machine goes back 30 s after a call, counted
BUDGET_S="${BUDGET_S:-900}"
WARM="${WARM:-0}"
STARTUP_S="${STARTUP_S:-120}"
for knob in BUDGET_S STARTUP_S; do
    [[ "${!knob}" =~ ^[0-9]+$ ]] || { echo "run_gpu.sh: error: $knob must be whole seconds, got '${!knob}'" >&2; exit 2; }
done
[[ "$WARM" == 0 || "$WARM" == 1 ]] || { echo "run_gpu.sh: error: WARM must be 0 or 1 (status's warm), got '$WARM'" >&2; exit 2; }
startup=$STARTUP_S
[[ "$WARM" == 1 ]] && startup=0

if [[ "$stage" == plan ]]; then
    # The first two calls of a session against its budget, worst case: each call runs to its timeout_s.
    [[ "$DRY_RUN" == 1 ]] || { echo "run_gpu.sh: error: plan only prints (DRY_RUN=1 bash benchmarks/run_gpu.sh plan)" >&2; exit 2; }
    deadline_of() { sed -nE 's/^\[dry-run\] stage .*deadline ([0-9]+) s$/\1/p' <<<"$1"; }
    one=$(BUDGET_S=$BUDGET_S WARM=$WARM bash "$0" first) || exit 1
    echo "$one"
    d1=$(deadline_of "$one")
    used1=$((startup + d1 + KILL_MARGIN_S + TRANSFER_S))
    left=$((BUDGET_S - used1))
    echo "[plan] call 1 (first): start-up $startup + timeout_s $((d1 + KILL_MARGIN_S)) + transfers $TRANSFER_S = $used1 s at most; $left s left of $BUDGET_S"
    two=$(BUDGET_S=$left WARM=1 bash "$0" verify) || { echo "[plan] call 2 (verify) does not fit in $left s"; exit 1; }
    echo "$two"
    d2=$(deadline_of "$two")
    used2=$((d2 + KILL_MARGIN_S + TRANSFER_S))
    echo "[plan] call 2 (verify) at once, machine warm (status warm: true, within ${IDLE_S} s): timeout_s $((d2 + KILL_MARGIN_S)) + transfers $TRANSFER_S = $used2 s; total $((used1 + used2)) of $BUDGET_S s"
    cold=$((left - IDLE_S))
    if (( cold < NEXT_FLOOR_S )); then
        echo "[plan] call 2 later (cold): $cold s left after the idle ${IDLE_S} s, under the ${NEXT_FLOOR_S} s floor: no machine starts"
    else
        three=$(BUDGET_S=$cold WARM=0 bash "$0" verify) || { echo "[plan] call 2 (verify, cold) does not fit in $cold s"; exit 1; }
        d3=$(deadline_of "$three")
        used3=$((IDLE_S + STARTUP_S + d3 + KILL_MARGIN_S + TRANSFER_S))
        echo "[plan] call 2 later, machine cold: idle $IDLE_S + start-up $STARTUP_S + timeout_s $((d3 + KILL_MARGIN_S)) + transfers $TRANSFER_S = $used3 s (deadline $d3 s); total $((used1 + used3)) of $BUDGET_S s"
    fi
    exit 0
fi

# The stage's own deadline, its prediction (NOTES.md section 5, from counted compiles) and what it leaves.
leave=0
case "$stage" in
    first) OWN_S=450 leave=$NEXT_FLOOR_S PREDICTED_S=425
        COMPILES="install ~25 s; verify_sample: 1 CIFAR-10 U-Net in default mode at batch 64 (~50 s) + its runs ~20 s; bench: imports and ceilings ~15 s, diffusers eager at 64 and 512 ~15 s, 2 ddpm_fast default (~50 s each, the batch-64 one may come from inductor's cache), 2 diffusers-compiled default (~80 s each), their runs ~25 s" ;;
    verify) OWN_S=480 PREDICTED_S=285
        COMPILES="install ~20 s; pytest -m cuda: <=90 Triton kernel specialisations (~1 s each), 1 tiny U-Net in default mode (~20 s), 1 tiny U-Net in max-autotune-no-cudagraphs (~75 s), runs ~40 s; kernel tables 2 x ~20 s" ;;
    full) OWN_S=540 PREDICTED_S=480
        COMPILES="install ~25 s; bench imports ~15 s; 2 CIFAR-10 U-Nets in max-autotune (~200 s each, counted: NOTES.md section 5) + their runs ~20 s each" ;;
    full2) OWN_S=480 PREDICTED_S=420
        COMPILES="6 CIFAR-10 U-Nets in default mode (diffusers-compiled ~80 s, 5 ddpm_fast ~50 s)" ;;
    full3) OWN_S=480 PREDICTED_S=300
        COMPILES="1 training graph (forward+backward, ~100 s), 1 sampling U-Net (~50 s), 1 training graph from the cache (~15 s)" ;;
esac
DEADLINE_S="${DEADLINE_S:-$OWN_S}"
(( DEADLINE_S > CALL_MAX_S - KILL_MARGIN_S )) && DEADLINE_S=$((CALL_MAX_S - KILL_MARGIN_S))
fits=$((BUDGET_S - startup - KILL_MARGIN_S - TRANSFER_S - leave))
(( DEADLINE_S > fits )) && DEADLINE_S=$fits
TIMEOUT_S=$((DEADLINE_S + KILL_MARGIN_S))
if (( DEADLINE_S < 60 )); then
    echo "run_gpu.sh: error: $BUDGET_S s of device time left (start-up $startup s) leave the stage $stage a deadline of $DEADLINE_S s, under 60 s: give the machine back and run it in a later session" >&2
    exit 2
fi

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
SIMULATED=0  # DRY_RUN: the seconds the steps before would take at their caps (the worst case)
status=0
export PYTHONUNBUFFERED=1  # a step killed at its cap must not lose buffered output

elapsed() { if [[ "$DRY_RUN" == 1 ]]; then echo "$SIMULATED"; else echo "$SECONDS"; fi; }

cap_for() {  # cap_for WANT RESERVE: seconds this step may take, leaving RESERVE for the steps after it
    local n=$((DEADLINE_S - $(elapsed) - $2))
    (( n > $1 )) && n=$1
    (( n < 0 )) && n=0
    echo "$n"
}

# step NAME CAP MIN KIND RESULT OUTPUT -- COMMAND...: run under `timeout` (which signals the whole process
# group), its output streamed to OUTPUT (default the stage log), then fold what it wrote into the record.
# A cap under MIN seconds: not started, recorded as skipped for want of budget (exit status 125).
step() {
    local name="$1" cap="$2" min="$3" kind="$4" result="$5" output="${6:-$LOG}"
    shift 7
    local cmdline="" arg
    for arg in "$@"; do  # shell-quoted only where needed, so the recorded command reads as typed
        if [[ "$arg" =~ ^[A-Za-z0-9_./,=:+-]+$ ]]; then cmdline+="$arg "; else cmdline+="$(printf '%q' "$arg") "; fi
    done
    cmdline="${cmdline% }"
    if (( cap < min )); then
        if [[ "$DRY_RUN" == 1 ]]; then
            echo "[dry-run] $name skipped: its cap would be $cap s (< $min s): the budget is spent"
            return 0
        fi
        echo "=== [$SECONDS s] $name: skipped, its cap would be $cap s (< $min s): the budget is spent" | tee -a "$LOG"
        status=1
        "$PY" benchmarks/gpu_stage.py step --json "$RECORD" --name "$name" --command "$cmdline" --cap "$cap" --rc 125 \
            --wall 0 --elapsed "$SECONDS" --kind none >>"$LOG" 2>&1 || echo "recording step $name failed" | tee -a "$LOG"
        return 0
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "[dry-run] $name (cap ${cap} s): $cmdline"
        SIMULATED=$((SIMULATED + cap))
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
INSTALL_CAP=$(cap_for 60 0)
install_cmd=("$PY" -m pip install -q --no-deps --no-build-isolation -e .)
SITE_DDPM="${SITE_DDPM:-/tmp/site-ddpm}"  # the fallback install's target folder
target_cmd=("$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE_DDPM" .)
import_check=("$PY" -c "import ddpm_fast.kernels, ddpm_fast.sampler")
if [[ "$DRY_RUN" == 1 ]]; then
    echo "[dry-run] stage $stage: $RECORD and .md, log $LOG; budget $BUDGET_S s, start-up $startup s, timeout_s $TIMEOUT_S; predicted ${PREDICTED_S} s ($COMPILES); deadline ${DEADLINE_S} s"
    echo "[dry-run] run(carry=[\".whl\"], command=\"BUDGET_S=$BUDGET_S$([[ $WARM == 1 ]] && echo ' WARM=1') OUT=\$OUT bash benchmarks/run_gpu.sh $stage\", timeout_s=$TIMEOUT_S)"
    compgen -G ".whl/*.whl" >/dev/null && echo "[dry-run] install wheels: $PY -m pip install --target /tmp/site .whl/*.whl"
    echo "[dry-run] install (cap $INSTALL_CAP s): ${install_cmd[*]}; check: ${import_check[*]}; else ${target_cmd[*]} on PYTHONPATH"
    SIMULATED=$INSTALL_CAP
else
    mkdir -p "$OUT"
    echo "=== [$SECONDS s] install (cap $INSTALL_CAP s; budget $BUDGET_S s, start-up $startup s, deadline $DEADLINE_S s)" | tee -a "$LOG"
    if compgen -G ".whl/*.whl" >/dev/null; then
        timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    install_used="${install_cmd[*]}"
    timeout "$INSTALL_CAP" "${install_cmd[@]}" >>"$LOG" 2>&1
    install_rc=$?
    if ! (cd /tmp && "${import_check[@]}") >>"$LOG" 2>&1; then
        # one failed step must not lose the call: a plain install on PYTHONPATH; PYTHONSAFEPATH keeps `python -m`
        # from putting the checkout (whose ddpm_fast/ has no kernels/) first on the path
        echo "=== [$SECONDS s] editable install unusable (exit $install_rc): ${target_cmd[*]}" | tee -a "$LOG"
        rm -rf "$SITE_DDPM"
        timeout "$(cap_for 90 0)" "${target_cmd[@]}" >>"$LOG" 2>&1
        export PYTHONPATH="$SITE_DDPM${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
        install_used="${target_cmd[*]}"
        (cd /tmp && "${import_check[@]}") >>"$LOG" 2>&1
        install_rc=$?
    else
        install_rc=0
    fi
    install_s=$SECONDS
    if ! "$PY" benchmarks/gpu_stage.py start --json "$RECORD" --stage "$stage" --predicted-s "$PREDICTED_S" \
            --compiles "$COMPILES" --argv "$0 $stage (BUDGET_S=$BUDGET_S WARM=$WARM, deadline ${DEADLINE_S} s)" >>"$LOG" 2>&1; then
        echo "cannot write the stage record $RECORD (see $LOG)" | tee -a "$LOG"
        exit 1
    fi
    "$PY" benchmarks/gpu_stage.py step --json "$RECORD" --name install --command "$install_used" --cap "$INSTALL_CAP" \
        --rc "$install_rc" --wall "$install_s" --elapsed "$SECONDS" >>"$LOG" 2>&1
    (( install_rc != 0 )) && { echo "install failed (exit $install_rc, see $LOG)" | tee -a "$LOG"; status=1; }
    grep -E '"(device|torch|triton|diffusers)"' "$RECORD" | head -n 4
fi

bench=("$PY" -m ddpm_fast.bench --steps "$STEPS" --case-seconds 20)
# What one bench case can take once started (counted, NOTES.md section 5): its compile plus its timed runs.
# A bench step's --time-budget is its cap minus this, so a case it starts can finish inside the cap.
DEFAULT_CASE_S=100      # diffusers-compiled in default mode (~80 s) + runs at batch 512 (~10 s) + margin
AUTOTUNE_CASE_S=230     # a CIFAR-10 U-Net in max-autotune (~200 s) + runs (~20 s) + margin

# --- the stages --------------------------------------------------------------------------------------
case "$stage" in
first)
    # 1. is the default fast path correct here: FastSampler's defaults (compile mode default), CIFAR-10 U-Net,
    # batch 64 (the bench's first shape: its compile may then come from inductor's cache), vs the fp32 reference
    step verify-sample "$(cap_for 150 "$((DEFAULT_CASE_S + 60))")" 60 sample "$OUT/verify-sample.json" "" -- \
        "$PY" benchmarks/verify_sample.py --model "${VERIFY_MODEL:-cifar10}" --batch 64 --steps 10 \
        --compile-mode "${VERIFY_COMPILE_MODE:-default}" --out "$OUT/verify-sample.json"
    # 2. how fast against diffusers: eager and compiled, batch 64 then 512 (plan_cases' order: eager first,
    # then per batch size ddpm_fast and diffusers-compiled)
    cap=$(cap_for 450 0)
    step bench-first "$cap" "$DEFAULT_CASE_S" bench "$OUT/bench-first.json" "" -- "${bench[@]}" --only sampling \
        --impls diffusers,diffusers-compiled,ddpm_fast --batch-sizes 64,512 \
        --compile-mode default --fast-compile-mode default --time-budget $((cap - DEFAULT_CASE_S)) \
        --out "$OUT/bench-first.json" "${EXTRA[@]}"
    ;;
verify)
    # -v streams one line per finished test to the log: a run cut at its cap is summarised from it
    step pytest-cuda "$(cap_for 300 60)" 60 pytest "$OUT/pytest-cuda.xml" "$OUT/pytest-cuda.log" -- \
        "$PY" -m pytest -m cuda tests -v -rA -p no:cacheprovider --junitxml "$OUT/pytest-cuda.xml"
    for dtype in fp32 bf16; do
        reserve=0
        [[ $dtype == fp32 ]] && reserve=30
        step "kernels-$dtype" "$(cap_for 40 "$reserve")" 30 kernels "$OUT/kernels-$dtype.json" "" -- \
            "$PY" benchmarks/bench_kernels.py --dtype "$dtype" --no-compile --iters 20 --repeats 3 \
            --out "$OUT/kernels-$dtype.json"
    done
    ;;
full)
    cap=$(cap_for 540 0)
    fast_mode=()
    [[ -n "${FAST_COMPILE_MODE:-}" ]] && fast_mode=(--fast-compile-mode "$FAST_COMPILE_MODE")
    step bench-max-autotune "$cap" "$AUTOTUNE_CASE_S" bench "$OUT/bench-full.json" "" -- "${bench[@]}" --only sampling \
        --impls ddpm_fast,diffusers-compiled --batch-sizes 64 --compile-mode max-autotune "${fast_mode[@]}" \
        --time-budget $((cap - AUTOTUNE_CASE_S)) --out "$OUT/bench-full.json" "${EXTRA[@]}"
    ;;
full2)
    cap=$(cap_for 450 0)
    step bench-batch1-ablation "$cap" "$DEFAULT_CASE_S" bench "$OUT/bench-full2.json" "" -- "${bench[@]}" --only sampling \
        --impls reference,diffusers,diffusers-compiled,ddpm_fast,ablation --batch-sizes 1 --ablation-batch 64 \
        --compile-mode default --fast-compile-mode default --time-budget $((cap - DEFAULT_CASE_S)) \
        --out "$OUT/bench-full2.json" "${EXTRA[@]}"
    ;;
full3)
    cap=$(cap_for 200 150)
    step bench-training "$cap" 120 bench "$OUT/bench-full3.json" "" -- "${bench[@]}" --only training \
        --train-batch-sizes 128 --train-steps 10 --time-budget $((cap - 120)) \
        --out "$OUT/bench-full3.json" "${EXTRA[@]}"
    # The same case code through pytest-benchmark: eager impls + ddpm_fast at batch 64, the training pair
    # at 128 (its compiled graph comes from inductor's cache, warmed by the step above).
    step pytest-benchmark "$(cap_for 250 0)" 60 pytest-benchmark "$OUT/pytest-benchmark.json" "" -- \
        env DDPM_FAST_BENCH_IMPLS=reference,diffusers,ddpm_fast DDPM_FAST_BENCH_BATCH_SIZES=64 \
        DDPM_FAST_BENCH_TRAIN_BATCH_SIZES=128 DDPM_FAST_BENCH_STEPS=10 DDPM_FAST_BENCH_ROUNDS=3 \
        DDPM_FAST_BENCH_FAST_COMPILE_MODE=default \
        "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$OUT/pytest-benchmark.json"
    ;;
esac

if [[ "$DRY_RUN" == 1 ]]; then
    echo "[dry-run] stage $stage: steps at their caps end by $SIMULATED s of its ${DEADLINE_S} s deadline"
    exit 0
fi
echo "=== [$SECONDS s] done: exit status $status, predicted ${PREDICTED_S} s, deadline ${DEADLINE_S} s; $RECORD" | tee -a "$LOG"
cat "${RECORD%.json}.md"
ls -la "$OUT"
exit "$status"
