#!/usr/bin/env bash
# Create .venv and install slicemoe into it with its dev extras.
# uv resolves and installs the stack (~2 GB of wheels) in well under a minute where pip takes
# several. Without an NVIDIA GPU we install the CPU build of torch first, so that resolving
# `torch` later does not pull a multi-GB CUDA build; with a GPU, uv picks the default torch.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check uv
# Where PYTHONDONTWRITEBYTECODE is set, no process may cache bytecode, and each would compile
# torch, transformers, Ray and MLflow from source every time it starts (the tests start
# hundreds: sweep drivers, Ray workers, MLflow servers): there all 25,000 files are compiled
# here (the install 18 s -> 56 s on a 2-core box). Elsewhere Python caches what is imported,
# the first time it is.
compile=()
[ -z "${PYTHONDONTWRITEBYTECODE:-}" ] || compile=(--compile-bytecode)
uv() { .venv/bin/python -m uv pip "$1" -q "${compile[@]}" --python .venv/bin/python "${@:2}"; }
# Wheels that lie on this machine's disk (pip's find-links) are offered to uv as well.
links=()
for folder in ${PIP_FIND_LINKS:-}; do [ -d "$folder" ] && links+=(--find-links "$folder"); done
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    uv install "${links[@]}" torch
  else
    uv install "${links[@]}" "torch==${SLICEMOE_CPU_TORCH:-2.13.0}" \
      || uv install torch --index-url https://download.pytorch.org/whl/cpu
    # The simulator's CUDA kernels are Triton; without a GPU the tests run them in Triton's
    # interpreter and compile them for Hopper (a CUDA torch brings its own Triton).
    uv install "triton==${SLICEMOE_CPU_TRITON:-3.6.0}"
  fi
fi
uv install "${links[@]}" -e ".[dev]"
echo "installed into $(.venv/bin/python -c 'import sys; print(sys.prefix)')"
