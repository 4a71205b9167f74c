// The limits every handler (CPU and CUDA) checks on its attributes, in one place. The
// pybind module exports them as jax_roi._ext.limits so that the Python checks can be tested
// against the same numbers.
#ifndef JAX_ROI_XLA_FFI_ROI_LIMITS_H_
#define JAX_ROI_XLA_FFI_ROI_LIMITS_H_

#include <stdint.h>

namespace jax_roi {

// A fixed sampling_ratio s visits s*s samples per bin and sizes per-bin tap buffers, so it
// is bounded; torchvision-scale values (0 to 4) are far below. Adaptive mode (<= 0) has its
// own bound (the sample window of roi_math.h).
constexpr int64_t kMaxSamplingRatio = 1024;

// Feature levels of one multi-level call (the level table is passed to CUDA kernels by
// value, so its size is static).
constexpr int64_t kMaxLevels = 32;

// The deterministic CUDA backward lists rois by 32-bit index.
constexpr int64_t kMaxDeterministicRois = 0x7fffffff;

}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_ROI_LIMITS_H_
