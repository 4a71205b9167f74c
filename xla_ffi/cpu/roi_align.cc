// RoIAlign (avg / max), RoIWarp and multi-level RoIAlign on CPU: XLA FFI handlers.
//
// Layout NHWC: features [B, H, W, C] per level, rois [K, 5], output [K, oh, ow, C]. The
// channel axis is contiguous, so every inner loop runs over channels with per-bin tap
// tables (rows, columns, weights) computed once per box, as torchvision's pre_calc.
//
// Forward: boxes are split across threads (each output row belongs to one box).
// Backward: channels are split across threads, so each thread owns a channel block of
// d_features (race-free, deterministic); box-gradient partials are kept per block and
// summed in block order afterwards.
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/roi_limits.h"
#include "cpu/common.h"

namespace jax_roi {
namespace cpu {
namespace {

struct AlignConfig {
  int64_t oh = 1, ow = 1, channels = 0;
  int64_t sampling_ratio = 0;
  bool aligned = true, quantize = false, use_max = false;
  int64_t num_levels = 0;
  Level levels[kMaxLevels];
  int64_t num_rois = 0;
};

// Taps of one axis of one box: per visited sample ([bins][bound]), and merged by row per
// bin ([bins][mstride]).
template <typename T>
struct AxisTable {
  int bound = 1;    // table stride per bin: max(count, 1)
  int count = 0;    // samples visited per bin (>= 0), the same for every bin
  int mstride = 1;  // merged-table stride per bin: distinct rows, at most min(2*count, size)
  int m_max = 0;    // the most distinct rows of any bin
  std::vector<Tap<T>> taps;
  std::vector<T> d_c1, d_c2;  // d(position)/d(c1), d(position)/d(c2) per sample
  std::vector<int> m_n;       // distinct rows per bin
  std::vector<int> m_idx;     // [bins][mstride]
  std::vector<T> m_w;

