#!/usr/bin/env bash
# Device-side check, run from the repository root on the GPU host with the release binary
# (built here, kernels embedded) at target/release/srsde-fast. Needs only the NVIDIA driver.
# Every step has its own timeout; logs go to $CHECK_DIR (default $OUT, else /tmp/srsde-gpu):
#   device.txt, selftest.txt, bench.txt, profile.txt (optional), summary.txt.
# Exit status: non-zero if the selftest or a bench failed.
# Settings (environment): PROFILE=1 adds an Nsight Compute pass (per-kernel GPU time of one
# batch-64 bf16 forward); SELFTEST=0 / BENCH=0 skip those parts.
set -u
CHECK_DIR="${CHECK_DIR:-${OUT:-/tmp/srsde-gpu}}"
BIN="${BIN:-target/release/srsde-fast}"
mkdir -p "$CHECK_DIR"
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START )) s] $*"; }

{
    stamp "device"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv 2>&1
} | tee "$CHECK_DIR/device.txt"

if [ ! -x "$BIN" ]; then
    echo "missing $BIN: build it with 'cargo build --release' where NVRTC is installed" | tee "$CHECK_DIR/summary.txt"
    exit 2
fi

rc_selftest=skipped
if [ "${SELFTEST:-1}" = 1 ]; then
    stamp "selftest (every CUDA op, forward and backward, against the CPU backend)" | tee "$CHECK_DIR/selftest.txt"
    timeout 200 "$BIN" selftest 2>&1 | tee -a "$CHECK_DIR/selftest.txt"
    rc_selftest=${PIPESTATUS[0]}
fi

rc_bench=skipped
if [ "${BENCH:-1}" = 1 ]; then
    rc_bench=0
    B="$CHECK_DIR/bench.txt"
    : >"$B"
    run_bench() { # label, timeout, args...
        local label=$1 t=$2
        shift 2
        stamp "bench: $label" | tee -a "$B"
        timeout "$t" "$BIN" bench --device cuda "$@" 2>&1 | tee -a "$B"
        [ "${PIPESTATUS[0]}" = 0 ] || rc_bench=1
    }
    run_bench "ve-paper batch 1, NFE + PC step (eager and CUDA graph), every precision" 120 \
        --preset ve-paper --batch 1 --iters 10 --pc-step
    run_bench "ve-paper batch 64 NFE throughput, every precision" 90 --preset ve-paper --batch 64 --iters 3
    run_bench "ve-paper training step batch 64, bf16" 90 --preset ve-paper --batch 64 --iters 3 --train --precision bf16
    run_bench "ve-small training step batch 64, bf16" 60 --preset ve-small --batch 64 --iters 3 --train --precision bf16
    run_bench "ve-small batch 1 PC step, bf16" 60 --preset ve-small --batch 1 --iters 10 --pc-step --precision bf16
fi

if [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
    stamp "profile: per-kernel GPU time, ve-paper batch-64 bf16, warm-up + one timed forward" | tee "$CHECK_DIR/profile.txt"
    timeout 150 ncu --metrics gpu__time_duration.sum --csv --launch-count 4000 \
        "$BIN" bench --device cuda --preset ve-paper --batch 64 --iters 1 --precision bf16 \
        >"$CHECK_DIR/ncu.csv" 2>>"$CHECK_DIR/profile.txt"
    # Sum the GPU time per kernel name (ncu's CSV: "Kernel Name" column, metric value last).
    python3 - "$CHECK_DIR/ncu.csv" >>"$CHECK_DIR/profile.txt" 2>&1 <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
h = rows[hdr]; kn = h.index("Kernel Name"); mv = h.index("Metric Value")
tot = collections.Counter(); cnt = collections.Counter()
for r in rows[hdr + 1:]:
    if len(r) <= mv: continue
    try: v = float(r[mv].replace(",", ""))
    except ValueError: continue
    name = r[kn].split("(")[0]; tot[name] += v; cnt[name] += 1
s = sum(tot.values())
print(f"total {s/1e6:.2f} ms over {sum(cnt.values())} kernels")
for k, v in tot.most_common(25): print(f"{v/1e6:9.3f} ms {100*v/s:5.1f} %  {cnt[k]:4d}x  {k}")
PY
    rm -f "$CHECK_DIR/ncu.csv"
fi

{
    stamp "summary"
    if [ -f "$CHECK_DIR/selftest.txt" ]; then
        grep -E "passed, .* failed" "$CHECK_DIR/selftest.txt" | tail -1
        grep "FAIL" "$CHECK_DIR/selftest.txt" | head -30
    fi
    [ -f "$CHECK_DIR/bench.txt" ] && grep -E "^(precision|forward|PC step|train step|peak device)" "$CHECK_DIR/bench.txt"
    echo "selftest exit $rc_selftest, bench exit $rc_bench"
} | tee "$CHECK_DIR/summary.txt"
[ "$rc_selftest" = 0 ] || [ "$rc_selftest" = skipped ]
ok1=$?
[ "$rc_bench" = 0 ] || [ "$rc_bench" = skipped ]
ok2=$?
[ $ok1 = 0 ] && [ $ok2 = 0 ]
