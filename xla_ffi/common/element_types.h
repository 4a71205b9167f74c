// The feature element types of every kernel (CPU, CUDA, emulated CUDA): storage types
// float, double, bf16, f16; the accumulation type of each (float, double for double); and
// the conversions between them, by the bit operations of roi_math.h (round to nearest even,
// as XLA's convert). ROI_HD: device code calls them too.
#ifndef JAX_ROI_XLA_FFI_COMMON_ELEMENT_TYPES_H_
#define JAX_ROI_XLA_FFI_COMMON_ELEMENT_TYPES_H_

#include <stdint.h>

#include "common/roi_math.h"

namespace jax_roi {

// 16-bit floats as their bits (no arithmetic on them: they are widened to float).
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

// Accumulation (and coordinate) type of a storage type: float, double for double.
template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

ROI_HD inline float to_acc(float v) { return v; }
ROI_HD inline double to_acc(double v) { return v; }
ROI_HD inline float to_acc(bf16 v) { return bf16_to_float(v.bits); }
ROI_HD inline float to_acc(f16 v) { return half_to_float(v.bits); }

// Store<S>::from(a): an accumulated value rounded to the storage type.
template <typename S>
struct Store;
template <>
struct Store<float> {
  ROI_HD static float from(float v) { return v; }
};
template <>
struct Store<double> {
  ROI_HD static double from(double v) { return v; }
};
template <>
struct Store<bf16> {
  ROI_HD static bf16 from(float v) { return bf16{float_to_bf16(v)}; }
};
template <>
struct Store<f16> {
  ROI_HD static f16 from(float v) { return f16{float_to_half(v)}; }
};

}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_COMMON_ELEMENT_TYPES_H_
