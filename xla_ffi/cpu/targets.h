// The CPU FFI handlers (defined with XLA_FFI_DEFINE_HANDLER_SYMBOL in cpu/roi_*.cc and
// cpu/ps_roi_*.cc).
#ifndef JAX_ROI_XLA_FFI_CPU_TARGETS_H_
#define JAX_ROI_XLA_FFI_CPU_TARGETS_H_

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* JaxRoiAlignForwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignBackwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPoolForwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPoolBackwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsAlignForwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsAlignBackwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsPoolForwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsPoolBackwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignRotatedForwardCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignRotatedBackwardCpu(XLA_FFI_CallFrame* call_frame);
}

namespace jax_roi {
namespace cpu {
// Whether the channel loops run their AVX2+FMA variants (cpu/simd.cc).
bool SimdUsesAvx2();
}  // namespace cpu
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CPU_TARGETS_H_
