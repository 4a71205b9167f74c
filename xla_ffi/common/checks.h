// The operand and attribute checks of every XLA FFI handler (CPU, CUDA, emulated CUDA), in
// one place: the same conditions and messages on every device. Host code only.
#ifndef JAX_ROI_XLA_FFI_COMMON_CHECKS_H_
#define JAX_ROI_XLA_FFI_COMMON_CHECKS_H_

#include <stddef.h>
#include <stdint.h>

#include <initializer_list>
#include <sstream>
#include <string>

#include "common/element_types.h"
#include "common/roi_limits.h"
#include "common/roi_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_roi {

namespace ffi = xla::ffi;

// Calls f(S{}) with the storage type S of `dtype`; false if the dtype is unsupported.
template <typename F>
bool DispatchFloat(ffi::DataType dtype, F&& f) {
  switch (dtype) {
    case ffi::DataType::F32:
      f(float{});
      return true;
    case ffi::DataType::F64:
      f(double{});
      return true;
    case ffi::DataType::BF16:
      f(bf16{});
      return true;
    case ffi::DataType::F16:
      f(f16{});
      return true;
    default:
      return false;
  }
}

inline const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return "float32";
    case ffi::DataType::F64:
      return "float64";
    case ffi::DataType::BF16:
      return "bfloat16";
    case ffi::DataType::F16:
      return "float16";
    case ffi::DataType::S32:
      return "int32";
    case ffi::DataType::S64:
      return "int64";
    default:
      return "an unsupported dtype";
  }
}

inline std::string ShapeString(ffi::AnyBuffer::Dimensions d) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < d.size(); ++i) os << (i ? ", " : "") << d[i];
  os << "]";
  return os.str();
}

inline ffi::Error Invalid(const std::string& msg) { return ffi::Error::InvalidArgument(msg); }

// The coordinate (rois) and gradient-accumulation dtype of a feature dtype.
inline ffi::DataType CoordType(ffi::DataType feature_dtype) {
  return feature_dtype == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

inline ffi::Error CheckFeatureDtype(const char* op, ffi::DataType dtype) {
  if (!DispatchFloat(dtype, [](auto) {})) {
    return Invalid(std::string(op) + ": features: expected float32, float64, bfloat16 or float16, got " +
                   DtypeName(dtype));
  }
  return ffi::Error::Success();
}

// rois [K, width] (5: boxes, 6: rotated boxes) in the coordinate dtype of the features.
inline ffi::Error CheckRois(const ffi::AnyBuffer& rois, ffi::DataType feature_dtype, const char* op,
                            int64_t* num_rois, int64_t width = 5) {
  auto d = rois.dimensions();
  if (d.size() != 2 || d[1] != width) {
    return Invalid(std::string(op) + ": rois: expected shape [K, " + std::to_string(width) + "], got " +
                   ShapeString(d));
  }
  if (rois.element_type() != CoordType(feature_dtype)) {
    return Invalid(std::string(op) + ": rois: expected dtype " + DtypeName(CoordType(feature_dtype)) + " for " +
                   DtypeName(feature_dtype) + " features, got " + DtypeName(rois.element_type()));
  }
  *num_rois = d[0];
  return ffi::Error::Success();
}

inline ffi::Error CheckShape(const ffi::AnyBuffer& b, std::initializer_list<int64_t> want, ffi::DataType dtype,
                             const std::string& what) {
  auto d = b.dimensions();
  bool ok = d.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) {
    if (!ok) break;
    ok = d[i++] == w;
  }
  if (!ok) {
    std::ostringstream os;
    os << "[";
    i = 0;
    for (int64_t w : want) os << (i++ ? ", " : "") << w;
    os << "]";
    return Invalid(what + ": expected shape " + os.str() + ", got " + ShapeString(d));
  }
  if (b.element_type() != dtype) {
    return Invalid(what + ": expected dtype " + DtypeName(dtype) + ", got " + DtypeName(b.element_type()));
  }
  return ffi::Error::Success();
}

