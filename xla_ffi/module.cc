// pybind11 module jax_roi._ext: hands the XLA FFI handlers to Python as capsules, which
// jax_roi/ffi/_loader.py registers with jax.ffi.register_ffi_target.
//
// Target names (the same on every platform; the platform is given at registration):
//   jax_roi_roi_align_fwd, jax_roi_roi_align_bwd, jax_roi_roi_pool_fwd, jax_roi_roi_pool_bwd,
//   jax_roi_ps_roi_align_fwd, jax_roi_ps_roi_align_bwd, jax_roi_ps_roi_pool_fwd,
//   jax_roi_ps_roi_pool_bwd, jax_roi_roi_align_rotated_fwd, jax_roi_roi_align_rotated_bwd
#include <pybind11/pybind11.h>

#include "common/roi_limits.h"
#include "cpu/targets.h"

// The CUDA kernels built by the host compiler (xla_ffi/cuda/emulated_*.cc, the same .cu
// sources): CPU handlers with the CUDA targets' operands and attributes.
extern "C" {
XLA_FFI_Error* JaxRoiAlignForwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignBackwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPoolForwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPoolBackwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsAlignForwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsAlignBackwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsPoolForwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsPoolBackwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignRotatedForwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignRotatedBackwardCudaEmulated(XLA_FFI_CallFrame* call_frame);
}

#ifdef JAX_ROI_WITH_CUDA
// The CUDA FFI handlers (XLA_FFI_DEFINE_HANDLER_SYMBOL in xla_ffi/cuda/*.cu).
extern "C" {
XLA_FFI_Error* JaxRoiAlignForwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignBackwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPoolForwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPoolBackwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsAlignForwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsAlignBackwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsPoolForwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiPsPoolBackwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignRotatedForwardCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxRoiAlignRotatedBackwardCuda(XLA_FFI_CallFrame* call_frame);
}
#endif

namespace py = pybind11;

namespace {

template <typename Fn>
py::capsule Capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler takes XLA_FFI_CallFrame* and returns XLA_FFI_Error*");
  return py::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

PYBIND11_MODULE(_ext, m) {
  m.doc() = "jax_roi XLA FFI kernels";
  m.def("cpu_targets", []() {
    py::dict d;
    d["jax_roi_roi_align_fwd"] = Capsule(JaxRoiAlignForwardCpu);
    d["jax_roi_roi_align_bwd"] = Capsule(JaxRoiAlignBackwardCpu);
    d["jax_roi_roi_pool_fwd"] = Capsule(JaxRoiPoolForwardCpu);
    d["jax_roi_roi_pool_bwd"] = Capsule(JaxRoiPoolBackwardCpu);
    d["jax_roi_ps_roi_align_fwd"] = Capsule(JaxRoiPsAlignForwardCpu);
    d["jax_roi_ps_roi_align_bwd"] = Capsule(JaxRoiPsAlignBackwardCpu);
    d["jax_roi_ps_roi_pool_fwd"] = Capsule(JaxRoiPsPoolForwardCpu);
    d["jax_roi_ps_roi_pool_bwd"] = Capsule(JaxRoiPsPoolBackwardCpu);
    d["jax_roi_roi_align_rotated_fwd"] = Capsule(JaxRoiAlignRotatedForwardCpu);
    d["jax_roi_roi_align_rotated_bwd"] = Capsule(JaxRoiAlignRotatedBackwardCpu);
    return d;
  });
  // Which variant of the CPU channel loops runs: "avx2+fma" or "baseline" (SSE2 / NEON;
  // forced by the environment variable JAX_ROI_NO_AVX2).
  m.def("cpu_simd", []() { return jax_roi::cpu::SimdUsesAvx2() ? "avx2+fma" : "baseline"; });
  // The CUDA build (JAX_ROI_CUDA): same names, registered for platform "CUDA". The
  // backward targets take one more attribute than the CPU ones: `deterministic` (int64).
#ifdef JAX_ROI_WITH_CUDA
  m.def("cuda_targets", []() {
    py::dict d;
    d["jax_roi_roi_align_fwd"] = Capsule(JaxRoiAlignForwardCuda);
    d["jax_roi_roi_align_bwd"] = Capsule(JaxRoiAlignBackwardCuda);
    d["jax_roi_roi_pool_fwd"] = Capsule(JaxRoiPoolForwardCuda);
    d["jax_roi_roi_pool_bwd"] = Capsule(JaxRoiPoolBackwardCuda);
    d["jax_roi_ps_roi_align_fwd"] = Capsule(JaxRoiPsAlignForwardCuda);
    d["jax_roi_ps_roi_align_bwd"] = Capsule(JaxRoiPsAlignBackwardCuda);
    d["jax_roi_ps_roi_pool_fwd"] = Capsule(JaxRoiPsPoolForwardCuda);
    d["jax_roi_ps_roi_pool_bwd"] = Capsule(JaxRoiPsPoolBackwardCuda);
    d["jax_roi_roi_align_rotated_fwd"] = Capsule(JaxRoiAlignRotatedForwardCuda);
    d["jax_roi_roi_align_rotated_bwd"] = Capsule(JaxRoiAlignRotatedBackwardCuda);
    return d;
  });
  m.attr("has_cuda") = true;
#else
  m.def("cuda_targets", []() { return py::dict(); });
  m.attr("has_cuda") = false;
#endif
  // The CUDA kernels run on the host (JAX_ROI_EMULATE_CUDA=1): the CUDA targets' names,
  // operands and attributes (the backward's `deterministic` too), registered for platform
  // "cpu" in place of cpu_targets(). Slow; for tests of the CUDA kernels without a GPU.
  m.def("emulated_cuda_targets", []() {
    py::dict d;
    d["jax_roi_roi_align_fwd"] = Capsule(JaxRoiAlignForwardCudaEmulated);
    d["jax_roi_roi_align_bwd"] = Capsule(JaxRoiAlignBackwardCudaEmulated);
    d["jax_roi_roi_pool_fwd"] = Capsule(JaxRoiPoolForwardCudaEmulated);
    d["jax_roi_roi_pool_bwd"] = Capsule(JaxRoiPoolBackwardCudaEmulated);
    d["jax_roi_ps_roi_align_fwd"] = Capsule(JaxRoiPsAlignForwardCudaEmulated);
    d["jax_roi_ps_roi_align_bwd"] = Capsule(JaxRoiPsAlignBackwardCudaEmulated);
    d["jax_roi_ps_roi_pool_fwd"] = Capsule(JaxRoiPsPoolForwardCudaEmulated);
    d["jax_roi_ps_roi_pool_bwd"] = Capsule(JaxRoiPsPoolBackwardCudaEmulated);
    d["jax_roi_roi_align_rotated_fwd"] = Capsule(JaxRoiAlignRotatedForwardCudaEmulated);
    d["jax_roi_roi_align_rotated_bwd"] = Capsule(JaxRoiAlignRotatedBackwardCudaEmulated);
    return d;
  });
  // The attribute limits every handler checks (roi_limits.h), so that Python's own checks
  // can be tested against them.
  {
    py::dict limits;
    limits["max_sampling_ratio"] = jax_roi::kMaxSamplingRatio;
    limits["max_levels"] = jax_roi::kMaxLevels;
    limits["max_deterministic_rois"] = jax_roi::kMaxDeterministicRois;
    m.attr("limits") = limits;
  }
  // Bumped whenever a target's operands or attributes change, or targets are added (2: the
  // position-sensitive ops; 3: roi_align_rotated); the Python side checks it.
  m.attr("abi_version") = 3;
}