  void Build(T c1, T c2, T scale, int64_t bins, int64_t size, const AlignConfig& cfg, bool normalize,
             bool merge, bool grads) {
    const AxisGeom<T> g =
        axis_geometry<T>(c1, c2, scale, bins, size, cfg.sampling_ratio, cfg.aligned, cfg.quantize);
    count = g.count > 0 ? g.count : 0;
    bound = count > 1 ? count : 1;
    const T norm = normalize ? T(1) / g.count_f : T(1);
    const size_t n = static_cast<size_t>(bins) * bound;
    if (taps.size() < n) taps.resize(n);
    if (grads) {
      if (d_c1.size() < n) {
        d_c1.resize(n);
        d_c2.resize(n);
      }
    }
    for (int64_t p = 0; p < bins; ++p) {
      const T i0 = window_start(g, p);
      for (int m = 0; m < count; ++m) {
        const T pos = sample_position(g, p, i0, m);
        taps[p * bound + m] = bilinear_tap(pos, size, true, norm);
        if (grads) sample_position_grad(g, p, i0, m, bins, &d_c1[p * bound + m], &d_c2[p * bound + m]);
      }
    }
    if (!merge) return;
    // Merged taps are distinct rows of [0, size): never more than size per bin.
    const int64_t rows_cap = 2 * static_cast<int64_t>(bound) < size ? 2 * static_cast<int64_t>(bound) : size;
    mstride = static_cast<int>(rows_cap > 1 ? rows_cap : 1);
    const size_t per_bin = static_cast<size_t>(mstride);
    if (m_idx.size() < bins * per_bin) {
      m_idx.resize(bins * per_bin);
      m_w.resize(bins * per_bin);
    }
    if (m_n.size() < static_cast<size_t>(bins)) m_n.resize(bins);
    m_max = 0;
    for (int64_t p = 0; p < bins; ++p) {
      int* idx = &m_idx[p * per_bin];
      T* w = &m_w[p * per_bin];
      int nt = 0;
      for (int i = 0; i < count; ++i) {
        const Tap<T>& t = taps[p * bound + i];
        const int rows[2] = {t.lo, t.hi};
        const T ws[2] = {t.w_lo, t.w_hi};
        for (int j = 0; j < 2; ++j) {
          if (ws[j] == T(0)) continue;  // invalid sample, or a zero fraction
          int s = 0;
          while (s < nt && idx[s] != rows[j]) ++s;
          if (s == nt) {
            idx[nt] = rows[j];
            w[nt] = ws[j];
            ++nt;
          } else {
            w[s] += ws[j];
          }
        }
      }
      m_n[p] = nt;
      if (nt > m_max) m_max = nt;
    }
  }
};

// Resolves a roi's level and image. Returns false for a dead roi.
template <typename T>
inline bool ResolveRoi(const AlignConfig& cfg, const T* roi, const int32_t* level, int64_t k, int64_t num_images,
                       int64_t* l_out, int64_t* b_out) {
  const int64_t l = level[k];
  if (l < 0 || l >= cfg.num_levels) return false;
  const Level& lev = cfg.levels[l];
  if (lev.height <= 0 || lev.width <= 0) return false;
  const int64_t b = roi_batch_index(roi, num_images);
  if (b < 0) return false;
  *l_out = l;
  *b_out = b;
  return true;
}

// Average RoIAlign of one box: out[ph, pw, :] = sum_a sum_s wy[a] wx[s] F[row_a, col_s, :]
// over the merged taps of bin (ph, pw), one pass over the (row, column) pairs of each bin.
// (A separable form, rows first into a per-box buffer, reads fewer feature vectors for small
// boxes but measured slower on the box-head and mask-head benchmarks.)
template <typename S, typename A>
void AvgBox(const AxisTable<A>& ty, const AxisTable<A>& tx, const S* img, int64_t W, int64_t C, int64_t oh,
            int64_t ow, S* out, std::vector<int64_t>* off_buf, std::vector<A>* w_buf) {
  const size_t py = ty.mstride, px = tx.mstride;
  const size_t pairs = static_cast<size_t>(ty.m_max) * tx.m_max;
  if (off_buf->size() < pairs) {
    off_buf->resize(pairs);
    w_buf->resize(pairs);
  }
  int64_t* off = off_buf->data();
  A* w = w_buf->data();
  for (int64_t ph = 0; ph < oh; ++ph) {
    const int ny = ty.m_n[ph];
    const int* ry = &ty.m_idx[ph * py];
    const A* wy = &ty.m_w[ph * py];
    for (int64_t pw = 0; pw < ow; ++pw) {
      const int nx = tx.m_n[pw];
      const int* rx = &tx.m_idx[pw * px];
      const A* wx = &tx.m_w[pw * px];
      int n = 0;
      for (int a = 0; a < ny; ++a) {
        for (int s = 0; s < nx; ++s) {
          off[n] = (static_cast<int64_t>(ry[a]) * W + rx[s]) * C;
          w[n] = wy[a] * wx[s];
          ++n;
        }
      }
      GatherSum(img, off, w, n, out + (ph * ow + pw) * C, C);
    }
  }
}

// The samples of bin (ph, pw) in (iy, ix) order, each as its four taps: offsets into the
// image (times C) and product weights, in the pure-JAX order (y_lo x_lo, y_lo x_hi,
// y_hi x_lo, y_hi x_hi). Returns the number of samples.
template <typename A>
inline int BinSamples(const AxisTable<A>& ty, const AxisTable<A>& tx, int64_t ph, int64_t pw, int64_t W, int64_t C,
                      int64_t* off, A* w) {
  int n = 0;
  for (int iy = 0; iy < ty.count; ++iy) {
    const Tap<A>& a = ty.taps[ph * ty.bound + iy];
    for (int ix = 0; ix < tx.count; ++ix) {
      const Tap<A>& e = tx.taps[pw * tx.bound + ix];
      off[4 * n + 0] = (static_cast<int64_t>(a.lo) * W + e.lo) * C;
      off[4 * n + 1] = (static_cast<int64_t>(a.lo) * W + e.hi) * C;
      off[4 * n + 2] = (static_cast<int64_t>(a.hi) * W + e.lo) * C;
      off[4 * n + 3] = (static_cast<int64_t>(a.hi) * W + e.hi) * C;
      w[4 * n + 0] = a.w_lo * e.w_lo;
      w[4 * n + 1] = a.w_lo * e.w_hi;
      w[4 * n + 2] = a.w_hi * e.w_lo;
      w[4 * n + 3] = a.w_hi * e.w_hi;
      ++n;
    }
  }
  return n;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

template <typename S>
void AlignForwardRange(const AlignConfig& cfg, const typename AccOf<S>::type* rois, const int32_t* level, S* out,
                       const int64_t* order, int64_t k0, int64_t k1) {
  using A = typename AccOf<S>::type;
  const int64_t oh = cfg.oh, ow = cfg.ow, C = cfg.channels;
  const int64_t row = oh * ow * C;
  AxisTable<A> ty, tx;
  std::vector<int64_t> off;
  std::vector<A> w;
  for (int64_t i = k0; i < k1; ++i) {
    const int64_t k = order[i];
    S* out_k = out + k * row;
    const A* roi = rois + 5 * k;
    int64_t l, b;
    if (!ResolveRoi(cfg, roi, level, k, cfg.levels[0].batch, &l, &b)) {
      std::memset(static_cast<void*>(out_k), 0, sizeof(S) * row);
      continue;
    }
    const Level& lev = cfg.levels[l];
    const int64_t H = lev.height, W = lev.width;
    const S* img = static_cast<const S*>(lev.data) + b * H * W * C;
    const A scale = static_cast<A>(lev.scale);
    const bool avg = !cfg.use_max;
    ty.Build(roi[2], roi[4], scale, oh, H, cfg, avg, avg, false);
    tx.Build(roi[1], roi[3], scale, ow, W, cfg, avg, avg, false);
    if (avg) {
      AvgBox<S, A>(ty, tx, img, W, C, oh, ow, out_k, &off, &w);
    } else {
      const size_t per_bin = 4 * static_cast<size_t>(ty.bound) * tx.bound;
      if (off.size() < per_bin) {
        off.resize(per_bin);
        w.resize(per_bin);
      }
      for (int64_t ph = 0; ph < oh; ++ph) {
        for (int64_t pw = 0; pw < ow; ++pw) {
          const int ns = BinSamples(ty, tx, ph, pw, W, C, off.data(), w.data());
          SampleBinMax(img, off.data(), w.data(), ns, out_k + (ph * ow + pw) * C, C);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// Channel block [c0, c1) of image b of d_features: zeroes it, then adds the rois ks[0, nk)
// (all writing image b), and their box-gradient shares over this block to
// partial[k*4 + {x1, y1, x2, y2}].
template <typename S>
void AlignBackwardBlock(const AlignConfig& cfg, const S* cot, const typename AccOf<S>::type* rois,
                        const int32_t* level, typename AccOf<S>::type* const* d_feat, bool rois_grad, int64_t b,
                        const int64_t* ks, int64_t nk, int64_t c0, int64_t c1, double* partial) {
  using A = typename AccOf<S>::type;
  const int64_t oh = cfg.oh, ow = cfg.ow, C = cfg.channels;
  const int64_t cw = c1 - c0;
  for (int64_t l = 0; l < cfg.num_levels; ++l) {
    const Level& lev = cfg.levels[l];
    const int64_t pixels = lev.height * lev.width;
    A* d = d_feat[l] + b * pixels * C;
    for (int64_t q = 0; q < pixels; ++q) std::memset(d + q * C + c0, 0, sizeof(A) * cw);
  }
  AxisTable<A> ty, tx;
  std::vector<A> g(cw), dpy, dpx, w;
  std::vector<typename simd::Lanes<A, 16>::Idx> arg(cw);
  std::vector<int64_t> off;
  const bool avg = !cfg.use_max;
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    const A* roi = rois + 5 * k;
    const int64_t l = level[k];
    const Level& lev = cfg.levels[l];
    const int64_t H = lev.height, W = lev.width;
    const S* img = static_cast<const S*>(lev.data) + (b % lev.batch) * H * W * C + c0;
    A* dimg = d_feat[l] + b * H * W * C + c0;
    const A scale = static_cast<A>(lev.scale);
    ty.Build(roi[2], roi[4], scale, oh, H, cfg, avg, avg, rois_grad);
    tx.Build(roi[1], roi[3], scale, ow, W, cfg, avg, avg, rois_grad);
    if (ty.count == 0 || tx.count == 0) continue;  // no samples: zero output, zero gradients
    if (rois_grad) {
      dpy.assign(static_cast<size_t>(oh) * ty.bound, A(0));
      dpx.assign(static_cast<size_t>(ow) * tx.bound, A(0));
    }
    const S* cot_k = cot + k * oh * ow * C + c0;
    for (int64_t ph = 0; ph < oh; ++ph) {
      for (int64_t pw = 0; pw < ow; ++pw) {
        const S* gs = cot_k + (ph * ow + pw) * C;
        const A* gp;
        if constexpr (std::is_same_v<S, A>) {
          gp = gs;
        } else {
          for (int64_t c = 0; c < cw; ++c) g[c] = to_acc(gs[c]);
          gp = g.data();
        }
        if (avg) {
          const size_t py = ty.mstride, px = tx.mstride;
          const int ny = ty.m_n[ph], nx = tx.m_n[pw];
          const size_t pairs = static_cast<size_t>(ny) * nx;
          if (off.size() < pairs) {
            off.resize(pairs);
            w.resize(pairs);
          }
          int n = 0;
          for (int a = 0; a < ny; ++a) {
            const int64_t r = ty.m_idx[ph * py + a];
            const A wy = ty.m_w[ph * py + a];
            for (int s = 0; s < nx; ++s) {
              off[n] = (r * W + tx.m_idx[pw * px + s]) * C;
              w[n] = wy * tx.m_w[pw * px + s];
              ++n;
            }
          }
          ScatterAxpy(dimg, off.data(), w.data(), n, gp, cw);
          if (!rois_grad) continue;
          for (int iy = 0; iy < ty.count; ++iy) {
            const Tap<A>& a = ty.taps[ph * ty.bound + iy];
            if (a.w_lo == A(0) && a.w_hi == A(0)) continue;  // invalid sample: no value, no gradient
            for (int ix = 0; ix < tx.count; ++ix) {
              const Tap<A>& e = tx.taps[pw * tx.bound + ix];
              if (e.w_lo == A(0) && e.w_hi == A(0)) continue;
              if (a.dw == A(0) && e.dw == A(0)) continue;
              const S* p_ll = img + (static_cast<int64_t>(a.lo) * W + e.lo) * C;
              const S* p_lh = img + (static_cast<int64_t>(a.lo) * W + e.hi) * C;
              const S* p_hl = img + (static_cast<int64_t>(a.hi) * W + e.lo) * C;
              const S* p_hh = img + (static_cast<int64_t>(a.hi) * W + e.hi) * C;
              A dots[4];
              Dot4(gp, p_ll, p_lh, p_hl, p_hh, cw, dots);
              const A g_ll = dots[0], g_lh = dots[1], g_hl = dots[2], g_hh = dots[3];
              A d_py, d_px;
              bilinear_position_grad(a, e, A(1), g_ll, g_lh, g_hl, g_hh, &d_py, &d_px);
              dpy[ph * ty.bound + iy] += d_py;
              dpx[pw * tx.bound + ix] += d_px;
            }
          }
        } else {
          // Recompute the winning sample of each channel (first in (iy, ix) order on ties).
          const size_t per_bin = 4 * static_cast<size_t>(ty.bound) * tx.bound;
          if (off.size() < per_bin) {
            off.resize(per_bin);
            w.resize(per_bin);
          }
          const int ns = BinSamples(ty, tx, ph, pw, W, C, off.data(), w.data());
          SampleBinArgMax(img, off.data(), w.data(), ns, arg.data(), cw);
          for (int64_t c = 0; c < cw; ++c) {
            if (arg[c] < 0) continue;
            const int iy = arg[c] / tx.count, ix = arg[c] % tx.count;
            const Tap<A>& a = ty.taps[ph * ty.bound + iy];
            const Tap<A>& e = tx.taps[pw * tx.bound + ix];
            const A gc = gp[c];
            const int64_t o_ll = (static_cast<int64_t>(a.lo) * W + e.lo) * C + c;
            const int64_t o_lh = (static_cast<int64_t>(a.lo) * W + e.hi) * C + c;
            const int64_t o_hl = (static_cast<int64_t>(a.hi) * W + e.lo) * C + c;
            const int64_t o_hh = (static_cast<int64_t>(a.hi) * W + e.hi) * C + c;
            dimg[o_ll] += gc * (a.w_lo * e.w_lo);
            dimg[o_lh] += gc * (a.w_lo * e.w_hi);
            dimg[o_hl] += gc * (a.w_hi * e.w_lo);
            dimg[o_hh] += gc * (a.w_hi * e.w_hi);
            if (rois_grad) {
              const A f_ll = to_acc(img[o_ll]), f_lh = to_acc(img[o_lh]);
              const A f_hl = to_acc(img[o_hl]), f_hh = to_acc(img[o_hh]);
              A d_py, d_px;
              bilinear_position_grad(a, e, gc, f_ll, f_lh, f_hl, f_hh, &d_py, &d_px);
              dpy[ph * ty.bound + iy] += d_py;
              dpx[pw * tx.bound + ix] += d_px;
            }
          }
        }
      }
    }
    if (rois_grad) {
      double dx1 = 0, dy1 = 0, dx2 = 0, dy2 = 0;
      for (int64_t ph = 0; ph < oh; ++ph) {
        for (int iy = 0; iy < ty.count; ++iy) {
          const size_t s = ph * ty.bound + iy;
          dy1 += static_cast<double>(dpy[s]) * ty.d_c1[s];
          dy2 += static_cast<double>(dpy[s]) * ty.d_c2[s];
        }
      }
      for (int64_t pw = 0; pw < ow; ++pw) {
        for (int ix = 0; ix < tx.count; ++ix) {
          const size_t s = pw * tx.bound + ix;
          dx1 += static_cast<double>(dpx[s]) * tx.d_c1[s];
          dx2 += static_cast<double>(dpx[s]) * tx.d_c2[s];
        }
      }
      partial[4 * k + 0] += dx1;
      partial[4 * k + 1] += dy1;
      partial[4 * k + 2] += dx2;
      partial[4 * k + 3] += dy2;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

ffi::Error DecodeAlign(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& level,
                       const ffi::RemainingArgs& feats, size_t first_level, ffi::Span<const double> scales,
                       int64_t sampling_ratio, int64_t aligned, int64_t reduction, int64_t quantize,
                       ffi::DataType* dtype, AlignConfig* cfg) {
  const size_t L = feats.size() < first_level ? 0 : feats.size() - first_level;
  if (auto err = CheckAlignAttrs(op, L, scales, sampling_ratio, reduction); err.failure()) return err;
  cfg->num_levels = static_cast<int64_t>(L);
  if (auto err = DecodeLevels(feats, first_level, L, dtype, &cfg->channels, cfg->levels, op); err.failure()) {
    return err;
  }
  if (auto err = CheckAlignScales(op, scales); err.failure()) return err;
  for (size_t l = 0; l < L; ++l) cfg->levels[l].scale = scales[l];
  if (auto err = CheckFeatureDtype(op, *dtype); err.failure()) return err;
  if (auto err = CheckRois(rois, *dtype, op, &cfg->num_rois); err.failure()) return err;
  if (auto err = CheckShape(level, {cfg->num_rois}, ffi::DataType::S32, std::string(op) + ": level"); err.failure()) {
    return err;
  }
  cfg->sampling_ratio = sampling_ratio;
  cfg->aligned = aligned != 0;
  cfg->quantize = quantize != 0;
  if (cfg->quantize) cfg->aligned = false;
  cfg->use_max = reduction == 1;
  return ffi::Error::Success();
}

ffi::Error RoiAlignForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer rois, ffi::AnyBuffer level,
                               ffi::RemainingArgs feats, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Span<const double> scales, int64_t sampling_ratio, int64_t aligned,
                               int64_t reduction, int64_t quantize) {
  const char* op = "jax_roi roi_align forward";
  AlignConfig cfg;
  ffi::DataType dtype;
  if (auto err = DecodeAlign(op, rois, level, feats, 0, scales, sampling_ratio, aligned, reduction, quantize, &dtype,
                             &cfg);
      err.failure()) {
    return err;
  }
  auto od = out->dimensions();
  if (od.size() != 4 || od[0] != cfg.num_rois || od[1] < 1 || od[2] < 1 || od[3] != cfg.channels) {
    return Invalid(std::string(op) + ": output: expected shape [K=" + std::to_string(cfg.num_rois) +
                   ", oh >= 1, ow >= 1, C=" + std::to_string(cfg.channels) + "], got " + ShapeString(od));
  }
  if (out->element_type() != dtype) {
    return Invalid(std::string(op) + ": output: expected dtype " + DtypeName(dtype) + ", got " +
                   DtypeName(out->element_type()));
  }
  cfg.oh = od[1];
  cfg.ow = od[2];
  const int64_t K = cfg.num_rois;
  if (K == 0 || cfg.channels == 0) return ffi::Error::Success();
  const int32_t* lv = static_cast<const int32_t*>(level.untyped_data());
  AdviseHugePages(out->untyped_data(), out->size_bytes());
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    S* o = static_cast<S*>(out->untyped_data());
    const int64_t chunks = std::min<int64_t>(K, PoolThreads(pool) * 16);
    std::vector<int64_t> order = LocalityOrder(K, [&](int64_t k) {
      const A* roi = r + 5 * k;
      int64_t l, b;
      if (!ResolveRoi(cfg, roi, lv, k, cfg.levels[0].batch, &l, &b)) return std::make_tuple(int64_t{-1}, 0.0, 0.0);
      const double sc = cfg.levels[l].scale;  // centres in feature pixels
      return std::make_tuple(l * cfg.levels[0].batch + b, 0.5 * sc * static_cast<double>(roi[2] + roi[4]),
                             0.5 * sc * static_cast<double>(roi[1] + roi[3]));
    });
    ParallelFor(pool, chunks, [&](int64_t c) {
      AlignForwardRange<S>(cfg, r, lv, o, order.data(), K * c / chunks, K * (c + 1) / chunks);
    });
  });
  return ffi::Error::Success();
}

ffi::Error RoiAlignBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer cot, ffi::AnyBuffer rois, ffi::AnyBuffer level,
                                ffi::RemainingArgs feats, ffi::Result<ffi::AnyBuffer> d_rois,
                                ffi::RemainingRets d_feats, ffi::Span<const double> scales, int64_t sampling_ratio,
                                int64_t aligned, int64_t reduction, int64_t quantize, int64_t rois_grad) {
  const char* op = "jax_roi roi_align backward";
  AlignConfig cfg;
  ffi::DataType dtype;
  if (auto err = DecodeAlign(op, rois, level, feats, 0, scales, sampling_ratio, aligned, reduction, quantize, &dtype,
                             &cfg);
      err.failure()) {
    return err;
  }
  const int64_t K = cfg.num_rois, C = cfg.channels;
  auto cd = cot.dimensions();
  if (auto err = CheckCotangent(op, cot, K, C, dtype); err.failure()) return err;
  cfg.oh = cd[1];
  cfg.ow = cd[2];
  const ffi::DataType ctype = CoordType(dtype);
  if (auto err = CheckShape(*d_rois, {K, 5}, ctype, std::string(op) + ": d_rois"); err.failure()) return err;
  if (d_feats.size() != static_cast<size_t>(cfg.num_levels)) {
    return Invalid(std::string(op) + ": expected one d_features result per level (" +
                   std::to_string(cfg.num_levels) + "), got " + std::to_string(d_feats.size()));
  }
  // d_features in the accumulation dtype; [B_out, H, W, C] with B_out a multiple of B
  // (vmap folds a mapped axis into the batch: roi batch b reads image b % B).
  std::vector<void*> dptr(cfg.num_levels);
  int64_t out_batch = -1;
  for (int64_t l = 0; l < cfg.num_levels; ++l) {
    auto r = d_feats.get<ffi::AnyBuffer>(l);
    if (r.has_error()) return r.error();
    const ffi::AnyBuffer& d = **r;
    auto dd = d.dimensions();
    const Level& lev = cfg.levels[l];
    if (l == 0 && dd.size() == 4) out_batch = dd[0];
    const bool batch_ok = lev.batch == 0 ? out_batch == 0 : (out_batch >= 0 && out_batch % lev.batch == 0);
    if (dd.size() != 4 || dd[0] != out_batch || dd[1] != lev.height || dd[2] != lev.width || dd[3] != C ||
        !batch_ok) {
      return Invalid(std::string(op) + ": d_features level " + std::to_string(l) + ": expected shape [n*" +
                     std::to_string(lev.batch) + ", " + std::to_string(lev.height) + ", " +
                     std::to_string(lev.width) + ", " + std::to_string(C) + "], got " + ShapeString(dd));
    }
    if (d.element_type() != ctype) {
      return Invalid(std::string(op) + ": d_features level " + std::to_string(l) + ": expected dtype " +
                     DtypeName(ctype) + ", got " + DtypeName(d.element_type()));
    }
    dptr[l] = d.untyped_data();
  }
  if (cfg.num_levels > 0 && cfg.levels[0].batch == 0) {
    // No images: nothing to read; every roi is dead.
    std::memset(d_rois->untyped_data(), 0, d_rois->size_bytes());
    return ffi::Error::Success();
  }
  const int32_t* lv = static_cast<const int32_t*>(level.untyped_data());
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    const S* g = static_cast<const S*>(cot.untyped_data());
    std::vector<A*> df(cfg.num_levels);
    for (int64_t l = 0; l < cfg.num_levels; ++l) df[l] = static_cast<A*>(dptr[l]);
    ImageBuckets buckets;
    buckets.Build(K, out_batch, cfg.num_levels, [&](int64_t k) {
      const A* roi = r + 5 * k;
      int64_t l, b;
      if (!ResolveRoi(cfg, roi, lv, k, out_batch, &l, &b)) return std::make_tuple(int64_t{-1}, int64_t{0}, 0.0, 0.0);
      const double sc = cfg.levels[l].scale;
      return std::make_tuple(b, l, 0.5 * sc * static_cast<double>(roi[2] + roi[4]),
                             0.5 * sc * static_cast<double>(roi[1] + roi[3]));
    });
    const BackwardSplit split(C, out_batch, PoolThreads(pool));
    const bool want = rois_grad != 0;
    // Box-gradient shares per channel block; a roi writes one image, so the items of one
    // block never write the same k.
    std::vector<double> partial(want ? static_cast<size_t>(split.blocks) * 4 * K : 0, 0.0);
    ParallelFor(pool, out_batch * split.blocks, [&](int64_t item) {
      const int64_t b = item / split.blocks, j = item % split.blocks;
      const int64_t c0 = j * split.width, c1 = std::min(C, c0 + split.width);
      const int64_t first = buckets.start[b];
      AlignBackwardBlock<S>(cfg, g, r, lv, df.data(), want, b, buckets.order.data() + first,
                            buckets.start[b + 1] - first, c0, c1,
                            want ? partial.data() + static_cast<size_t>(j) * 4 * K : nullptr);
    });
    A* dr = static_cast<A*>(d_rois->untyped_data());
    for (int64_t k = 0; k < K; ++k) {
      double s[4] = {0, 0, 0, 0};
      for (int64_t c = 0; c < split.blocks && want; ++c) {
        for (int j = 0; j < 4; ++j) s[j] += partial[(static_cast<size_t>(c) * K + k) * 4 + j];
      }
      dr[5 * k + 0] = A(0);
      for (int j = 0; j < 4; ++j) dr[5 * k + 1 + j] = static_cast<A>(s[j]);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cpu
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiAlignForwardCpu, jax_roi::cpu::RoiAlignForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // level [K] int32
                                  .RemainingArgs()        // features, one [B, H_l, W_l, C] per level
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C]
                                  .Attr<ffi::Span<const double>>("spatial_scales")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("aligned")
                                  .Attr<int64_t>("reduction")
                                  .Attr<int64_t>("quantize"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiAlignBackwardCpu, jax_roi::cpu::RoiAlignBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // level [K] int32
                                  .RemainingArgs()        // features, one per level
                                  .Ret<ffi::AnyBuffer>()  // d_rois [K, 5]
                                  .RemainingRets()        // d_features, one per level
                                  .Attr<ffi::Span<const double>>("spatial_scales")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("aligned")
                                  .Attr<int64_t>("reduction")
                                  .Attr<int64_t>("quantize")
                                  .Attr<int64_t>("rois_grad"));