// Checks the args [first, first + count) as feature levels [B, H_l, W_l, C] of one dtype and
// one B and C; visit(l, buffer) records each (the devices keep different level tables).
template <typename Visit>
ffi::Error CheckLevels(const ffi::RemainingArgs& args, size_t first, size_t count, const char* op,
                       ffi::DataType* dtype, int64_t* batch, int64_t* channels, Visit&& visit) {
  for (size_t l = 0; l < count; ++l) {
    auto buf = args.get<ffi::AnyBuffer>(first + l);
    if (buf.has_error()) return buf.error();
    const ffi::AnyBuffer& f = *buf;
    auto d = f.dimensions();
    if (d.size() != 4) {
      return Invalid(std::string(op) + ": features level " + std::to_string(l) +
                     ": expected rank 4 [B, H, W, C], got shape " + ShapeString(d));
    }
    if (l == 0) {
      *dtype = f.element_type();
      *batch = d[0];
      *channels = d[3];
    } else {
      if (f.element_type() != *dtype) {
        return Invalid(std::string(op) + ": features level " + std::to_string(l) + ": expected dtype " +
                       DtypeName(*dtype) + " like level 0, got " + DtypeName(f.element_type()));
      }
      if (d[0] != *batch || d[3] != *channels) {
        return Invalid(std::string(op) + ": features level " + std::to_string(l) +
                       ": expected the batch and channel sizes of level 0, got shape " + ShapeString(d));
      }
    }
    visit(l, f);
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckSamplingRatio(const char* op, int64_t sampling_ratio) {
  if (sampling_ratio > kMaxSamplingRatio) {
    // sampling_ratio^2 samples per bin (per-bin buffers on the CPU, per thread on the GPU).
    return Invalid(std::string(op) + ": sampling_ratio: expected at most " + std::to_string(kMaxSamplingRatio) +
                   " samples per bin side (or <= 0, adaptive), got " + std::to_string(sampling_ratio));
  }
  return ffi::Error::Success();
}

// The roi_align attributes that do not depend on the operands (checked before them).
inline ffi::Error CheckAlignAttrs(const char* op, size_t num_levels, ffi::Span<const double> scales,
                                  int64_t sampling_ratio, int64_t reduction) {
  if (num_levels < 1) return Invalid(std::string(op) + ": expected at least one feature level");
  if (num_levels > static_cast<size_t>(kMaxLevels)) {
    return Invalid(std::string(op) + ": expected at most " + std::to_string(kMaxLevels) + " feature levels, got " +
                   std::to_string(num_levels));
  }
  if (scales.size() != num_levels) {
    return Invalid(std::string(op) + ": spatial_scales: expected one scale per feature level (" +
                   std::to_string(num_levels) + "), got " + std::to_string(scales.size()));
  }
  if (auto err = CheckSamplingRatio(op, sampling_ratio); err.failure()) return err;
  if (reduction != 0 && reduction != 1) {
    return Invalid(std::string(op) + ": reduction: expected 0 (avg) or 1 (max), got " + std::to_string(reduction));
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckAlignScales(const char* op, ffi::Span<const double> scales) {
  for (size_t l = 0; l < scales.size(); ++l) {
    if (!(scales[l] > 0) || !roi_finite(scales[l])) {
      return Invalid(std::string(op) + ": spatial_scales: expected finite scales > 0, got " +
                     std::to_string(scales[l]) + " for level " + std::to_string(l));
    }
  }
  return ffi::Error::Success();
}

// The features [B, H, W, C] and the spatial scale of a single-map op (roi_pool and the
// position-sensitive ops).
inline ffi::Error CheckSingleMap(const char* op, const ffi::AnyBuffer& features, double scale, ffi::DataType* dtype) {
  auto fd = features.dimensions();
  if (fd.size() != 4) {
    return Invalid(std::string(op) + ": features: expected rank 4 [B, H, W, C], got shape " + ShapeString(fd));
  }
  *dtype = features.element_type();
  if (auto err = CheckFeatureDtype(op, *dtype); err.failure()) return err;
  if (!(scale > 0) || !roi_finite(scale)) {
    return Invalid(std::string(op) + ": spatial_scale: expected a finite number > 0, got " + std::to_string(scale));
  }
  return ffi::Error::Success();
}

// The roi_pool features, scale and binning; then the rois.
inline ffi::Error CheckPool(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, double scale,
                            int64_t binning, ffi::DataType* dtype, int64_t* num_rois) {
  if (auto err = CheckSingleMap(op, features, scale, dtype); err.failure()) return err;
  if (binning != kPoolCaffe && binning != kPoolFloor) {
    return Invalid(std::string(op) + ": binning: expected 0 (caffe) or 1 (floor), got " + std::to_string(binning));
  }
  return CheckRois(rois, *dtype, op, num_rois);
}

// The per-bin result of a position-sensitive op (its output or cotangent `what`): dtype,
// shape [K, oh >= 1, ow >= 1, C_out] with C_out * oh * ow = C, the features' channels.
// Sets *oh and *ow.
inline ffi::Error CheckPositionSensitiveBins(const char* op, const char* what, const ffi::AnyBuffer& b, int64_t K,
                                             int64_t C, ffi::DataType dtype, int64_t* oh, int64_t* ow) {
  auto d = b.dimensions();
  const bool ok = d.size() == 4 && d[0] == K && d[1] >= 1 && d[2] >= 1 && d[3] * d[1] * d[2] == C &&
                  b.element_type() == dtype;
  if (!ok) {
    return Invalid(std::string(op) + ": " + what + ": expected " + DtypeName(dtype) + " [K=" + std::to_string(K) +
                   ", oh, ow, C_out] with C_out * oh * ow = C=" + std::to_string(C) + " (the features' channels), got " +
                   DtypeName(b.element_type()) + " " + ShapeString(d));
  }
  *oh = d[1];
  *ow = d[2];
  return ffi::Error::Success();
}

// A feature gradient [n*B, H, W, C] in the accumulation dtype `ctype` (n >= 1; vmap folds a
// mapped axis into the images: roi batch index b reads image b % B). Sets *out_batch = n*B.
inline ffi::Error CheckFeatureGradient(const char* op, const ffi::AnyBuffer& d, ffi::AnyBuffer::Dimensions fd,
                                       ffi::DataType ctype, int64_t* out_batch) {
  auto dd = d.dimensions();
  const int64_t B = fd[0];
  const int64_t n = dd.size() == 4 ? dd[0] : -1;
  const bool batch_ok = B == 0 ? n == 0 : (n >= 0 && n % B == 0);
  if (dd.size() != 4 || !batch_ok || dd[1] != fd[1] || dd[2] != fd[2] || dd[3] != fd[3] || d.element_type() != ctype) {
    return Invalid(std::string(op) + ": d_features: expected " + DtypeName(ctype) + " [n*" + std::to_string(B) + ", " +
                   std::to_string(fd[1]) + ", " + std::to_string(fd[2]) + ", " + std::to_string(fd[3]) + "], got " +
                   DtypeName(d.element_type()) + " " + ShapeString(dd));
  }
  *out_batch = n;
  return ffi::Error::Success();
}

// A cotangent (or, `what`, an output) [K, oh, ow, C] of the features' dtype (oh, ow >= 1).
inline ffi::Error CheckCotangent(const char* op, const ffi::AnyBuffer& cot, int64_t K, int64_t C, ffi::DataType dtype,
                                 const char* what = "cotangent") {
  auto cd = cot.dimensions();
  if (cd.size() != 4 || cd[0] != K || cd[1] < 1 || cd[2] < 1 || cd[3] != C || cot.element_type() != dtype) {
    return Invalid(std::string(op) + ": " + what + ": expected " + DtypeName(dtype) + " [K=" + std::to_string(K) +
                   ", oh, ow, C=" + std::to_string(C) + "], got " + DtypeName(cot.element_type()) + " " +
                   ShapeString(cd));
  }
  return ffi::Error::Success();
}

}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_COMMON_CHECKS_H_
