#!/usr/bin/env bash
# The test command: installs what the build needs (NVRTC wheels, so every CUDA kernel is compiled),
# then runs the whole test suite. Tests read ../shared/golden (beside the checkout). CUDA tests print
# that they skipped when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-nvrtc.sh
# --show-output: the output of passing tests too, so a GPU test that skipped says so in the log.
cargo test --all-targets -- --show-output 2>&1
# The CPU backend picks its kernels at run time (AVX-512 or AVX2 GEMM kernels, the gemm crate,
# AVX-512, AVX2 or baseline loops); the run above takes this machine's best. Check the other routes too:
# the CPU op tests and the golden networks, each under a forced route.
for route in SRSDE_CPU_GEMM=avx2 SRSDE_CPU_GEMM=crate SRSDE_CPU_SIMD=avx2 SRSDE_CPU_SIMD=baseline; do
    echo "== CPU route $route"
    env "$route" cargo test --lib backend::cpu 2>&1
    env "$route" cargo test --test network_golden --test cpu_ops 2>&1
done
