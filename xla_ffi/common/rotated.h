// Per-box and per-sample arithmetic of rotated RoIAlign (detectron2's ROIAlignRotated),
// shared by every kernel (CPU, CUDA, emulated CUDA).
//
// The C++ twin of jax_roi/xla/rotated.py, with the same formulas, association of the float
// operations and clamps. A box (x_ctr, y_ctr, w, h, angle in degrees) is an oh x ow grid of
// bins in its own frame, rotated by the angle about its centre. Sample (iy, ix) of bin
// (ph, pw) sits at the box-frame point
//
//     yy = (-h/2 + ph*bin_h) + ((iy + 0.5) * bin_h) / g_h     (xx alike with w, pw, g_w)
//
// and is read bilinearly (roi_math.h's bilinear_tap: zero outside [-1, H] x [-1, W], the
// clamps of RoIAlign) at
//
//     y = (yy*cos - xx*sin) + c_y,   x = (yy*sin + xx*cos) + c_x;
//
// each bin averages its g_h x g_w samples (g = sampling_ratio, or ceil(bin) when <= 0).
//
// A sample's row depends on both of its indices, so the axes are not separable: the kernels
// visit every (iy, ix) pair of a bin. An adaptive bin with more samples per side than
// rotated_window() visits only a window of that many consecutive samples, starting just
// before the first one that can reach the map (the map's extent in the box's frame bounds
// them; as the pure-JAX path): any box costs bounded time.
//
// ROI_HD throughout, nothing allocates; T is the coordinate type (float, or double for
// float64 features).
#ifndef JAX_ROI_XLA_FFI_COMMON_ROTATED_H_
#define JAX_ROI_XLA_FFI_COMMON_ROTATED_H_

#include <stdint.h>

#include "common/roi_math.h"

namespace jax_roi {

// Numbers per rotated roi: (batch index, x_ctr, y_ctr, w, h, angle).
constexpr int kRotatedRoiWidth = 6;

ROI_HD inline float roi_cos(float x) { return cosf(x); }
ROI_HD inline double roi_cos(double x) { return cos(x); }
ROI_HD inline float roi_sin(float x) { return sinf(x); }
ROI_HD inline double roi_sin(double x) { return sin(x); }

// Samples per bin side that can reach the map when a side has more: the map [-1, W] x
// [-1, H] spans at most W + H + 2 along any direction of the box's frame, adaptive samples
// are at least half a pixel apart, plus a sample of margin at each end for the rounding of
// the window's start. (jax_roi/xla/rotated.py's _full_window.)
ROI_HD inline int64_t rotated_window(int64_t height, int64_t width) { return 2 * (height + width + 2) + 4; }

// One axis (h: rows of bins, or w: columns) of a live box, in the box's frame.
template <typename T>
struct RotatedAxis {
  T start;      // -size/2: where bin 0 begins
  T bin;        // bin size
  T count_f;    // the bin's sample count g in T (it may exceed any int); 0: no samples
  int count;    // samples visited per bin (the same for every bin); 0: none
  bool wide;    // count < g: a window of the samples, from rotated_window_start
  T reach;      // the smallest coordinate of this axis over the map's corners (the window's aim)
  T d_size;     // d(size)/d(the roi's raw size): the spatial scale, 0 where the legacy clamp holds
  int64_t bins;
};

// The index (as a T) of the first visited sample of bin p: 0 unless wide; else one sample
// before the first that can reach the map, clamped to the bin's samples. NaN (an overflowed
// box) starts at 0, as the pure-JAX path.
template <typename T>
ROI_HD inline T rotated_window_start(const RotatedAxis<T>& a, int64_t p) {
  if (!a.wide) return T(0);
  const T corner = a.start + static_cast<T>(p) * a.bin;
  const T step = a.bin / a.count_f;
  T first = roi_floor((a.reach - corner) / step - T(0.5)) - T(1);
  if (!(first > T(0))) first = T(0);  // NaN too
  const T last = a.count_f - static_cast<T>(a.count);
  if (first > last) first = last;
  return roi_finite(first) ? first : T(0);
}

// Box-frame coordinate of visited sample m of bin p (window start i0); *exists: the sample
// is one of the bin's (its offset finite: an absurd bin can overflow it).
template <typename T>
ROI_HD inline T rotated_axis_position(const RotatedAxis<T>& a, int64_t p, T i0, int m, bool* exists) {
  const T i = i0 + static_cast<T>(m);
  const T offset = (i + T(0.5)) * a.bin;
  *exists = roi_finite(offset) && i < a.count_f;
  const T g = a.count_f > T(1) ? a.count_f : T(1);
  return (a.start + static_cast<T>(p) * a.bin) + (*exists ? offset : T(0)) / g;
}

// d(coordinate of sample m of bin p)/d(the roi's raw size on this axis), the counts and
// the window start held constant: d/d(size) of -size/2 + (p + (i + 0.5)/g) * size/bins.
template <typename T>
ROI_HD inline T rotated_axis_position_grad(const RotatedAxis<T>& a, int64_t p, T i0, int m) {
  const T g = a.count_f > T(1) ? a.count_f : T(1);
  const T along = (static_cast<T>(p) + ((i0 + static_cast<T>(m)) + T(0.5)) / g) / static_cast<T>(a.bins);
  return a.d_size * (along - T(0.5));
}

// One sample of a bin: its box-frame coordinates and its bilinear taps on the map (both
// with zero weights unless the sample exists and lies in [-1, H] x [-1, W]).
template <typename T>
struct RotatedSample {
  T yy, xx;
  Tap<T> ty, tx;
  ROI_HD bool dead() const { return ty.w_lo == T(0) && ty.w_hi == T(0); }
};

template <typename T>
struct RotatedGeometry {
  RotatedAxis<T> ah, aw;  // the h axis (bin rows, yy) and the w axis (bin columns, xx)
  T cx, cy;               // centre in feature pixels (the aligned offset applied)
  T cos_t, sin_t;
  T norm;                 // 1 / (g_h * g_w): the bin average (0 when the product overflows)
  T scale;
  int64_t H, W;

