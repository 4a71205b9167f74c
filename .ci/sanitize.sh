#!/usr/bin/env bash
# The CPU kernels and the emulated CUDA kernels (the CUDA kernel bodies compiled for the
# host) built with AddressSanitizer + UndefinedBehaviorSanitizer, then the property tests,
# the edge-box tests and the emulation tests run through them on the kernel path. Any
# report fails the step (halt_on_error), so a clean exit means zero reports. The tests run on
# two workers (-n 2), which inherit the preloaded sanitizer runtimes: half the serial time.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/sanitize
# -O1 -g, as AddressSanitizer recommends: readable reports and a shorter compile than -O2
# (the build is most of this step).
pkg="$PWD/$build/pkg"  # absolute: the check below runs from another folder
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DJAX_ROI_SANITIZE=ON -DJAX_ROI_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build" -j 2 >/dev/null
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r jax_roi "$pkg/"
cp "$build"/_ext*.so "$pkg/jax_roi/"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:verify_asan_link_order=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$pkg"
# Prove the sanitized extension is the one that loads (run outside the source tree).
(cd "$build" && python3 -c '
import sys
from jax_roi import ffi
assert "cpu" in ffi.platforms(), "sanitized kernels not loaded"
print("sanitizer step: kernels from", sys.modules["jax_roi._ext"].__file__)')
sanitized_pytest() { pytest -p no:cacheprovider -q -n 2 "$@"; }
sanitized_pytest tests/test_properties.py tests/test_roi_align.py tests/test_roi_pool.py -k "ffi or paths_agree"
# The position-sensitive kernels on the edge boxes, golden data and the raw targets' checks.
sanitized_pytest -m "not slow" tests/test_position_sensitive.py \
  -k "kernels_match or kernels_empty or kernels_torchvision or raw_targets"
# The rotated RoIAlign kernels on the oracle, random angles, edge and absurd boxes, dtypes,
# and the raw targets' checks.
sanitized_pytest -m "not slow" tests/test_rotated.py \
  -k "kernels_match or kernels_boxes_with or kernels_dtypes or kernels_absurd or kernels_raw_targets"
# The CUDA kernels' code run on the host under the same sanitizers: the emulated targets
# against the CPU kernels on every code path and edge shape (K = 0, H = W = 1, C = 1, ragged
# channel counts) with the edge boxes (padding and out-of-range batch indices, NaN, inf,
# 1e30, empty, inverted, off-map, covering). Shared memory of an emulated launch is an
# exact-size heap block, so an access past it is a report too.
sanitized_pytest tests/test_cuda_emulation.py
