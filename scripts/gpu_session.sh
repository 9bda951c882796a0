#!/usr/bin/env bash
# The prepared GPU session, as two device calls issued back to back on the warm machine:
#   part 1 (check):  scripts/gpu_check.sh — selftest of every kernel, forward/PC-step/training
#                    benchmarks, optional Nsight Compute profile; logs in $OUT/check/ (≤ 5 files);
#   part 2 (train):  scripts/train_default.sh — time-boxed default-model training, f16 export,
#                    evaluation; $OUT gets model/, report.md, logs.tar.gz, sheets.tar.gz.
# Usage (from the repository root): bash scripts/gpu_session.sh check|train
set -u
part="${1:-check}"
OUT="${OUT:-/tmp/srsde-gpu}"
case "$part" in
check)
    CHECK_DIR="$OUT/check" bash scripts/gpu_check.sh
    ;;
train)
    OUT="$OUT" BENCH=0 bash scripts/train_default.sh
    ;;
*)
    echo "usage: $0 check|train" >&2
    exit 2
    ;;
esac