  // The geometry of roi `roi` (6 numbers) on maps of H x W: false (and no geometry) for a
  // dead roi: a non-finite number, a batch index outside [0, num_images), an empty map, or
  // a size whose half overflows. *image: the image it reads.
  ROI_HD static bool make(const T* roi, int64_t num_images, T scale, int64_t oh, int64_t ow, int64_t H, int64_t W,
                          int64_t sampling_ratio, bool aligned, RotatedGeometry* g, int64_t* image) {
    *image = (H > 0 && W > 0) ? roi_batch_index(roi, num_images, kRotatedRoiWidth) : int64_t{-1};
    if (*image < 0) return false;
    T cx = roi[1] * scale, cy = roi[2] * scale, w = roi[3] * scale, h = roi[4] * scale;
    if (!roi_finite(w * T(0.5)) || !roi_finite(h * T(0.5))) return false;
    const T offset = aligned ? T(0.5) : T(0);
    g->cx = cx - offset;
    g->cy = cy - offset;
    g->aw.d_size = scale;
    g->ah.d_size = scale;
    if (!aligned) {  // legacy: a malformed box becomes one pixel wide (zero derivative)
      if (w < T(1)) {
        w = T(1);
        g->aw.d_size = T(0);
      }
      if (h < T(1)) {
        h = T(1);
        g->ah.d_size = T(0);
      }
    }
    const T theta = roi[5] * static_cast<T>(3.14159265358979323846 / 180.0);
    g->cos_t = roi_cos(theta);
    g->sin_t = roi_sin(theta);
    g->scale = scale;
    g->H = H;
    g->W = W;
    // The map's corners in the box's frame (the inverse rotation): where a window aims.
    T yy_lo = T(0), xx_lo = T(0);
    for (int c = 0; c < 4; ++c) {
      const T dy = (c < 2 ? T(-1) : static_cast<T>(H)) - g->cy;
      const T dx = (c % 2 == 0 ? T(-1) : static_cast<T>(W)) - g->cx;
      const T yy = dy * g->cos_t + dx * g->sin_t;
      const T xx = -dy * g->sin_t + dx * g->cos_t;
      if (c == 0 || yy < yy_lo) yy_lo = yy;
      if (c == 0 || xx < xx_lo) xx_lo = xx;
    }
    const int64_t window = rotated_window(H, W);
    axis(h, oh, sampling_ratio, window, yy_lo, &g->ah);
    axis(w, ow, sampling_ratio, window, xx_lo, &g->aw);
    const T samples = g->ah.count_f * g->aw.count_f;
    g->norm = T(1) / (samples > T(1) ? samples : T(1));
    return true;
  }

  // Any bin has samples (false: an adaptive box empty along one axis, a zero output row).
  ROI_HD bool live() const { return ah.count > 0 && aw.count > 0; }

