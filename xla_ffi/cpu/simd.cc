// Instantiations of the channel-loop kernels of cpu/simd.h. On x86-64 every kernel exists
// twice, for the baseline ISA and for AVX2+FMA (a per-function target attribute, so that no
// out-of-line code is compiled for AVX2 by accident), and the exported function picks one
// at run time: AVX2+FMA where the CPU has both, unless the environment variable
// JAX_ROI_NO_AVX2 is set (tests use it to check the baseline path).
#include <cstdlib>

#include "cpu/simd.h"

namespace jax_roi {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__)
#define JAX_ROI_HAVE_AVX2_VARIANT 1
#define JAX_ROI_AVX2 __attribute__((target("avx2,fma")))

namespace {
bool DetectAvx2() {
  if (std::getenv("JAX_ROI_NO_AVX2") != nullptr) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
const bool kUseAvx2 = DetectAvx2();
}  // namespace

bool SimdUsesAvx2() { return kUseAvx2; }

// CALL names the vector width W: 16 bytes (SSE2) in the baseline variant, 32 (AVX2).
#define JAX_ROI_KERNEL(NAME, PARAMS, ARGS, CALL)                        \
  namespace {                                                           \
  void NAME##Base PARAMS {                                              \
    constexpr int W = 16;                                               \
    CALL;                                                               \
  }                                                                     \
  JAX_ROI_AVX2 void NAME##Avx2 PARAMS {                                 \
    constexpr int W = 32;                                               \
    CALL;                                                               \
  }                                                                     \
  }                                                                     \
  void NAME PARAMS {                                                    \
    if (kUseAvx2) {                                                     \
      NAME##Avx2 ARGS;                                                  \
    } else {                                                            \
      NAME##Base ARGS;                                                  \
    }                                                                   \
  }
#else
bool SimdUsesAvx2() { return false; }
#define JAX_ROI_KERNEL(NAME, PARAMS, ARGS, CALL) \
  void NAME PARAMS {                             \
    constexpr int W = 16;                        \
    CALL;                                        \
  }
#endif

#define JAX_ROI_DEFINE_KERNELS(S, A)                                                                         \
  JAX_ROI_KERNEL(GatherSum, (const S* img, const int64_t* off, const A* w, int n, S* out, int64_t C),       \
                 (img, off, w, n, out, C), (simd::gather_sum<S, A, W>(img, off, w, n, out, C)))                 \
  JAX_ROI_KERNEL(Dot4, (const A* g, const S* p0, const S* p1, const S* p2, const S* p3, int64_t C, A* out), \
                 (g, p0, p1, p2, p3, C, out), (simd::dot4<S, A, W>(g, p0, p1, p2, p3, C, out)))                 \
  JAX_ROI_KERNEL(SampleBinMax, (const S* img, const int64_t* off, const A* w, int ns, S* out, int64_t C),   \
                 (img, off, w, ns, out, C),                                                                  \
                 (simd::sample_bin_max<S, A, W, false>(img, off, w, ns, out, nullptr, C)))                      \
  JAX_ROI_KERNEL(SampleBinArgMax,                                                                            \
                 (const S* img, const int64_t* off, const A* w, int ns, simd::Lanes<A, 16>::Idx* arg, int64_t C), \
                 (img, off, w, ns, arg, C), (simd::sample_bin_max<S, A, W, true>(img, off, w, ns, nullptr, arg, C))) \
  JAX_ROI_KERNEL(CellBinMax, (const S* img, const int64_t* off, int n, S* out, int64_t C),                  \
                 (img, off, n, out, C), (simd::cell_bin_max<S, A, W, false>(img, off, n, out, nullptr, C)))     \
  JAX_ROI_KERNEL(CellBinArgMax, (const S* img, const int64_t* off, int n, simd::Lanes<A, 16>::Idx* arg, int64_t C), \
                 (img, off, n, arg, C), (simd::cell_bin_max<S, A, W, true>(img, off, n, nullptr, arg, C)))      \
  JAX_ROI_KERNEL(CellBinMaxScatter, (const S* img, const int64_t* off, int n, const A* g, A* d, int64_t C), \
                 (img, off, n, g, d, C), (simd::cell_bin_max_scatter<S, A, W>(img, off, n, g, d, C)))

JAX_ROI_DEFINE_KERNELS(float, float)
JAX_ROI_DEFINE_KERNELS(double, double)
JAX_ROI_DEFINE_KERNELS(bf16, float)
JAX_ROI_DEFINE_KERNELS(f16, float)
#undef JAX_ROI_DEFINE_KERNELS

JAX_ROI_KERNEL(ScatterAxpy, (float* d, const int64_t* off, const float* w, int n, const float* g, int64_t C),
               (d, off, w, n, g, C), (simd::scatter_axpy<float, W>(d, off, w, n, g, C)))
JAX_ROI_KERNEL(ScatterAxpy, (double* d, const int64_t* off, const double* w, int n, const double* g, int64_t C),
               (d, off, w, n, g, C), (simd::scatter_axpy<double, W>(d, off, w, n, g, C)))

}  // namespace cpu
}  // namespace jax_roi
