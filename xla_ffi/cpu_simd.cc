// Instantiations of the channel-loop kernels of cpu_simd.h, one clone per ISA (x86-64:
// AVX2 and baseline, chosen at load time by the dynamic linker's ifunc resolver).
#include "cpu_simd.h"

namespace jax_roi {
namespace cpu {

#define JAX_ROI_DEFINE_KERNELS(S, A)                                                                      \
  JAX_ROI_CLONES void GatherSum(const S* img, const int64_t* off, const A* w, int n, S* out, int64_t C) { \
    simd::gather_sum<S, A>(img, off, w, n, out, C);                                                       \
  }                                                                                                       \
  JAX_ROI_CLONES void Dot4(const A* g, const S* p0, const S* p1, const S* p2, const S* p3, int64_t C,     \
                           A* out) {                                                                      \
    simd::dot4<S, A>(g, p0, p1, p2, p3, C, out);                                                          \
  }                                                                                                       \
  JAX_ROI_CLONES void SampleBinMax(const S* img, const int64_t* off, const A* w, int ns, S* out,          \
                                   int64_t C) {                                                           \
    simd::sample_bin_max<S, A, false>(img, off, w, ns, out, nullptr, C);                                  \
  }                                                                                                       \
  JAX_ROI_CLONES void SampleBinArgMax(const S* img, const int64_t* off, const A* w, int ns,               \
                                      simd::Lanes<A>::Idx* arg, int64_t C) {                              \
    simd::sample_bin_max<S, A, true>(img, off, w, ns, nullptr, arg, C);                                   \
  }                                                                                                       \
  JAX_ROI_CLONES void CellBinMax(const S* img, const int64_t* off, int n, S* out, int64_t C) {            \
    simd::cell_bin_max<S, A, false>(img, off, n, out, nullptr, C);                                        \
  }                                                                                                       \
  JAX_ROI_CLONES void CellBinArgMax(const S* img, const int64_t* off, int n, simd::Lanes<A>::Idx* arg,    \
                                    int64_t C) {                                                          \
    simd::cell_bin_max<S, A, true>(img, off, n, nullptr, arg, C);                                         \
  }

JAX_ROI_DEFINE_KERNELS(float, float)
JAX_ROI_DEFINE_KERNELS(double, double)
JAX_ROI_DEFINE_KERNELS(bf16, float)
JAX_ROI_DEFINE_KERNELS(f16, float)
#undef JAX_ROI_DEFINE_KERNELS

#define JAX_ROI_DEFINE_SCATTER(S, A)                                                                      \
  JAX_ROI_CLONES void CellBinMaxScatter(const S* img, const int64_t* off, int n, const A* g, A* d, int64_t C) { \
    simd::cell_bin_max_scatter<S, A>(img, off, n, g, d, C);                                               \
  }
JAX_ROI_DEFINE_SCATTER(float, float)
JAX_ROI_DEFINE_SCATTER(double, double)
JAX_ROI_DEFINE_SCATTER(bf16, float)
JAX_ROI_DEFINE_SCATTER(f16, float)
#undef JAX_ROI_DEFINE_SCATTER

JAX_ROI_CLONES void ScatterAxpy(float* d, const int64_t* off, const float* w, int n, const float* g, int64_t C) {
  simd::scatter_axpy<float>(d, off, w, n, g, C);
}
JAX_ROI_CLONES void ScatterAxpy(double* d, const int64_t* off, const double* w, int n, const double* g,
                                int64_t C) {
  simd::scatter_axpy<double>(d, off, w, n, g, C);
}

}  // namespace cpu
}  // namespace jax_roi
