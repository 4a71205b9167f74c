// Per-sample arithmetic of RoIAlign / RoIWarp / RoIPool, shared by every kernel.
//
// This header is the C++ twin of jax_roi/xla/sampling.py and jax_roi/xla/roi_pool.py and
// follows the docs to the operation: same formulas, same association of the float
// operations, same clamps. Every function is inline and marked ROI_HD so that a CUDA
// translation unit can call it from device code; nothing here allocates or uses std::
// containers. Compile with floating-point contraction off (-ffp-contract=off, nvcc
// --fmad=false) where bit-for-bit agreement with the pure-JAX path matters.
//
// T is the coordinate type: float, or double when the features are float64.
#ifndef JAX_ROI_XLA_FFI_ROI_MATH_H_
#define JAX_ROI_XLA_FFI_ROI_MATH_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define ROI_HD __host__ __device__
#else
#define ROI_HD
#endif

namespace jax_roi {

// ---------------------------------------------------------------------------------------
// Scalar helpers (float and double overloads; no std:: so that device code can use them).
// ---------------------------------------------------------------------------------------

ROI_HD inline float roi_floor(float x) { return floorf(x); }
ROI_HD inline double roi_floor(double x) { return floor(x); }
ROI_HD inline float roi_ceil(float x) { return ceilf(x); }
ROI_HD inline double roi_ceil(double x) { return ceil(x); }
// std::round: half away from zero (jnp.round is half to even; the docs use this one).
ROI_HD inline float roi_round(float x) { return roundf(x); }
ROI_HD inline double roi_round(double x) { return round(x); }

// True for finite x (false for +-inf and NaN). Needs IEEE semantics (no -ffast-math).
template <typename T>
ROI_HD inline bool roi_finite(T x) {
  return (x - x) == T(0);
}

// ---------------------------------------------------------------------------------------
// 16-bit floats <-> float, by bit operations (round to nearest even, as XLA's convert).
// ---------------------------------------------------------------------------------------

ROI_HD inline uint32_t roi_float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
ROI_HD inline float roi_bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

ROI_HD inline float bf16_to_float(uint16_t h) { return roi_bits_float(static_cast<uint32_t>(h) << 16); }

ROI_HD inline uint16_t float_to_bf16(float f) {
  uint32_t u = roi_float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

ROI_HD inline float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / NaN
  } else if (exp == 0) {      // zero / subnormal: renormalise through a float subtraction
    o += 1u << 23;
    o = roi_float_bits(roi_bits_float(o) - roi_bits_float(113u << 23));
  }
  o |= static_cast<uint32_t>(h & 0x8000u) << 16;
  return roi_bits_float(o);
}

