#!/usr/bin/env bash
# The test command: installs what the build needs (NVRTC wheels, so every CUDA kernel is compiled),
# then runs the whole test suite. Tests read ../shared/golden (beside the checkout). CUDA tests print
# that they skipped when there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-nvrtc.sh
# --show-output: the output of passing tests too, so a GPU test that skipped says so in the log.
cargo test --all-targets -- --show-output 2>&1
