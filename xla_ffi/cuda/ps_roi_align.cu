// Position-sensitive RoIAlign (R-FCN; torchvision's ps_roi_align) on CUDA: XLA FFI handlers.
//
// The kernels are cuda/position_sensitive.cuh's with the ps_roi_align geometry of
// common/position_sensitive.h (the same per-sample arithmetic as the CPU kernels). The
// same operands and attributes as cpu/ps_roi_align.cc, plus `deterministic` (int64) on the
// backward. The host compiler builds this file too (cuda/emulated_ps_roi_align.cc) for the
// emulated targets.
#include "cuda/position_sensitive.cuh"

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {
namespace {

ffi::Error PsRoiAlignForwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                 ffi::Result<ffi::AnyBuffer> out, double spatial_scale, int64_t sampling_ratio) {
  const char* op = "jax_roi ps_roi_align forward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  if (auto err = CheckSamplingRatio(op, sampling_ratio); err.failure()) return err;
  return ps::Forward<PsAlignGeometry>(exec, op, rois, features, *out, spatial_scale, sampling_ratio);
}

ffi::Error PsRoiAlignBackwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                  ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_rois,
                                  ffi::Result<ffi::AnyBuffer> d_features, double spatial_scale, int64_t sampling_ratio,
                                  int64_t rois_grad, int64_t deterministic) {
  const char* op = "jax_roi ps_roi_align backward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  if (auto err = CheckSamplingRatio(op, sampling_ratio); err.failure()) return err;
  return ps::Backward<PsAlignGeometry>(exec, op, cot, rois, features, &*d_rois, *d_features, spatial_scale,
                                       sampling_ratio, rois_grad != 0, deterministic);
}

}  // namespace
}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiPsAlignForward),
                              jax_roi::JAX_ROI_CUDA_NS::PsRoiAlignForwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C_out]
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiPsAlignBackward),
                              jax_roi::JAX_ROI_CUDA_NS::PsRoiAlignBackwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C_out]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C_out*oh*ow]
                                  .Ret<ffi::AnyBuffer>()  // d_rois [K, 5]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("rois_grad")
                                  .Attr<int64_t>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});
