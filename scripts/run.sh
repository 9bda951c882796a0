#!/usr/bin/env bash
# The main job: sets up, builds the release binary and runs it with the given arguments, e.g.
#   ./scripts/run.sh upscale faces/ -o out/ --model model.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-nvrtc.sh || echo "note: NVRTC wheels not installed; building without CUDA kernels" >&2
cargo build --release --quiet
exec ./target/release/srsde-fast "$@"