ROI_HD inline uint16_t float_to_half(float f) {
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;  // 65536: the first float that rounds to inf
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = roi_float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16_max) {
    o = (u > f32_inf) ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {  // the half is subnormal or zero: let the FPU round
    o = static_cast<uint16_t>(roi_float_bits(roi_bits_float(u) + roi_bits_float(denorm_magic)) -
                              denorm_magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    u += mant_odd;
    o = static_cast<uint16_t>(u >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// ---------------------------------------------------------------------------------------
// Boxes
// ---------------------------------------------------------------------------------------

// The image a roi of `numbers` numbers (the batch index first: 5 for a box, 6 for a rotated
// box) reads, or -1 when the roi is dead: a non-finite number, or a batch index whose
// truncation (torchvision's int()) falls outside [0, num_images).
template <typename T>
ROI_HD inline int64_t roi_batch_index(const T* roi, int64_t num_images, int numbers = 5) {
  for (int j = 0; j < numbers; ++j) {
    if (!roi_finite(roi[j])) return -1;
  }
  const T b = roi[0];
  // trunc(b) in [0, B) <=> -1 < b < B for finite b.
  if (!(b > T(-1)) || !(b < static_cast<T>(num_images))) return -1;
  const int64_t i = static_cast<int64_t>(b);  // truncation toward zero
  return (i >= 0 && i < num_images) ? i : -1;
}

// ---------------------------------------------------------------------------------------
// RoIAlign / RoIWarp: per-axis geometry
// ---------------------------------------------------------------------------------------

// Adaptive mode has no cap on the per-bin sample count g = ceil(bin) (torchvision has
// none), so a box far larger than the map would cost g samples per bin, without bound (a
// 1e30-wide box). Only samples with -1 <= position <= size contribute, and once g exceeds
// this window size their spacing bin/g is >= 0.5, so at most 2*size + 3 consecutive ones
// do: a window of this many consecutive samples, placed per bin by window_start, holds
// every one and bounds the work. (It also always holds an out-of-range sample, whose value
// 0 the maximum sees, as it would among all g.) The pure-JAX path places the same window with the same float
// operations.
ROI_HD inline int64_t adaptive_window(int64_t size) { return 2 * size + 6; }

template <typename T>
struct AxisGeom {
  T start;        // where bin 0 begins, in feature pixels
  T bin;          // bin size
  int count;      // samples visited per bin (the same for every bin); 0: the bin has none
  bool windowed;  // count < the bin's samples: a window of them, from window_start(p)
  T count_f;      // the bin's sample count max(g, 1), in T (it may exceed any int range):
                  // the divisor of the sample offsets and of the average
  T d_length;     // d(length)/d(raw length): 0 where the legacy max(length, 1) clamps (length <= 1)
  T d_coord;      // d(start)/d(c1) = d(end)/d(c2): the spatial scale (0 when quantized)
};

// Geometry of one axis of a live box spanning [c1, c2] in image pixels, on an axis of
// `size` cells split into `bins` bins.
template <typename T>
ROI_HD inline AxisGeom<T> axis_geometry(T c1, T c2, T scale, int64_t bins, int64_t size,
                                        int64_t sampling_ratio, bool aligned, bool quantize) {
  AxisGeom<T> g;
  T start, end;
  if (quantize) {  // RoIWarp: snap to the feature grid, then legacy RoIAlign
    start = roi_round(c1 * scale);
    end = roi_round(c2 * scale);
    aligned = false;
    g.d_coord = T(0);
  } else {
    const T offset = aligned ? T(0.5) : T(0);
    start = c1 * scale - offset;
    end = c2 * scale - offset;
    g.d_coord = scale;
  }
  T length = end - start;
  g.d_length = T(1);
  if (!aligned && length <= T(1)) {  // legacy: a malformed box becomes one pixel wide;
    length = T(1);                    // clamped at exactly 1 too (zero derivative there)
    g.d_length = T(0);
  }
  g.start = start;
  g.bin = length / static_cast<T>(bins);
  g.windowed = false;
  if (sampling_ratio > 0) {  // fixed: used as given (the handlers bound it)
    g.count = static_cast<int>(sampling_ratio);
    g.count_f = static_cast<T>(sampling_ratio);
    return g;
  }
  // ceil in T, never cast to int unbounded: an absurd box has a count beyond any int.
  const T gf = roi_ceil(g.bin);
  if (!roi_finite(gf) || !(gf > T(0))) {  // empty, inverted or overflowing box: no samples
    g.count = 0;
    g.count_f = T(1);
    return g;
  }
  g.count_f = gf > T(1) ? gf : T(1);
  const int64_t window = adaptive_window(size);
  if (gf <= static_cast<T>(window)) {
    g.count = static_cast<int>(gf);
  } else {
    g.count = static_cast<int>(window);
    g.windowed = true;
  }
  return g;
}

// The index (as a T) of the first sample of bin p that is visited: 0 unless windowed. The
// window starts a sample or two before the first one at or past -1, clamped to the bin's
// samples: floor((-1 - a) / d - 0.5) - 1 with a the bin's start and d the spacing.
template <typename T>
ROI_HD inline T window_start(const AxisGeom<T>& g, int64_t p) {
  if (!g.windowed) return T(0);
  const T d = g.bin / g.count_f;
  const T a = g.start + static_cast<T>(p) * g.bin;
  T first = roi_floor((T(-1) - a) / d - T(0.5)) - T(1);
  const T last = g.count_f - static_cast<T>(g.count);
  if (!(first > T(0))) first = T(0);
  if (first > last) first = last;
  return first;
}

// Position of visited sample m of bin p, whose window starts at sample i0 (window_start),
// torchvision's association with the sample index i = i0 + m as a T:
// (start + p*bin) + ((i + 0.5) * bin) / count.
template <typename T>
ROI_HD inline T sample_position(const AxisGeom<T>& g, int64_t p, T i0, int m) {
  return (g.start + static_cast<T>(p) * g.bin) + (((i0 + static_cast<T>(m)) + T(0.5)) * g.bin) / g.count_f;
}

// d(position)/d(c1) and d(position)/d(c2) of visited sample m of bin p (the counts and the
// window start held constant: the sample index is a constant).
template <typename T>
ROI_HD inline void sample_position_grad(const AxisGeom<T>& g, int64_t p, T i0, int m, int64_t bins, T* d_c1,
                                        T* d_c2) {
  const T d_bin = (static_cast<T>(p) + ((i0 + static_cast<T>(m)) + T(0.5)) / g.count_f);  // d pos / d bin
  const T d_len = d_bin * g.d_length / static_cast<T>(bins);                                // d pos / d length
  *d_c1 = g.d_coord * (T(1) - d_len);
  *d_c2 = g.d_coord * d_len;
}

// Rows (or columns) [*lo, *hi] that the taps of any sample of this axis can touch, with a
// margin of one cell for rounding; false when none can. Sample positions are monotone in
// (bin, sample) up to rounding, so the first and last samples bound them; when the box is
// so large that rounding could exceed a cell (|coordinates| > 2^20), or the bins visit a
// window of their samples (a box over twice the map), the whole axis.
template <typename T>
ROI_HD inline bool axis_footprint(const AxisGeom<T>& g, int count, int64_t bins, int64_t size, int* lo, int* hi) {
  if (count <= 0 || size <= 0) return false;
  if (g.windowed) {
    *lo = 0;
    *hi = static_cast<int>(size - 1);
    return true;
  }
  const T p0 = sample_position(g, 0, T(0), 0);
  const T p1 = sample_position(g, bins - 1, T(0), count - 1);
  T a = p0 < p1 ? p0 : p1;
  T b = p0 < p1 ? p1 : p0;
  const T big = T(1048576);
  const bool huge = !(a > -big) || !(b < big) || !(g.start > -big && g.start < big);
  if (huge) {
    *lo = 0;
    *hi = static_cast<int>(size - 1);
    return true;
  }
  if (b < T(-2) || a > static_cast<T>(size) + T(1)) return false;
  a = roi_floor(a) - T(1);
  b = roi_floor(b) + T(2);
  *lo = a < T(0) ? 0 : static_cast<int>(a);
  *hi = b > static_cast<T>(size - 1) ? static_cast<int>(size - 1) : static_cast<int>(b);
  return *lo <= *hi;
}

// The two bilinear taps of one sample along one axis.
template <typename T>
struct Tap {
  int lo, hi;  // neighbouring rows (or columns), both inside [0, size)
  T w_lo, w_hi;  // weights, validity and `norm` folded in (both 0 for an invalid sample)
  T dw;          // d(w_hi)/d(position) = -d(w_lo)/d(position); 0 where a clamp holds
};

// Taps of a sample at `pos` on an axis of `size` cells (size >= 1). `exists`: the sample
// index is below the bin's count. `norm`: 1/count for an average, 1 for a maximum.
// Validity -1 <= pos <= size (NaN fails); pos <= 0 clamps to 0; the last cell clamps.
template <typename T>
ROI_HD inline Tap<T> bilinear_tap(T pos, int64_t size, bool exists, T norm) {
  Tap<T> t;
  const bool valid = exists && pos >= T(-1) && pos <= static_cast<T>(size);
  if (!valid) {
    t.lo = 0;
    t.hi = 0;
    t.w_lo = T(0);
    t.w_hi = T(0);
    t.dw = T(0);
    return t;
  }
  bool moves = true;  // the fraction follows the position (no clamp active)
  if (pos <= T(0)) {
    pos = T(0);
    moves = false;
  }
  int64_t lo = static_cast<int64_t>(roi_floor(pos));  // 0 <= pos <= size: no overflow
  int64_t hi;
  if (lo >= size - 1) {
    lo = size - 1;
    hi = size - 1;
    pos = static_cast<T>(lo);
    moves = false;
  } else {
    hi = lo + 1;
  }
  const T frac = pos - static_cast<T>(lo);
  t.lo = static_cast<int>(lo);
  t.hi = static_cast<int>(hi);
  t.w_lo = (T(1) - frac) * norm;
  t.w_hi = frac * norm;
  t.dw = moves ? norm : T(0);
  return t;
}

// The box gradient's per-sample term, shared by every backward kernel: the derivative of
// g * (bilinear value) with respect to the sample's y and x positions, for the taps ty
// (rows) and tx (columns) and the four tap values v_ll (row lo, column lo), v_lh, v_hl, v_hh
// (for an average, v are <cotangent, feature> dot products and g = 1; for a maximum, the
// winner's feature values and g its cotangent). Zero along an axis whose clamp holds (dw 0).
template <typename T>
ROI_HD inline void bilinear_position_grad(const Tap<T>& ty, const Tap<T>& tx, T g, T v_ll, T v_lh, T v_hl, T v_hh,
                                          T* d_py, T* d_px) {
  *d_py = g * ty.dw * (tx.w_lo * (v_hl - v_ll) + tx.w_hi * (v_hh - v_lh));
  *d_px = g * tx.dw * (ty.w_lo * (v_lh - v_ll) + ty.w_hi * (v_hh - v_hl));
}

// ---------------------------------------------------------------------------------------
// RoIPool: per-axis bin ranges
// ---------------------------------------------------------------------------------------

enum PoolBinning : int64_t { kPoolCaffe = 0, kPoolFloor = 1 };

// Clip to [0, size]; NaN becomes 0.
template <typename T>
ROI_HD inline T pool_clip(T v, int64_t size) {
  if (!(v > T(0))) return T(0);
  const T s = static_cast<T>(size);
  return v < s ? v : s;
}

// Cells [*start, *start + *extent) of bin p (of `bins`) for a live box spanning [c1, c2]
// in image pixels, clipped to [0, size); *extent == 0 for an empty bin.
template <typename T>
ROI_HD inline void pool_bin_range(T c1, T c2, T scale, int64_t p, int64_t bins, int64_t size,
                                  int64_t binning, int* start, int* extent) {
  const T pf = static_cast<T>(p);
  T lo, hi;
  if (binning == kPoolCaffe) {
    const T s = roi_round(c1 * scale);
    const T e = roi_round(c2 * scale);
    T rw = e - s + T(1);
    if (rw < T(1)) rw = T(1);
    const T bin = rw / static_cast<T>(bins);
    lo = roi_floor(pf * bin) + s;
    hi = roi_ceil((pf + T(1)) * bin) + s;
  } else {  // floor: bins of floor((e - s)/bins) cells, the last takes the rest
    const T s = roi_floor(c1 * scale);
    const T e = roi_floor(c2 * scale);
    const T step = roi_floor((e - s) / static_cast<T>(bins));
    lo = s + pf * step;
    hi = (p == bins - 1) ? e : s + (pf + T(1)) * step;
  }
  lo = pool_clip(lo, size);
  hi = pool_clip(hi, size);
  T ext = hi - lo;
  if (!(ext > T(0))) ext = T(0);
  *start = static_cast<int>(lo);
  *extent = static_cast<int>(ext);
}

}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_ROI_MATH_H_
