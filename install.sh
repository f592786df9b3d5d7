#!/usr/bin/env bash
# Create .venv and install slicemoe into it with its dev extras.
# Without an NVIDIA GPU we ask for the CPU build of torch first, so that resolving `torch` later
# does not pull a multi-GB CUDA build; with a GPU, pip picks whatever torch the box wants.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==${SLICEMOE_CPU_TORCH:-2.13.0}" \
      || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    # The simulator's CUDA kernels are Triton; without a GPU the tests run them in Triton's
    # interpreter and compile them for Hopper (a CUDA torch brings its own Triton).
    python -m pip install -q "triton==${SLICEMOE_CPU_TRITON:-3.6.0}"
  fi
fi
python -m pip install -q -e ".[dev]"
echo "installed into $(python -c 'import sys; print(sys.prefix)')"
