// Position-sensitive RoIPool (R-FCN; torchvision's ps_roi_pool, the mean of the whole cells
// of each bin) on CPU: XLA FFI handlers.
//
// NHWC: features [B, H, W, C_out*oh*ow], rois [K, 5], output [K, oh, ow, C_out]. The kernels
// are cpu/position_sensitive.h's with the ps_roi_pool geometry of
// common/position_sensitive.h; the backward is the forward's transpose (boxes get no
// gradient: the bins only pass through rounding).
#include "common/position_sensitive.h"
#include "cpu/position_sensitive.h"

namespace jax_roi {
namespace cpu {
namespace {

ffi::Error PsRoiPoolForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                ffi::Result<ffi::AnyBuffer> out, double spatial_scale) {
  return ps::Forward<PsPoolGeometry>(pool, "jax_roi ps_roi_pool forward", rois, features, *out, spatial_scale, 0);
}

ffi::Error PsRoiPoolBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                 ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_features,
                                 double spatial_scale) {
  return ps::Backward<PsPoolGeometry>(pool, "jax_roi ps_roi_pool backward", cot, rois, features, nullptr,
                                      *d_features, spatial_scale, 0, false);
}

}  // namespace
}  // namespace cpu
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPsPoolForwardCpu, jax_roi::cpu::PsRoiPoolForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C_out]
                                  .Attr<double>("spatial_scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPsPoolBackwardCpu, jax_roi::cpu::PsRoiPoolBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C_out]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale"));
