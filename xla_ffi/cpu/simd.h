// Channel-loop kernels of the CPU ops, written with GCC/Clang vector extensions (portable:
// SSE2 on any x86-64, NEON on aarch64). On x86-64 each kernel is also compiled for
// AVX2+FMA and picked at run time (cpu/simd.cc): the wheel needs no -march and still uses
// the wider unit where present. The channel sums may use fused multiply-add there (their
// order already differs from the pure-JAX path's); the coordinate arithmetic never does.
//
// Storage types S: float, double, bf16, f16; accumulation A: float (double for double)
// (common/element_types.h).
#ifndef JAX_ROI_XLA_FFI_CPU_SIMD_H_
#define JAX_ROI_XLA_FFI_CPU_SIMD_H_

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/element_types.h"
#include "common/roi_math.h"

namespace jax_roi {
namespace cpu {

// Element types (bf16, f16, AccOf, to_acc, Store): common/element_types.h.

#define JAX_ROI_INLINE inline __attribute__((always_inline))

namespace simd {

// A GCC/Clang vector of W bytes of T.
template <typename T, int W>
struct Vec {
  typedef T type __attribute__((vector_size(W)));
};

// Lanes of the accumulation type A in a W-byte vector (16: SSE2 / NEON, 32: AVX2).
template <typename A, int W>
struct Lanes {
  using Idx = typename std::conditional<sizeof(A) == 4, int32_t, int64_t>::type;  // argmax indices
  using V = typename Vec<A, W>::type;
  using I = typename Vec<Idx, W>::type;  // same-width integer vector (comparison masks)
  static constexpr int N = W / static_cast<int>(sizeof(A));
};

template <typename V, typename A>
JAX_ROI_INLINE V splat(A a) {
  return a - V{};  // a broadcast (x - 0 == x exactly, so the subtraction folds away)
}

// Reads sizeof(V)/sizeof(lane) elements of storage type S as a vector V of the accumulation
// (or index) type; 16-bit floats are widened (bf16 by a shift, f16 element by element).
template <typename V, typename S>
JAX_ROI_INLINE V load(const S* p) {
  V v;
  if constexpr (std::is_same<S, bf16>::value) {
    using h_t = typename Vec<uint16_t, sizeof(V) / 2>::type;
    using w_t = typename Vec<uint32_t, sizeof(V)>::type;
    h_t h;
    std::memcpy(&h, p, sizeof(h));
    const w_t w = __builtin_convertvector(h, w_t) << 16;
    std::memcpy(&v, &w, sizeof(v));
  } else if constexpr (std::is_same<S, f16>::value) {
    constexpr int N = sizeof(V) / 4;
    float tmp[N];
    for (int j = 0; j < N; ++j) tmp[j] = half_to_float(p[j].bits);
    std::memcpy(&v, tmp, sizeof(v));
  } else {
    std::memcpy(&v, p, sizeof(v));
  }
  return v;
}

template <typename V, typename S>
JAX_ROI_INLINE void store(S* p, V v) {
  if constexpr (std::is_same<S, bf16>::value) {
    for (int j = 0; j < static_cast<int>(sizeof(V) / 4); ++j) p[j] = bf16{float_to_bf16(v[j])};
  } else if constexpr (std::is_same<S, f16>::value) {
    for (int j = 0; j < static_cast<int>(sizeof(V) / 4); ++j) p[j] = f16{float_to_half(v[j])};
  } else {
    std::memcpy(p, &v, sizeof(v));
  }
}

// ---------------------------------------------------------------------------------------
// Kernels (templates; the exported wrappers below instantiate them per type and ISA).
// ---------------------------------------------------------------------------------------

// out[c] = sum_t w[t] * img[off[t] + c], c < C.
template <typename S, typename A, int W>
JAX_ROI_INLINE void gather_sum(const S* img, const int64_t* off, const A* w, int n, S* out, int64_t C) {
  using L = Lanes<A, W>;
  using V = typename L::V;
  constexpr int N = L::N;
  // The weights, broadcast once (not once per channel block).
  constexpr int kMaxSplat = 64;
  V wv[kMaxSplat];
  const bool pre = n <= kMaxSplat;
  if (pre) {
    for (int t = 0; t < n; ++t) wv[t] = splat<V>(w[t]);
  }
  int64_t c = 0;
  for (; c + 4 * N <= C; c += 4 * N) {
    V a0{}, a1{}, a2{}, a3{};
    for (int t = 0; t < n; ++t) {
      const S* p = img + off[t] + c;
      const V wt = pre ? wv[t] : splat<V>(w[t]);
      a0 += wt * load<V>(p);
      a1 += wt * load<V>(p + N);
      a2 += wt * load<V>(p + 2 * N);
      a3 += wt * load<V>(p + 3 * N);
    }
    store(out + c, a0);
    store(out + c + N, a1);
    store(out + c + 2 * N, a2);
    store(out + c + 3 * N, a3);
  }
  for (; c + N <= C; c += N) {
    V a0{};
    for (int t = 0; t < n; ++t) a0 += splat<V>(w[t]) * load<V>(img + off[t] + c);
    store(out + c, a0);
  }
  for (; c < C; ++c) {
    A a = A(0);
    for (int t = 0; t < n; ++t) a += w[t] * to_acc(img[off[t] + c]);
    out[c] = Store<S>::from(a);
  }
}

// d[off[t] + c] += w[t] * g[c] for every t, c < C (d, g in the accumulation type).
template <typename A, int W>
JAX_ROI_INLINE void scatter_axpy(A* d, const int64_t* off, const A* w, int n, const A* g, int64_t C) {
  using L = Lanes<A, W>;
  using V = typename L::V;
  constexpr int N = L::N;
  for (int t = 0; t < n; ++t) {
    A* q = d + off[t];
    const A wt = w[t];
    const V wv = splat<V>(wt);
    int64_t c = 0;
    for (; c + N <= C; c += N) store(q + c, load<V>(q + c) + wv * load<V>(g + c));
    for (; c < C; ++c) q[c] += wt * g[c];
  }
}

// The four channel dot products <g, p_j>, c < C.
template <typename S, typename A, int W>
JAX_ROI_INLINE void dot4(const A* g, const S* p0, const S* p1, const S* p2, const S* p3, int64_t C, A* out) {
  using L = Lanes<A, W>;
  using V = typename L::V;
  constexpr int N = L::N;
  V s0{}, s1{}, s2{}, s3{};
  int64_t c = 0;
  for (; c + N <= C; c += N) {
    const V gv = load<V>(g + c);
    s0 += gv * load<V>(p0 + c);
    s1 += gv * load<V>(p1 + c);
    s2 += gv * load<V>(p2 + c);
    s3 += gv * load<V>(p3 + c);
  }
  A r0 = 0, r1 = 0, r2 = 0, r3 = 0;
  for (int j = 0; j < N; ++j) {
    r0 += s0[j];
    r1 += s1[j];
    r2 += s2[j];
    r3 += s3[j];
  }
  for (; c < C; ++c) {
    r0 += g[c] * to_acc(p0[c]);
    r1 += g[c] * to_acc(p1[c]);
    r2 += g[c] * to_acc(p2[c]);
    r3 += g[c] * to_acc(p3[c]);
  }
  out[0] = r0;
  out[1] = r1;
  out[2] = r2;
  out[3] = r3;
}

// Maximum over a bin's samples, each sample the bilinear value
// v = w[4s]*img[off[4s] + c] + ... + w[4s+3]*img[off[4s+3] + c] (in this order, as the
// pure-JAX path); ns samples. Without samples, or when no value beats -inf, the result is 0.
// kArg: also the index of the first sample reaching the maximum (strict >), -1 if none;
// `out` is then unused. Channel blocks of 2 vectors stay in registers across samples.
template <typename S, typename A, int W, bool kArg>
JAX_ROI_INLINE void sample_bin_max(const S* img, const int64_t* off, const A* w, int ns, S* out,
                                   typename Lanes<A, W>::Idx* arg, int64_t C) {
  using L = Lanes<A, W>;
  using V = typename L::V;
  using I = typename L::I;
  using Idx = typename L::Idx;
  constexpr int N = L::N;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  // Weights and sample indices broadcast once (not once per channel block).
  constexpr int kMaxSamples = 16;
  V wv[4 * kMaxSamples];
  I sv[kMaxSamples];
  const bool pre = ns <= kMaxSamples;
  if (pre) {
    for (int t = 0; t < 4 * ns; ++t) wv[t] = splat<V>(w[t]);
    for (int t = 0; t < ns; ++t) sv[t] = splat<I>(Idx(t));
  }
  int64_t c = 0;
  for (; c + 2 * N <= C; c += 2 * N) {
    V b0 = splat<V>(neg_inf), b1 = b0;
    I a0 = splat<I>(Idx(-1)), a1 = a0;
    for (int s = 0; s < ns; ++s) {
      const int64_t* o = off + 4 * s;
      const A* ws = w + 4 * s;
      const V w0 = pre ? wv[4 * s] : splat<V>(ws[0]), w1 = pre ? wv[4 * s + 1] : splat<V>(ws[1]);
      const V w2 = pre ? wv[4 * s + 2] : splat<V>(ws[2]), w3 = pre ? wv[4 * s + 3] : splat<V>(ws[3]);
      V v0 = w0 * load<V>(img + o[0] + c);
      V v1 = w0 * load<V>(img + o[0] + c + N);
      v0 = v0 + w1 * load<V>(img + o[1] + c);
      v1 = v1 + w1 * load<V>(img + o[1] + c + N);
      v0 = v0 + w2 * load<V>(img + o[2] + c);
      v1 = v1 + w2 * load<V>(img + o[2] + c + N);
      v0 = v0 + w3 * load<V>(img + o[3] + c);
      v1 = v1 + w3 * load<V>(img + o[3] + c + N);
      const I m0 = v0 > b0, m1 = v1 > b1;
      b0 = m0 ? v0 : b0;
      b1 = m1 ? v1 : b1;
      if (kArg) {
        const I si = pre ? sv[s] : splat<I>(Idx(s));
        a0 = m0 ? si : a0;
        a1 = m1 ? si : a1;
      }
    }
    if (kArg) {
      store(arg + c, a0);
      store(arg + c + N, a1);
    } else {
      const V zero{}, ninf = splat<V>(neg_inf);
      store(out + c, b0 == ninf ? zero : b0);
      store(out + c + N, b1 == ninf ? zero : b1);
    }
  }
  for (; c < C; ++c) {
    A b = neg_inf;
    Idx a = -1;
    for (int s = 0; s < ns; ++s) {
      const int64_t* o = off + 4 * s;
      const A* ws = w + 4 * s;
      A v = ws[0] * to_acc(img[o[0] + c]);
      v = v + ws[1] * to_acc(img[o[1] + c]);
      v = v + ws[2] * to_acc(img[o[2] + c]);
      v = v + ws[3] * to_acc(img[o[3] + c]);
      if (v > b) {
        b = v;
        a = s;
      }
    }
    if (kArg) {
      arg[c] = a;
    } else {
      out[c] = Store<S>::from(b == neg_inf ? A(0) : b);
    }
  }
}

// Maximum over whole cells img[off[t] + c], t < n (RoIPool); 0 when no cell beats -inf.
// kArg: the index t of the first maximal cell (strict >), -1 if none; `out` unused.
template <typename S, typename A, int W, bool kArg>
JAX_ROI_INLINE void cell_bin_max(const S* img, const int64_t* off, int n, S* out, typename Lanes<A, W>::Idx* arg,
                                 int64_t C) {
  using L = Lanes<A, W>;
  using V = typename L::V;
  using I = typename L::I;
  using Idx = typename L::Idx;
  constexpr int N = L::N;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  constexpr int kMaxCells = 64;
  I tv[kArg ? kMaxCells : 1];
  const bool pre = kArg && n <= kMaxCells;
  if (pre) {
    for (int t = 0; t < n; ++t) tv[t] = splat<I>(Idx(t));
  }
  int64_t c = 0;
  for (; c + 4 * N <= C; c += 4 * N) {
    V b0 = splat<V>(neg_inf), b1 = b0, b2 = b0, b3 = b0;
    I a0 = splat<I>(Idx(-1)), a1 = a0, a2 = a0, a3 = a0;
    for (int t = 0; t < n; ++t) {
      const S* p = img + off[t] + c;
      const V v0 = load<V>(p), v1 = load<V>(p + N), v2 = load<V>(p + 2 * N), v3 = load<V>(p + 3 * N);
      const I m0 = v0 > b0, m1 = v1 > b1, m2 = v2 > b2, m3 = v3 > b3;
      b0 = m0 ? v0 : b0;
      b1 = m1 ? v1 : b1;
      b2 = m2 ? v2 : b2;
      b3 = m3 ? v3 : b3;
      if (kArg) {
        const I ti = pre ? tv[t] : splat<I>(Idx(t));
        a0 = m0 ? ti : a0;
        a1 = m1 ? ti : a1;
        a2 = m2 ? ti : a2;
        a3 = m3 ? ti : a3;
      }
    }
    if (kArg) {
      store(arg + c, a0);
      store(arg + c + N, a1);
      store(arg + c + 2 * N, a2);
      store(arg + c + 3 * N, a3);
    } else {
      const V zero{}, ninf = splat<V>(neg_inf);
      store(out + c, b0 == ninf ? zero : b0);
      store(out + c + N, b1 == ninf ? zero : b1);
      store(out + c + 2 * N, b2 == ninf ? zero : b2);
      store(out + c + 3 * N, b3 == ninf ? zero : b3);
    }
  }
  for (; c < C; ++c) {
    A b = neg_inf;
    Idx a = -1;
    for (int t = 0; t < n; ++t) {
      const A v = to_acc(img[off[t] + c]);
      if (v > b) {
        b = v;
        a = t;
      }
    }
    if (kArg) {
      arg[c] = a;
    } else {
      out[c] = Store<S>::from(b == neg_inf ? A(0) : b);
    }
  }
}

// RoIPool backward of one bin: finds each channel's first maximal cell img[off[t] + c]
// (strict >, t in order) and adds g[c] to d[off[t] + c] there (masked vector adds, no
// scalar scatter). d and g are in the accumulation type.
template <typename S, typename A, int W>
JAX_ROI_INLINE void cell_bin_max_scatter(const S* img, const int64_t* off, int n, const A* g, A* d, int64_t C) {
  using L = Lanes<A, W>;
  using V = typename L::V;
  using I = typename L::I;
  using Idx = typename L::Idx;
  constexpr int N = L::N;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  constexpr int kMaxCells = 64;
  I tv[kMaxCells];
  const bool pre = n <= kMaxCells;
  if (pre) {
    for (int t = 0; t < n; ++t) tv[t] = splat<I>(Idx(t));
  }
  int64_t c = 0;
  for (; c + 2 * N <= C; c += 2 * N) {
    const V g0 = load<V>(g + c), g1 = load<V>(g + c + N), zero{};  // issued early: g streams from memory
    V b0 = splat<V>(neg_inf), b1 = b0;
    I a0 = splat<I>(Idx(-1)), a1 = a0;
    for (int t = 0; t < n; ++t) {
      const S* p = img + off[t] + c;
      const V v0 = load<V>(p), v1 = load<V>(p + N);
      const I m0 = v0 > b0, m1 = v1 > b1;
      const I ti = pre ? tv[t] : splat<I>(Idx(t));
      b0 = m0 ? v0 : b0;
      b1 = m1 ? v1 : b1;
      a0 = m0 ? ti : a0;
      a1 = m1 ? ti : a1;
    }
    for (int t = 0; t < n; ++t) {
      const I ti = pre ? tv[t] : splat<I>(Idx(t));
      const I m0 = a0 == ti, m1 = a1 == ti;
      A* q = d + off[t] + c;
      store(q, load<V>(q) + (m0 ? g0 : zero));
      store(q + N, load<V>(q + N) + (m1 ? g1 : zero));
    }
  }
  for (; c < C; ++c) {
    A b = neg_inf;
    int a = -1;
    for (int t = 0; t < n; ++t) {
      const A v = to_acc(img[off[t] + c]);
      if (v > b) {
        b = v;
        a = t;
      }
    }
    if (a >= 0) d[off[a] + c] += g[c];
  }
}

}  // namespace simd

// ---------------------------------------------------------------------------------------
// Exported entry points: one function per (kernel, type), cloned per ISA.
// ---------------------------------------------------------------------------------------

#define JAX_ROI_DECLARE_KERNELS(S, A)                                                                  \
  void GatherSum(const S* img, const int64_t* off, const A* w, int n, S* out, int64_t C);              \
  void Dot4(const A* g, const S* p0, const S* p1, const S* p2, const S* p3, int64_t C, A* out);        \
  void SampleBinMax(const S* img, const int64_t* off, const A* w, int ns, S* out, int64_t C);          \
  void SampleBinArgMax(const S* img, const int64_t* off, const A* w, int ns, simd::Lanes<A, 16>::Idx* arg, \
                       int64_t C);                                                                      \
  void CellBinMax(const S* img, const int64_t* off, int n, S* out, int64_t C);                         \
  void CellBinArgMax(const S* img, const int64_t* off, int n, simd::Lanes<A, 16>::Idx* arg, int64_t C);

JAX_ROI_DECLARE_KERNELS(float, float)
JAX_ROI_DECLARE_KERNELS(double, double)
JAX_ROI_DECLARE_KERNELS(bf16, float)
JAX_ROI_DECLARE_KERNELS(f16, float)
#undef JAX_ROI_DECLARE_KERNELS

void CellBinMaxScatter(const float* img, const int64_t* off, int n, const float* g, float* d, int64_t C);
void CellBinMaxScatter(const bf16* img, const int64_t* off, int n, const float* g, float* d, int64_t C);
void CellBinMaxScatter(const f16* img, const int64_t* off, int n, const float* g, float* d, int64_t C);
void CellBinMaxScatter(const double* img, const int64_t* off, int n, const double* g, double* d, int64_t C);
void ScatterAxpy(float* d, const int64_t* off, const float* w, int n, const float* g, int64_t C);
void ScatterAxpy(double* d, const int64_t* off, const double* w, int n, const double* g, int64_t C);

// Whether the AVX2+FMA kernels run (x86-64 with both, unless JAX_ROI_NO_AVX2 is set).
bool SimdUsesAvx2();

}  // namespace cpu
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CPU_SIMD_H_
