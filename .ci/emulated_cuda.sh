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
# (The emulated kernels against the CPU kernels, call by call on the shapes that pick each
# code path, tests/test_cuda_emulation.py, run in the sanitizer step, under ASan + UBSan.)
# The kernel-path tests again, now running the CUDA kernels: torchvision golden data and
# the float64 oracle (roi_align, roi_warp, roi_pool, multi-level), edge boxes, feature and
# box gradients, vmap, registration, threads, the oracle property tests' fast profile; the
# position-sensitive ops (ps_roi_align, ps_roi_pool); rotated RoIAlign.
# (The slowest pure-JAX comparisons stay in the main run: the emulation is run here for
# what the kernels compute, within a few minutes.)
# The quick subset (-m "not slow") of each: every test function once per path.
pytest -p no:cacheprovider -q -n 2 -m "not slow" tests/test_roi_align.py tests/test_roi_pool.py tests/test_pyramid.py \
  tests/test_properties.py tests/test_concurrency.py -k "ffi or registration or threads"
pytest -p no:cacheprovider -q -n 2 -m "not slow" tests/test_ffi_transforms.py \
  -k "not nested and not checkpoint and not lowers and (both or rois or box_gradient or registering or broadcast)"
pytest -p no:cacheprovider -q -n 2 -m "not slow" tests/test_ffi.py \
  -k "dtypes or empty or absurd or worked_example or ties or golden or reject or nchw or multilevel_matches"
# The position-sensitive ops' kernel-path tests: golden data, the oracle on edge boxes,
# dtypes, absurd boxes, transforms, the raw targets' checks.
pytest -p no:cacheprovider -q -n 2 -m "not slow" tests/test_position_sensitive.py -k "kernels or raw_targets"
# Rotated RoIAlign's kernel-path tests: the oracle on random angles and edge boxes, wide and
# absurd boxes, dtypes, box gradients, transforms, the raw targets' checks.
pytest -p no:cacheprovider -q -n 2 -m "not slow" tests/test_rotated.py -k "kernels"
