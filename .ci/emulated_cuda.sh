#!/usr/bin/env bash
# The CUDA kernels' own code, compiled for the host into jax_roi._ext, run through the
# kernel-path tests on a machine without a GPU: JAX_ROI_EMULATE_CUDA=1 registers the
# emulated CUDA handlers as the "cpu" targets in place of the CPU kernels, so every
# implementation="ffi" call on CPU executes the CUDA kernel bodies (block by block, phase
# by phase) with the CUDA launch geometry. Needs the extension built (pip install . or the
# in-place build). A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_ROI_EMULATE_CUDA=1
# Refuse to pass vacuously: the emulated targets must be the ones registered.
python3 -c '
from jax_roi import ffi
assert ffi.cuda_emulated(), f"emulated CUDA targets not registered: {ffi.load_error()}"
print("emulated CUDA kernels registered for platform cpu")'
# Emulated against the CPU kernels, call by call, on the shapes that pick each code path.
pytest -p no:cacheprovider -q tests/test_cuda_emulation.py
# The kernel-path tests again, now running the CUDA kernels: parity with the pure-JAX path,
# the float64 oracle and the torchvision golden data, edge boxes, both gradients,
# multi-level, vmap, and the property tests' fast profile.
pytest -p no:cacheprovider -q \
  tests/test_ffi.py tests/test_ffi_transforms.py tests/test_pyramid.py \
  tests/test_roi_align.py tests/test_roi_pool.py tests/test_properties.py \
  -k "ffi or paths_agree"
