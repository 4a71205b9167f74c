// The position-sensitive ops (ps_roi_align, ps_roi_pool) on CPU: the forward and backward
// of both, written once against the geometry interface of common/position_sensitive.h
// (each op's .cc file instantiates them with its geometry and defines its handlers).
//
// NHWC: features [B, H, W, C = C_out*oh*ow], rois [K, 5], output [K, oh, ow, C_out]. Output
// channel c of bin `bin` = ph*ow + pw reads input channel c*bins + bin, so the channel
// loops read the map with a stride of bins = oh*ow (the output and the cotangent are
// contiguous). Forward: boxes split across threads, each output row belongs to one box.
// Backward as cpu/roi_align.cc: items (image, block of input channels) each own one block
// of d_features (race-free, deterministic); the box-gradient shares of each block are
// summed in block order afterwards.
#ifndef JAX_ROI_XLA_FFI_CPU_POSITION_SENSITIVE_H_
#define JAX_ROI_XLA_FFI_CPU_POSITION_SENSITIVE_H_

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/position_sensitive.h"
#include "cpu/common.h"

namespace jax_roi {
namespace cpu {
namespace ps {

struct PsConfig {
  int64_t oh = 1, ow = 1, channels = 0, c_out = 0, num_rois = 0;
  int64_t sampling_ratio = 0;
  Level level;
  int64_t bins() const { return oh * ow; }
};

// The taps of every bin of one axis of one box ([bins][stride]), and for the box gradient
// the derivatives of each sample's position in the box's two ends on this axis.
template <typename A>
struct TapTable {
  int stride = 0;
  std::vector<int> count;
  std::vector<Tap<A>> taps;
  std::vector<A> d_c1, d_c2;