  // Sample (iy, ix) of bin (ph, pw), whose windows start at (first_h, first_w).
  ROI_HD RotatedSample<T> sample(int64_t ph, T first_h, int iy, int64_t pw, T first_w, int ix) const {
    RotatedSample<T> s;
    bool ey, ex;
    s.yy = rotated_axis_position(ah, ph, first_h, iy, &ey);
    s.xx = rotated_axis_position(aw, pw, first_w, ix, &ex);
    const T y = (s.yy * cos_t - s.xx * sin_t) + cy;
    const T x = (s.yy * sin_t + s.xx * cos_t) + cx;
    const bool valid = ey && ex && y >= T(-1) && y <= static_cast<T>(H) && x >= T(-1) && x <= static_cast<T>(W);
    // The average's weight on the rows, so that w_lo * w_hi products carry it once.
    s.ty = bilinear_tap(y, H, valid, norm);
    s.tx = bilinear_tap(x, W, valid, T(1));
    return s;
  }

  // The box gradient of one sample: d_roi[0..4] += the derivatives in (x_ctr, y_ctr, w, h,
  // angle) of a value whose derivatives in the sample's map position are (d_py, d_px)
  // (bilinear_position_grad), the sample indices and window starts held constant.
  ROI_HD void box_grad(const RotatedSample<T>& s, int64_t ph, T first_h, int iy, int64_t pw, T first_w, int ix,
                       T d_py, T d_px, double* d_roi) const {
    const T d_yy = d_py * cos_t + d_px * sin_t;   // d/d(yy) of the value
    const T d_xx = -d_py * sin_t + d_px * cos_t;  // d/d(xx)
    const T d_theta = d_py * (-s.yy * sin_t - s.xx * cos_t) + d_px * (s.yy * cos_t - s.xx * sin_t);
    d_roi[0] += static_cast<double>(d_px) * static_cast<double>(scale);
    d_roi[1] += static_cast<double>(d_py) * static_cast<double>(scale);
    d_roi[2] += static_cast<double>(d_xx) * static_cast<double>(rotated_axis_position_grad(aw, pw, first_w, ix));
    d_roi[3] += static_cast<double>(d_yy) * static_cast<double>(rotated_axis_position_grad(ah, ph, first_h, iy));
    d_roi[4] += static_cast<double>(d_theta) * (3.14159265358979323846 / 180.0);
  }

  // Rows [*ylo, *yhi] and columns [*xlo, *xhi] that the taps of any sample can touch: the
  // rotated box's bounding box with a margin of two cells for the taps and rounding (the
  // whole map when the box is so large that rounding could exceed that); false when none.
  ROI_HD bool footprint(int* ylo, int* yhi, int* xlo, int* xhi) const {
    const T ah2 = (ah.start < T(0) ? -ah.start : ah.start), aw2 = (aw.start < T(0) ? -aw.start : aw.start);
    const T c = cos_t < T(0) ? -cos_t : cos_t, s = sin_t < T(0) ? -sin_t : sin_t;
    const T ry = c * ah2 + s * aw2, rx = s * ah2 + c * aw2;  // half extents on the map
    const T big = T(1048576);
    if (!(ry < big && rx < big && cy > -big && cy < big && cx > -big && cx < big)) {
      *ylo = 0;
      *yhi = static_cast<int>(H - 1);
      *xlo = 0;
      *xhi = static_cast<int>(W - 1);
      return true;
    }
    return span(cy - ry, cy + ry, H, ylo, yhi) && span(cx - rx, cx + rx, W, xlo, xhi);
  }

 private:
  ROI_HD static void axis(T size, int64_t bins, int64_t sampling_ratio, int64_t window, T reach, RotatedAxis<T>* a) {
    a->start = -size / T(2);
    a->bin = size / static_cast<T>(bins);
    a->bins = bins;
    a->reach = reach;
    a->wide = false;
    if (sampling_ratio > 0) {  // fixed: used as given (the handlers bound it)
      a->count = static_cast<int>(sampling_ratio);
      a->count_f = static_cast<T>(sampling_ratio);
      return;
    }
    const T g = roi_ceil(a->bin);  // in T, never cast unbounded: an absurd box has more than any int
    if (!roi_finite(g) || !(g > T(0))) {  // empty or inverted box: no samples
      a->count = 0;
      a->count_f = T(0);
      return;
    }
    a->count_f = g;
    if (g <= static_cast<T>(window)) {
      a->count = static_cast<int>(g);
    } else {
      a->count = static_cast<int>(window);
      a->wide = true;
    }
  }
  ROI_HD static bool span(T lo, T hi, int64_t size, int* out_lo, int* out_hi) {
    if (hi < T(-2) || lo > static_cast<T>(size) + T(1)) return false;
    lo = roi_floor(lo) - T(2);
    hi = roi_floor(hi) + T(2);
    *out_lo = lo < T(0) ? 0 : static_cast<int>(lo);
    *out_hi = hi > static_cast<T>(size - 1) ? static_cast<int>(size - 1) : static_cast<int>(hi);
    return *out_lo <= *out_hi;
  }
};

}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_COMMON_ROTATED_H_
