// Channel-loop kernels of the CPU ops, written with GCC/Clang vector extensions (portable:
// SSE2 on any x86-64, NEON on aarch64) and, on x86-64, also compiled for AVX2 and picked at
// run time (target_clones): the wheel needs no -march and still uses the wider unit where
// present. Every lane performs the same float operations in the same order on every ISA
// (no FMA: contraction is off), so results do not depend on the machine.
//
// Storage types S: float, double, bf16, f16; accumulation A: float (double for double).
#ifndef JAX_ROI_XLA_FFI_CPU_SIMD_H_
#define JAX_ROI_XLA_FFI_CPU_SIMD_H_

#include <cstdint>
#include <cstring>
#include <limits>

#include "roi_math.h"

namespace jax_roi {
namespace cpu {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return bf16_to_float(v.bits); }
inline float to_acc(f16 v) { return half_to_float(v.bits); }

template <typename S>
struct Store;
template <>
struct Store<float> {
  static float from(float v) { return v; }
};
template <>
struct Store<double> {
  static double from(double v) { return v; }
};
template <>
struct Store<bf16> {
  static bf16 from(float v) { return bf16{float_to_bf16(v)}; }
};
template <>
struct Store<f16> {
  static f16 from(float v) { return f16{float_to_half(v)}; }
};

template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

#define JAX_ROI_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(JAX_ROI_NO_CLONES)
#define JAX_ROI_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define JAX_ROI_CLONES
#endif

namespace simd {

typedef float f32v __attribute__((vector_size(32)));
typedef double f64v __attribute__((vector_size(32)));
typedef int32_t i32v __attribute__((vector_size(32)));
typedef int64_t i64v __attribute__((vector_size(32)));
typedef uint16_t u16v __attribute__((vector_size(16)));
typedef uint32_t u32v __attribute__((vector_size(32)));

// Lanes of the accumulation type A, and how to read / write them from storage S.
template <typename A>
struct Lanes;
template <>
struct Lanes<float> {
  using V = f32v;
  using I = i32v;  // same-width integer vector (comparison masks, argmax indices)
  using Idx = int32_t;
  static constexpr int N = 8;
};
template <>
struct Lanes<double> {
  using V = f64v;
  using I = i64v;
  using Idx = int64_t;
  static constexpr int N = 4;
};

template <typename V, typename A>
JAX_ROI_INLINE V splat(A a) {
  return V{} + a;
}

JAX_ROI_INLINE f32v load(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
JAX_ROI_INLINE f64v load(const double* p) {
  f64v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
JAX_ROI_INLINE f32v load(const bf16* p) {
  u16v h;
  std::memcpy(&h, p, sizeof(h));
  const u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
JAX_ROI_INLINE f32v load(const f16* p) {
  float tmp[8];
  for (int j = 0; j < 8; ++j) tmp[j] = half_to_float(p[j].bits);
  f32v v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

JAX_ROI_INLINE i32v load(const int32_t* p) {
  i32v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
JAX_ROI_INLINE i64v load(const int64_t* p) {
  i64v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
JAX_ROI_INLINE void store(int32_t* p, i32v v) { std::memcpy(p, &v, sizeof(v)); }
JAX_ROI_INLINE void store(int64_t* p, i64v v) { std::memcpy(p, &v, sizeof(v)); }
JAX_ROI_INLINE void store(float* p, f32v v) { std::memcpy(p, &v, sizeof(v)); }
JAX_ROI_INLINE void store(double* p, f64v v) { std::memcpy(p, &v, sizeof(v)); }
JAX_ROI_INLINE void store(bf16* p, f32v v) {
  for (int j = 0; j < 8; ++j) p[j] = bf16{float_to_bf16(v[j])};
}
JAX_ROI_INLINE void store(f16* p, f32v v) {
  for (int j = 0; j < 8; ++j) p[j] = f16{float_to_half(v[j])};
}

// ---------------------------------------------------------------------------------------
// Kernels (templates; the exported wrappers below instantiate them per type and ISA).
// ---------------------------------------------------------------------------------------

// out[c] = sum_t w[t] * img[off[t] + c], c < C.
template <typename S, typename A>
JAX_ROI_INLINE void gather_sum(const S* img, const int64_t* off, const A* w, int n, S* out, int64_t C) {
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int N = L::N;
  int64_t c = 0;
  for (; c + 4 * N <= C; c += 4 * N) {
    V a0{}, a1{}, a2{}, a3{};
    for (int t = 0; t < n; ++t) {
      const S* p = img + off[t] + c;
      const V wt = splat<V>(w[t]);
      a0 += wt * load(p);
      a1 += wt * load(p + N);
      a2 += wt * load(p + 2 * N);
      a3 += wt * load(p + 3 * N);
    }
    store(out + c, a0);
    store(out + c + N, a1);
    store(out + c + 2 * N, a2);
    store(out + c + 3 * N, a3);
  }
  for (; c + N <= C; c += N) {
    V a0{};
    for (int t = 0; t < n; ++t) a0 += splat<V>(w[t]) * load(img + off[t] + c);
    store(out + c, a0);
  }
  for (; c < C; ++c) {
    A a = A(0);
    for (int t = 0; t < n; ++t) a += w[t] * to_acc(img[off[t] + c]);
    out[c] = Store<S>::from(a);
  }
}

// d[off[t] + c] += w[t] * g[c] for every t, c < C (d, g in the accumulation type).
template <typename A>
JAX_ROI_INLINE void scatter_axpy(A* d, const int64_t* off, const A* w, int n, const A* g, int64_t C) {
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int N = L::N;
  for (int t = 0; t < n; ++t) {
    A* q = d + off[t];
    const A wt = w[t];
    const V wv = splat<V>(wt);
    int64_t c = 0;
    for (; c + N <= C; c += N) store(q + c, load(q + c) + wv * load(g + c));
    for (; c < C; ++c) q[c] += wt * g[c];
  }
}

// The four channel dot products <g, p_j>, c < C.
template <typename S, typename A>
JAX_ROI_INLINE void dot4(const A* g, const S* p0, const S* p1, const S* p2, const S* p3, int64_t C, A* out) {
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int N = L::N;
  V s0{}, s1{}, s2{}, s3{};
  int64_t c = 0;
  for (; c + N <= C; c += N) {
    const V gv = load(g + c);
    s0 += gv * load(p0 + c);
    s1 += gv * load(p1 + c);
    s2 += gv * load(p2 + c);
    s3 += gv * load(p3 + c);
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
template <typename S, typename A, bool kArg>
JAX_ROI_INLINE void sample_bin_max(const S* img, const int64_t* off, const A* w, int ns, S* out,
                                   typename Lanes<A>::Idx* arg, int64_t C) {
  using L = Lanes<A>;
  using V = typename L::V;
  using I = typename L::I;
  using Idx = typename L::Idx;
  constexpr int N = L::N;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  int64_t c = 0;
  for (; c + 2 * N <= C; c += 2 * N) {
    V b0 = splat<V>(neg_inf), b1 = b0;
    I a0 = splat<I>(Idx(-1)), a1 = a0;
    for (int s = 0; s < ns; ++s) {
      const int64_t* o = off + 4 * s;
      const A* ws = w + 4 * s;
      const V w0 = splat<V>(ws[0]), w1 = splat<V>(ws[1]), w2 = splat<V>(ws[2]), w3 = splat<V>(ws[3]);
      V v0 = w0 * load(img + o[0] + c);
      V v1 = w0 * load(img + o[0] + c + N);
      v0 = v0 + w1 * load(img + o[1] + c);
      v1 = v1 + w1 * load(img + o[1] + c + N);
      v0 = v0 + w2 * load(img + o[2] + c);
      v1 = v1 + w2 * load(img + o[2] + c + N);
      v0 = v0 + w3 * load(img + o[3] + c);
      v1 = v1 + w3 * load(img + o[3] + c + N);
      const I m0 = v0 > b0, m1 = v1 > b1;
      b0 = m0 ? v0 : b0;
      b1 = m1 ? v1 : b1;
      if (kArg) {
        const I si = splat<I>(Idx(s));
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
template <typename S, typename A, bool kArg>
JAX_ROI_INLINE void cell_bin_max(const S* img, const int64_t* off, int n, S* out, typename Lanes<A>::Idx* arg,
                                 int64_t C) {
  using L = Lanes<A>;
  using V = typename L::V;
  using I = typename L::I;
  using Idx = typename L::Idx;
  constexpr int N = L::N;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  int64_t c = 0;
  for (; c + 4 * N <= C; c += 4 * N) {
    V b0 = splat<V>(neg_inf), b1 = b0, b2 = b0, b3 = b0;
    I a0 = splat<I>(Idx(-1)), a1 = a0, a2 = a0, a3 = a0;
    for (int t = 0; t < n; ++t) {
      const S* p = img + off[t] + c;
      const V v0 = load(p), v1 = load(p + N), v2 = load(p + 2 * N), v3 = load(p + 3 * N);
      const I m0 = v0 > b0, m1 = v1 > b1, m2 = v2 > b2, m3 = v3 > b3;
      b0 = m0 ? v0 : b0;
      b1 = m1 ? v1 : b1;
      b2 = m2 ? v2 : b2;
      b3 = m3 ? v3 : b3;
      if (kArg) {
        const I ti = splat<I>(Idx(t));
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
template <typename S, typename A>
JAX_ROI_INLINE void cell_bin_max_scatter(const S* img, const int64_t* off, int n, const A* g, A* d, int64_t C) {
  using L = Lanes<A>;
  using V = typename L::V;
  using I = typename L::I;
  using Idx = typename L::Idx;
  constexpr int N = L::N;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  int64_t c = 0;
  for (; c + 2 * N <= C; c += 2 * N) {
    const V g0 = load(g + c), g1 = load(g + c + N), zero{};  // issued early: g streams from memory
    V b0 = splat<V>(neg_inf), b1 = b0;
    I a0 = splat<I>(Idx(-1)), a1 = a0;
    for (int t = 0; t < n; ++t) {
      const S* p = img + off[t] + c;
      const V v0 = load(p), v1 = load(p + N);
      const I m0 = v0 > b0, m1 = v1 > b1;
      const I ti = splat<I>(Idx(t));
      b0 = m0 ? v0 : b0;
      b1 = m1 ? v1 : b1;
      a0 = m0 ? ti : a0;
      a1 = m1 ? ti : a1;
    }
    for (int t = 0; t < n; ++t) {
      const I ti = splat<I>(Idx(t));
      const I m0 = a0 == ti, m1 = a1 == ti;
      A* q = d + off[t] + c;
      store(q, load(q) + (m0 ? g0 : zero));
      store(q + N, load(q + N) + (m1 ? g1 : zero));
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
  void SampleBinArgMax(const S* img, const int64_t* off, const A* w, int ns, simd::Lanes<A>::Idx* arg, \
                       int64_t C);                                                                      \
  void CellBinMax(const S* img, const int64_t* off, int n, S* out, int64_t C);                         \
  void CellBinArgMax(const S* img, const int64_t* off, int n, simd::Lanes<A>::Idx* arg, int64_t C);

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

}  // namespace cpu
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CPU_SIMD_H_
