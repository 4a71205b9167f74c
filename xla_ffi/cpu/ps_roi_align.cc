// Position-sensitive RoIAlign (R-FCN; torchvision's ps_roi_align) on CPU: XLA FFI handlers.
//
// NHWC: features [B, H, W, C_out*oh*ow], rois [K, 5], output [K, oh, ow, C_out]; output
// channel c of bin (ph, pw) is aligned RoIAlign of input channel (c*oh + ph)*ow + pw over
// that bin. The kernels (forward; backward with the feature and, when asked for, the box
// gradient) are cpu/position_sensitive.h's with the ps_roi_align geometry of
// common/position_sensitive.h.
#include <string>

#include "common/checks.h"
#include "common/position_sensitive.h"
#include "cpu/position_sensitive.h"

namespace jax_roi {
namespace cpu {
namespace {

ffi::Error PsRoiAlignForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                 ffi::Result<ffi::AnyBuffer> out, double spatial_scale, int64_t sampling_ratio) {
  const char* op = "jax_roi ps_roi_align forward";
  if (auto err = CheckSamplingRatio(op, sampling_ratio); err.failure()) return err;
  return ps::Forward<PsAlignGeometry>(pool, op, rois, features, *out, spatial_scale, sampling_ratio);
}

ffi::Error PsRoiAlignBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                  ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_rois,
                                  ffi::Result<ffi::AnyBuffer> d_features, double spatial_scale, int64_t sampling_ratio,
                                  int64_t rois_grad) {
  const char* op = "jax_roi ps_roi_align backward";
  if (auto err = CheckSamplingRatio(op, sampling_ratio); err.failure()) return err;
  return ps::Backward<PsAlignGeometry>(pool, op, cot, rois, features, &*d_rois, *d_features, spatial_scale,
                                       sampling_ratio, rois_grad != 0);
}

}  // namespace
}  // namespace cpu
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPsAlignForwardCpu, jax_roi::cpu::PsRoiAlignForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C_out]
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPsAlignBackwardCpu, jax_roi::cpu::PsRoiAlignBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C_out]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // d_rois [K, 5]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("rois_grad"));