  // axis_of(p): bin p's axis taps (common/position_sensitive.h); kPositionGrad: they have
  // position_grad (ps_roi_align), recorded when `grads`.
  template <bool kPositionGrad, typename F>
  void Build(int64_t bins, F&& axis_of, bool grads) {
    count.resize(bins);
    stride = 0;
    for (int64_t p = 0; p < bins; ++p) {
      count[p] = axis_of(p).count;
      if (count[p] > stride) stride = count[p];
    }
    const size_t n = static_cast<size_t>(bins) * stride;
    if (taps.size() < n) taps.resize(n);
    if (grads && d_c1.size() < n) {
      d_c1.resize(n);
      d_c2.resize(n);
    }
    for (int64_t p = 0; p < bins; ++p) {
      const auto a = axis_of(p);
      for (int i = 0; i < a.count; ++i) {
        taps[p * stride + i] = a.tap(i);
        if constexpr (kPositionGrad) {
          if (grads) a.position_grad(i, &d_c1[p * stride + i], &d_c2[p * stride + i]);
        }
      }
    }
  }
  const Tap<A>* bin(int64_t p) const { return taps.data() + p * stride; }
};

// Both axes of one live box.
template <typename Geometry, typename A>
struct BoxTaps {
  TapTable<A> y, x;
  void Build(const Geometry& g, const PsConfig& cfg, bool grads) {
    y.template Build<Geometry::kBoxGradient>(cfg.oh, [&](int64_t p) { return g.y(p); }, grads);
    x.template Build<Geometry::kBoxGradient>(cfg.ow, [&](int64_t p) { return g.x(p); }, grads);
  }
};

inline bool Dead(const Tap<float>& t) { return t.w_lo == 0.0f && t.w_hi == 0.0f; }
inline bool Dead(const Tap<double>& t) { return t.w_lo == 0.0 && t.w_hi == 0.0; }

// The image a roi reads (or writes, of `num_images`), -1 when dead.
template <typename A>
inline int64_t RoiImage(const PsConfig& cfg, const A* roi, int64_t num_images) {
  return (cfg.level.height > 0 && cfg.level.width > 0) ? roi_batch_index(roi, num_images) : int64_t{-1};
}

template <typename Geometry, typename A>
inline Geometry MakeGeometry(const PsConfig& cfg, const A* roi) {
  return Geometry::make(roi, static_cast<A>(cfg.level.scale), cfg.oh, cfg.ow, cfg.level.height, cfg.level.width,
                        cfg.sampling_ratio);
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

template <template <typename> class G, typename S>
void ForwardRange(const PsConfig& cfg, const typename AccOf<S>::type* rois, S* out, const int64_t* order, int64_t k0,
                  int64_t k1) {
  using A = typename AccOf<S>::type;
  using Geometry = G<A>;
  const int64_t ow = cfg.ow, bins = cfg.bins(), C = cfg.channels, c_out = cfg.c_out;
  const int64_t H = cfg.level.height, W = cfg.level.width;
  const int64_t row = bins * c_out;
  BoxTaps<Geometry, A> taps;
  std::vector<A> acc(c_out);
  for (int64_t i = k0; i < k1; ++i) {
    const int64_t k = order[i];
    S* out_k = out + k * row;
    const A* roi = rois + 5 * k;
    const int64_t b = RoiImage(cfg, roi, cfg.level.batch);
    const Geometry g = b >= 0 ? MakeGeometry<Geometry>(cfg, roi) : Geometry{};
    if (b < 0 || !g.live()) {
      std::memset(static_cast<void*>(out_k), 0, sizeof(S) * row);
      continue;
    }
    taps.Build(g, cfg, false);
    const S* img = static_cast<const S*>(cfg.level.data) + b * H * W * C;
    for (int64_t bin = 0; bin < bins; ++bin) {
      const int64_t ph = bin / ow, pw = bin % ow;
      const int ny = taps.y.count[ph], nx = taps.x.count[pw];
      const Tap<A>* ty = taps.y.bin(ph);
      const Tap<A>* tx = taps.x.bin(pw);
      std::fill(acc.begin(), acc.end(), A(0));
      const S* base = img + bin;  // channel c of this bin: base[pixel*C + c*bins]
      for (int iy = 0; iy < ny; ++iy) {
        if (Dead(ty[iy])) continue;  // invalid sample: adds nothing
        const int rows[2] = {ty[iy].lo, ty[iy].hi};
        const A wy[2] = {ty[iy].w_lo, ty[iy].w_hi};
        for (int ix = 0; ix < nx; ++ix) {
          if (Dead(tx[ix])) continue;
          const int cols[2] = {tx[ix].lo, tx[ix].hi};
          const A wx[2] = {tx[ix].w_lo, tx[ix].w_hi};
          for (int u = 0; u < 2; ++u) {
            for (int q = 0; q < 2; ++q) {
              const A w = wy[u] * wx[q];
              if (w == A(0)) continue;  // a zero fraction (or the pool's unused second tap)
              const S* p = base + (static_cast<int64_t>(rows[u]) * W + cols[q]) * C;
              for (int64_t c = 0; c < c_out; ++c) acc[c] += w * to_acc(p[c * bins]);
            }
          }
        }
      }
      S* o = out_k + bin * c_out;
      for (int64_t c = 0; c < c_out; ++c) o[c] = Store<S>::from(acc[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

// Input-channel block [c0, c1) of image b of d_features: zeroes it, then adds the rois
// ks[0, nk) (all writing image b), and (rois_grad) their box-gradient shares over this
// block to partial[k*4 + {x1, y1, x2, y2}].
template <template <typename> class G, typename S>
void BackwardBlock(const PsConfig& cfg, const S* cot, const typename AccOf<S>::type* rois,
                   typename AccOf<S>::type* d_feat, bool rois_grad, int64_t b, const int64_t* ks, int64_t nk, int64_t c0,
                   int64_t c1, double* partial) {
  using A = typename AccOf<S>::type;
  using Geometry = G<A>;
  const int64_t ow = cfg.ow, bins = cfg.bins(), C = cfg.channels, c_out = cfg.c_out;
  const int64_t H = cfg.level.height, W = cfg.level.width, B = cfg.level.batch;
  A* dimg = d_feat + b * H * W * C;
  for (int64_t q = 0; q < H * W; ++q) std::memset(dimg + q * C + c0, 0, sizeof(A) * (c1 - c0));
  if (nk == 0) return;
  const S* img = static_cast<const S*>(cfg.level.data) + (b % B) * H * W * C;
  BoxTaps<Geometry, A> taps;
  std::vector<A> g(c_out);
  const bool box = Geometry::kBoxGradient && rois_grad;
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    const A* roi = rois + 5 * k;
    const Geometry geo = MakeGeometry<Geometry>(cfg, roi);
    if (!geo.live()) continue;  // no samples: zero output, zero gradients
    taps.Build(geo, cfg, box);
    double s_x1 = 0, s_y1 = 0, s_x2 = 0, s_y2 = 0;
    for (int64_t bin = 0; bin < bins; ++bin) {
      int64_t lo, hi;  // this bin's output channels whose input channel is in the block
      ps_output_channels(bin, bins, c_out, c0, c1, &lo, &hi);
      if (lo >= hi) continue;
      const int64_t ph = bin / ow, pw = bin % ow;
      const int ny = taps.y.count[ph], nx = taps.x.count[pw];
      const Tap<A>* ty = taps.y.bin(ph);
      const Tap<A>* tx = taps.x.bin(pw);
      const S* gk = cot + (k * bins + bin) * c_out;
      for (int64_t c = lo; c < hi; ++c) g[c] = to_acc(gk[c]);
      for (int iy = 0; iy < ny; ++iy) {
        const Tap<A>& a = ty[iy];
        if (Dead(a)) continue;  // invalid sample: no value, no gradient
        for (int ix = 0; ix < nx; ++ix) {
          const Tap<A>& e = tx[ix];
          if (Dead(e)) continue;
          const int64_t o_ll = (static_cast<int64_t>(a.lo) * W + e.lo) * C + bin;
          const int64_t o_lh = (static_cast<int64_t>(a.lo) * W + e.hi) * C + bin;
          const int64_t o_hl = (static_cast<int64_t>(a.hi) * W + e.lo) * C + bin;
          const int64_t o_hh = (static_cast<int64_t>(a.hi) * W + e.hi) * C + bin;
          const A w4[4] = {a.w_lo * e.w_lo, a.w_lo * e.w_hi, a.w_hi * e.w_lo, a.w_hi * e.w_hi};
          const int64_t o4[4] = {o_ll, o_lh, o_hl, o_hh};
          for (int t = 0; t < 4; ++t) {
            if (w4[t] == A(0)) continue;
            A* d = dimg + o4[t];
            for (int64_t c = lo; c < hi; ++c) d[c * bins] += w4[t] * g[c];
          }
          if constexpr (Geometry::kBoxGradient) {
            if (!box || (a.dw == A(0) && e.dw == A(0))) continue;
            A v[4] = {A(0), A(0), A(0), A(0)};  // <g, f_tap> over this block's channels
            for (int t = 0; t < 4; ++t) {
              const S* f = img + o4[t];
              for (int64_t c = lo; c < hi; ++c) v[t] += g[c] * to_acc(f[c * bins]);
            }
            A d_py, d_px;
            bilinear_position_grad(a, e, A(1), v[0], v[1], v[2], v[3], &d_py, &d_px);
            const size_t sy = ph * taps.y.stride + iy, sx = pw * taps.x.stride + ix;
            s_y1 += static_cast<double>(d_py) * taps.y.d_c1[sy];
            s_y2 += static_cast<double>(d_py) * taps.y.d_c2[sy];
            s_x1 += static_cast<double>(d_px) * taps.x.d_c1[sx];
            s_x2 += static_cast<double>(d_px) * taps.x.d_c2[sx];
          }
        }
      }
    }
    if (box) {
      partial[4 * k + 0] += s_x1;
      partial[4 * k + 1] += s_y1;
      partial[4 * k + 2] += s_x2;
      partial[4 * k + 3] += s_y2;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Handlers (the op's own attributes are checked by its .cc before these)
// ---------------------------------------------------------------------------------------

inline ffi::Error Decode(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, double scale,
                         int64_t sampling_ratio, ffi::DataType* dtype, PsConfig* cfg) {
  if (auto err = CheckSingleMap(op, features, scale, dtype); err.failure()) return err;
  if (auto err = CheckRois(rois, *dtype, op, &cfg->num_rois); err.failure()) return err;
  auto fd = features.dimensions();
  cfg->level = Level{features.untyped_data(), fd[0], fd[1], fd[2], scale};
  cfg->channels = fd[3];
  cfg->sampling_ratio = sampling_ratio;
  return ffi::Error::Success();
}

// The roi order of the forward, and the image buckets of the backward: neighbours on the
// map one after another (cpu/common.h).
template <typename A>
inline std::tuple<int64_t, double, double> LocalityKey(const PsConfig& cfg, const A* roi, int64_t num_images) {
  const double sc = cfg.level.scale;
  return std::make_tuple(RoiImage(cfg, roi, num_images), 0.5 * sc * static_cast<double>(roi[2] + roi[4]),
                         0.5 * sc * static_cast<double>(roi[1] + roi[3]));
}

template <template <typename> class G>
ffi::Error Forward(ffi::ThreadPool& pool, const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features,
                   ffi::AnyBuffer& out, double scale, int64_t sampling_ratio) {
  PsConfig cfg;
  ffi::DataType dtype;
  if (auto err = Decode(op, rois, features, scale, sampling_ratio, &dtype, &cfg); err.failure()) return err;
  if (auto err = CheckPositionSensitiveBins(op, "output", out, cfg.num_rois, cfg.channels, dtype, &cfg.oh, &cfg.ow);
      err.failure()) {
    return err;
  }
  cfg.c_out = cfg.channels / cfg.bins();
  const int64_t K = cfg.num_rois;
  if (K == 0 || cfg.channels == 0) return ffi::Error::Success();
  AdviseHugePages(out.untyped_data(), out.size_bytes());
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    S* o = static_cast<S*>(out.untyped_data());
    const int64_t chunks = std::min<int64_t>(K, PoolThreads(pool) * 16);
    const std::vector<int64_t> order =
        LocalityOrder(K, [&](int64_t k) { return LocalityKey(cfg, r + 5 * k, cfg.level.batch); });
    ParallelFor(pool, chunks, [&](int64_t c) {
      ForwardRange<G, S>(cfg, r, o, order.data(), K * c / chunks, K * (c + 1) / chunks);
    });
  });
  return ffi::Error::Success();
}

// d_rois: null for an op without a box gradient (no such result).
template <template <typename> class G>
ffi::Error Backward(ffi::ThreadPool& pool, const char* op, const ffi::AnyBuffer& cot, const ffi::AnyBuffer& rois,
                    const ffi::AnyBuffer& features, ffi::AnyBuffer* d_rois, ffi::AnyBuffer& d_features, double scale,
                    int64_t sampling_ratio, bool rois_grad) {
  PsConfig cfg;
  ffi::DataType dtype;
  if (auto err = Decode(op, rois, features, scale, sampling_ratio, &dtype, &cfg); err.failure()) return err;
  const int64_t K = cfg.num_rois, C = cfg.channels;
  if (auto err = CheckPositionSensitiveBins(op, "cotangent", cot, K, C, dtype, &cfg.oh, &cfg.ow); err.failure()) {
    return err;
  }
  cfg.c_out = C / cfg.bins();
  const ffi::DataType ctype = CoordType(dtype);
  if (d_rois != nullptr) {
    if (auto err = CheckShape(*d_rois, {K, 5}, ctype, std::string(op) + ": d_rois"); err.failure()) return err;
    std::memset(d_rois->untyped_data(), 0, d_rois->size_bytes());
  }
  int64_t out_batch;
  if (auto err = CheckFeatureGradient(op, d_features, features.dimensions(), ctype, &out_batch); err.failure()) {
    return err;
  }
  if (out_batch == 0 || C == 0) return ffi::Error::Success();  // nothing to write
  const bool want = d_rois != nullptr && rois_grad;
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    const S* g = static_cast<const S*>(cot.untyped_data());
    A* df = static_cast<A*>(d_features.untyped_data());
    ImageBuckets buckets;
    buckets.Build(K, out_batch, 1, [&](int64_t k) {
      auto [b, y, x] = LocalityKey(cfg, r + 5 * k, out_batch);
      return std::make_tuple(b, int64_t{0}, y, x);
    });
    const BackwardSplit split(C, out_batch, PoolThreads(pool));
    // Box-gradient shares per channel block; a roi writes one image, so the items of one
    // block never write the same k.
    std::vector<double> partial(want ? static_cast<size_t>(split.blocks) * 4 * K : 0, 0.0);
    ParallelFor(pool, out_batch * split.blocks, [&](int64_t item) {
      const int64_t b = item / split.blocks, j = item % split.blocks;
      const int64_t c0 = j * split.width, c1 = std::min(C, c0 + split.width);
      const int64_t first = buckets.start[b];
      BackwardBlock<G, S>(cfg, g, r, df, want, b, buckets.order.data() + first, buckets.start[b + 1] - first, c0, c1,
                          want ? partial.data() + static_cast<size_t>(j) * 4 * K : nullptr);
    });
    if (!want) return;
    A* dr = static_cast<A*>(d_rois->untyped_data());
    for (int64_t k = 0; k < K; ++k) {
      double s[4] = {0, 0, 0, 0};
      for (int64_t c = 0; c < split.blocks; ++c) {
        for (int j = 0; j < 4; ++j) s[j] += partial[(static_cast<size_t>(c) * K + k) * 4 + j];
      }
      for (int j = 0; j < 4; ++j) dr[5 * k + 1 + j] = static_cast<A>(s[j]);
    }
  });
  return ffi::Error::Success();
}

}  // namespace ps
}  // namespace cpu
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CPU_POSITION_SENSITIVE_H_
