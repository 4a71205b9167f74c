// Per-box arithmetic of the position-sensitive ops (R-FCN: ps_roi_align, ps_roi_pool),
// shared by every kernel (CPU, CUDA, emulated CUDA).
//
// The C++ twin of jax_roi/xla/position_sensitive.py. Both ops are a weighted sum, per bin,
// over cells of the map on the bin's own input channel:
//
//     out[k, ph, pw, c] = sum_{i, j} wy_i * wx_j * F[b, y_i, x_j, (c*oh + ph)*ow + pw]
//
// and differ only in the per-axis taps (y_i, wy_i) of a bin: ps_roi_align's are
// RoIAlign's bilinear samples (roi_math.h, aligned geometry), ps_roi_pool's the whole cells
// of the bin, each of weight 1/extent. So each op is a geometry type, PsAlignGeometry or
// PsPoolGeometry, with one interface that every ps kernel is written against:
//
//   G::make(roi, scale, oh, ow, H, W, sampling_ratio): the geometry of one live box;
//   g.live(): whether any bin can read a cell (false: a zero row, no gradient);
//   g.y(ph), g.x(pw): the bin's axis taps, an object with `count` and tap(i) -> Tap<T>
//     (cells lo and hi, weights w_lo and w_hi; a zero weight reads nothing);
//   g.footprint_y(&lo, &hi), g.footprint_x(...): the rows (columns) any tap can touch
//     (the CUDA deterministic backward lists the boxes of each feature tile with it);
//   G::kBoxGradient, and for ps_roi_align the axis taps' position_grad(i, d_c1, d_c2).
//
// ROI_HD throughout, nothing allocates; T is the coordinate type (float, or double for
// float64 features).
#ifndef JAX_ROI_XLA_FFI_COMMON_POSITION_SENSITIVE_H_
#define JAX_ROI_XLA_FFI_COMMON_POSITION_SENSITIVE_H_

#include <stdint.h>

#include "common/roi_math.h"

namespace jax_roi {

// The input channel that output channel c of bin (ph, pw) reads: (c*oh + ph)*ow + pw, i.e.
// c*bins + bin with bin = ph*ow + pw and bins = oh*ow.
ROI_HD inline int64_t ps_input_channel(int64_t c, int64_t bin, int64_t bins) { return c * bins + bin; }

// The output channels c of bin `bin` whose input channel lies in [c0, c1): [*lo, *hi).
ROI_HD inline void ps_output_channels(int64_t bin, int64_t bins, int64_t c_out, int64_t c0, int64_t c1,
                                      int64_t* lo, int64_t* hi) {
  // smallest c with c*bins + bin >= v: ceil((v - bin) / bins), 0 when v <= bin
  const int64_t first = c0 > bin ? (c0 - bin + bins - 1) / bins : 0;
  const int64_t end = c1 > bin ? (c1 - bin + bins - 1) / bins : 0;
  *lo = first;
  *hi = end < c_out ? end : c_out;
}

// ---------------------------------------------------------------------------------------
// ps_roi_align: RoIAlign's samples with the aligned geometry (torchvision's ps_roi_align:
// start x1*s - 0.5, no minimum size), averaged.
// ---------------------------------------------------------------------------------------

template <typename T>
struct PsAlignGeometry {
  static constexpr bool kBoxGradient = true;

  // The samples of one bin along one axis.
  struct Axis {
    AxisGeom<T> geom;
    int64_t p, bins, size;
    T first;  // window_start: index of the first visited sample
    T norm;   // 1 / the bin's sample count (the average)
    int count;
    ROI_HD Tap<T> tap(int i) const { return bilinear_tap(sample_position(geom, p, first, i), size, true, norm); }
    // d(position of sample i)/d(c1), d/d(c2) (c1, c2: the box's ends on this axis).
    ROI_HD void position_grad(int i, T* d_c1, T* d_c2) const {
      sample_position_grad(geom, p, first, i, bins, d_c1, d_c2);
    }
  };

  AxisGeom<T> gy, gx;
  int64_t oh, ow, H, W;

  ROI_HD static PsAlignGeometry make(const T* roi, T scale, int64_t oh, int64_t ow, int64_t H, int64_t W,
                                     int64_t sampling_ratio) {
    PsAlignGeometry g;
    g.gy = axis_geometry<T>(roi[2], roi[4], scale, oh, H, sampling_ratio, /*aligned=*/true, /*quantize=*/false);
    g.gx = axis_geometry<T>(roi[1], roi[3], scale, ow, W, sampling_ratio, /*aligned=*/true, /*quantize=*/false);
    g.oh = oh;
    g.ow = ow;
    g.H = H;
    g.W = W;
    return g;
  }
  // An adaptive box empty along one axis has no samples: zeros (torchvision's 0/0).
  ROI_HD bool live() const { return gy.count > 0 && gx.count > 0; }
  ROI_HD Axis y(int64_t ph) const { return axis(gy, ph, oh, H); }
  ROI_HD Axis x(int64_t pw) const { return axis(gx, pw, ow, W); }
  ROI_HD bool footprint_y(int* lo, int* hi) const { return footprint(gy, oh, H, lo, hi); }
  ROI_HD bool footprint_x(int* lo, int* hi) const { return footprint(gx, ow, W, lo, hi); }

