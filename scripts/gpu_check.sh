#!/usr/bin/env bash
# Device-side check, run from the repository root on the GPU host with the release binary
# (built here, kernels embedded) at target/release/srsde-fast. Needs only the NVIDIA driver.
# Logs go to $OUT (the device tool's output folder; /tmp/srsde-gpu otherwise). The last lines
# are a short summary. Exit status: non-zero if the selftest or the bench failed.
set -u
OUT="${OUT:-/tmp/srsde-gpu}"
BIN="${BIN:-target/release/srsde-fast}"
mkdir -p "$OUT"

echo "== device" | tee "$OUT/device.txt"
nvidia-smi 2>&1 | tee -a "$OUT/device.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv 2>&1 | tee -a "$OUT/device.txt"

if [ ! -x "$BIN" ]; then
    echo "missing $BIN: build it with 'cargo build --release' where NVRTC is installed" | tee "$OUT/summary.txt"
    exit 2
fi

echo "== selftest (every CUDA op against the CPU backend)"
timeout 150 "$BIN" selftest 2>&1 | tee "$OUT/selftest.txt"
rc_selftest=${PIPESTATUS[0]}

echo "== bench"
timeout 150 "$BIN" bench --device cuda --preset ve-paper --batch 1 --iters 10 --pc-step 2>&1 | tee "$OUT/bench.txt"
rc_bench=${PIPESTATUS[0]}
timeout 150 "$BIN" bench --device cuda --preset ve-paper --batch 64 --iters 3 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || rc_bench=1

# Optional: the CUDA integration tests (selftest + per-kernel timings), if their binary was carried:
#   cargo test --release --no-run --test cuda_ops
#   cp "$(ls target/release/deps/cuda_ops-* | grep -v '\.d$' | head -1)" target/release/cuda_ops_test
rc_tests=skipped
TESTS="${CUDA_OPS_TEST:-target/release/cuda_ops_test}"
if [ -x "$TESTS" ]; then
    echo "== cuda_ops tests"
    timeout 150 "$TESTS" --nocapture --test-threads=1 2>&1 | tee "$OUT/cuda_ops_tests.txt"
    rc_tests=${PIPESTATUS[0]}
fi

{
    echo "== summary"
    grep -c " ok$" "$OUT/selftest.txt" | sed 's/^/selftest rows ok: /'
    grep "FAIL" "$OUT/selftest.txt" | head -20
    echo "selftest exit $rc_selftest, bench exit $rc_bench, tests $rc_tests"
} | tee "$OUT/summary.txt"
[ "$rc_selftest" = 0 ] && [ "$rc_bench" = 0 ]
