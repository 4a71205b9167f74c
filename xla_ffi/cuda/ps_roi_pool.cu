// Position-sensitive RoIPool (R-FCN; torchvision's ps_roi_pool, the mean of the whole cells
// of each bin) on CUDA: XLA FFI handlers.
//
// The kernels are cuda/position_sensitive.cuh's with the ps_roi_pool geometry of
// common/position_sensitive.h. The same operands and attributes as cpu/ps_roi_pool.cc, plus
// `deterministic` (int64) on the backward. The host compiler builds this file too
// (cuda/emulated_ps_roi_pool.cc) for the emulated targets.
#include "cuda/position_sensitive.cuh"

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {
namespace {

ffi::Error PsRoiPoolForwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                ffi::Result<ffi::AnyBuffer> out, double spatial_scale) {
  auto exec = JAX_ROI_MAKE_EXEC();
  return ps::Forward<PsPoolGeometry>(exec, "jax_roi ps_roi_pool forward (CUDA)", rois, features, *out, spatial_scale,
                                     0);
}

ffi::Error PsRoiPoolBackwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                 ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_features,
                                 double spatial_scale, int64_t deterministic) {
  auto exec = JAX_ROI_MAKE_EXEC();
  return ps::Backward<PsPoolGeometry>(exec, "jax_roi ps_roi_pool backward (CUDA)", cot, rois, features, nullptr,
                                      *d_features, spatial_scale, 0, false, deterministic);
}

}  // namespace
}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiPsPoolForward),
                              jax_roi::JAX_ROI_CUDA_NS::PsRoiPoolForwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C_out]
                                  .Attr<double>("spatial_scale"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiPsPoolBackward),
                              jax_roi::JAX_ROI_CUDA_NS::PsRoiPoolBackwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C_out]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});