 private:
  ROI_HD static Axis axis(const AxisGeom<T>& g, int64_t p, int64_t bins, int64_t size) {
    Axis a;
    a.geom = g;
    a.p = p;
    a.bins = bins;
    a.size = size;
    a.first = window_start(g, p);
    a.norm = T(1) / g.count_f;
    a.count = g.count > 0 ? g.count : 0;
    return a;
  }
  // Rows [*lo, *hi] the taps of any sample can touch (roi_math.h's axis_footprint).
  ROI_HD static bool footprint(const AxisGeom<T>& g, int64_t bins, int64_t size, int* lo, int* hi) {
    return axis_footprint(g, g.count, bins, size, lo, hi);
  }
};

// ---------------------------------------------------------------------------------------
// ps_roi_pool: the mean of the whole cells of each bin, torchvision's forward bins.
// ---------------------------------------------------------------------------------------

// Cells [*start, *start + *extent) of bin p (of `bins`) of a live box spanning [c1, c2] in
// image pixels, on an axis of `size` cells: ends rounded half away from zero, the box at
// least one cell, edges floor(p*bin) and ceil((p+1)*bin) from the start, both clipped to
// [0, size - 1] (so the last cell is never in a bin, as in torchvision's forward). An edge
// that is NaN (an overflowed box: inf - inf, 0 * inf) makes the bin empty, as the pure-JAX
// path's float-to-int conversion does.
template <typename T>
ROI_HD inline void ps_pool_bin_range(T c1, T c2, T scale, int64_t p, int64_t bins, int64_t size, int* start,
                                     int* extent) {
  *start = 0;
  *extent = 0;
  const T s = roi_round(c1 * scale);
  const T e = roi_round(c2 * scale);
  T length = e - s;
  if (length < T(1)) length = T(1);  // NaN stays NaN
  const T bin = length / static_cast<T>(bins);
  const T pf = static_cast<T>(p);
  T lo = roi_floor(pf * bin) + s;
  T hi = roi_ceil((pf + T(1)) * bin) + s;
  if (!(lo == lo) || !(hi == hi)) return;
  const T last = static_cast<T>(size > 0 ? size - 1 : 0);
  lo = lo < T(0) ? T(0) : (lo > last ? last : lo);
  hi = hi < T(0) ? T(0) : (hi > last ? last : hi);
  if (!(hi > lo)) return;
  *start = static_cast<int>(lo);
  *extent = static_cast<int>(hi - lo);
}

template <typename T>
struct PsPoolGeometry {
  static constexpr bool kBoxGradient = false;

  // The cells of one bin along one axis: tap i is cell start + i, of weight 1/count.
  struct Axis {
    int start, count;
    T w;
    ROI_HD Tap<T> tap(int i) const {
      Tap<T> t;
      t.lo = start + i;
      t.hi = t.lo;
      t.w_lo = w;
      t.w_hi = T(0);
      t.dw = T(0);
      return t;
    }
  };

  T x1, y1, x2, y2, scale;
  int64_t oh, ow, H, W;

  ROI_HD static PsPoolGeometry make(const T* roi, T scale, int64_t oh, int64_t ow, int64_t H, int64_t W,
                                    int64_t /*sampling_ratio*/) {
    PsPoolGeometry g;
    g.x1 = roi[1];
    g.y1 = roi[2];
    g.x2 = roi[3];
    g.y2 = roi[4];
    g.scale = scale;
    g.oh = oh;
    g.ow = ow;
    g.H = H;
    g.W = W;
    return g;
  }
  // Bins are clipped to the map, so every box reads only cells inside it; empty bins
  // (extent 0) read nothing.
  ROI_HD bool live() const { return H > 0 && W > 0; }
  ROI_HD Axis y(int64_t ph) const { return axis(y1, y2, ph, oh, H); }
  ROI_HD Axis x(int64_t pw) const { return axis(x1, x2, pw, ow, W); }
  ROI_HD bool footprint_y(int* lo, int* hi) const { return footprint(y1, y2, oh, H, lo, hi); }
  ROI_HD bool footprint_x(int* lo, int* hi) const { return footprint(x1, x2, ow, W, lo, hi); }

 private:
  ROI_HD Axis axis(T c1, T c2, int64_t p, int64_t bins, int64_t size) const {
    Axis a;
    ps_pool_bin_range<T>(c1, c2, scale, p, bins, size, &a.start, &a.count);
    a.w = a.count > 0 ? T(1) / static_cast<T>(a.count) : T(0);
    return a;
  }
  // The union of the bins' cells (bins number at most oh or ow: a short loop).
  ROI_HD bool footprint(T c1, T c2, int64_t bins, int64_t size, int* lo, int* hi) const {
    bool any = false;
    for (int64_t p = 0; p < bins; ++p) {
      int s, n;
      ps_pool_bin_range<T>(c1, c2, scale, p, bins, size, &s, &n);
      if (n <= 0) continue;
      if (!any || s < *lo) *lo = s;
      if (!any || s + n - 1 > *hi) *hi = s + n - 1;
      any = true;
    }
    return any;
  }
};

}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_COMMON_POSITION_SENSITIVE_H_
