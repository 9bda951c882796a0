#!/usr/bin/env bash
# CPU emulation of the CUDA kernels (no GPU needed): assembles kernels/*.cu into one C++ file
# with emu.h (one OS thread per CUDA thread, real barriers, WMMA emulated per tile), runs them on
# small odd shapes and compares with naive double-precision references. Checks the index
# arithmetic, tiling, barriers and poisoned (NaN) outputs; not timing, not the real tensor cores.
# Usage: scripts/kernel_emu/run.sh   (needs g++ with C++20)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
K="$here/../../kernels"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
    echo '#include "emu.h"'
    cat "$K/common.cuh" "$K/rng.cuh"
    for f in "$K"/*.cu; do
        sed -e 's/#include "common.cuh"//' -e 's/#include "rng.cuh"//' -e 's/#include "mma.cuh"//' \
            -e 's/extern __shared__ float S\[\];/float* S = (float*)g_dyn_smem;/' "$f"
    done
} > "$work/all_kernels.cpp"
# One test program per family: test.cpp (forward kernels) and every test_*.cpp beside it.
status=0
for t in "$here"/test*.cpp; do
    name="$(basename "$t" .cpp)"
    echo "== $name"
    g++ -std=c++20 -O2 -pthread -Wno-pragma-once-outside-header -I"$here/stub" -I"$here" -I"$work" \
        "$t" -o "$work/$name" 2>&1 | grep -v "pragma once" || true
    "$work/$name" || status=1
done
exit $status
