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
    for f in elementwise reduce norm attention fir conv embed rng; do
        sed -e 's/#include "common.cuh"//' -e 's/#include "rng.cuh"//' \
            -e 's/extern __shared__ float S\[\];/float* S = (float*)g_dyn_smem;/' "$K/$f.cu"
    done
} > "$work/all_kernels.cpp"
g++ -std=c++20 -O2 -pthread -Wno-pragma-once-outside-header -I"$here/stub" -I"$here" -I"$work" \
    "$here/test.cpp" -o "$work/test" 2>&1 | grep -v "pragma once" || true
"$work/test"
