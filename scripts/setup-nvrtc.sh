#!/usr/bin/env bash
# Installs the NVRTC compiler and CUDA headers that build.rs uses to compile kernels/*.cu at build
# time (PyPI wheels, pinned: their PTX ISA 9.0 and sm_90 CUBIN load on CUDA 13.0 drivers). No GPU is
# needed. Without them the build still succeeds, with a CUDA backend that reports "built without kernels".
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import nvidia.cuda_nvrtc, nvidia.cuda_runtime" 2>/dev/null \
   || [ "$("$PY" -m pip show nvidia-cuda-nvrtc 2>/dev/null | awk '/^Version/{print $2}')" != "13.0.88" ]; then
  "$PY" -m pip install -q --disable-pip-version-check \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-crt==13.0.88
fi
