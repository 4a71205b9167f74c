// Rotated RoIAlign (detectron2's ROIAlignRotated) on CPU: XLA FFI handlers.
//
// NHWC: features [B, H, W, C], rois [K, 6] (batch index, x_ctr, y_ctr, w, h, angle in
// degrees), output [K, oh, ow, C]. The per-box and per-sample arithmetic is
// common/rotated.h's (shared with the CUDA kernels).
//
// Forward: boxes split across threads (in an order that keeps neighbours on the map
// together), each output row belongs to one box; a bin's samples are visited pair by pair
// (the axes are not separable) and each adds its four taps' channel vectors.
// Backward as cpu/position_sensitive.h: items (image, block of channels) each own one block
// of d_features (race-free, deterministic); the box-gradient shares of each block (all five
// numbers) are summed in block order afterwards.
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/rotated.h"
#include "cpu/common.h"

namespace jax_roi {
namespace cpu {
namespace {

constexpr int kBoxNumbers = 5;  // the box gradient's numbers: x_ctr, y_ctr, w, h, angle

struct RotatedConfig {
  int64_t oh = 1, ow = 1, channels = 0, num_rois = 0, sampling_ratio = 0;
  bool aligned = true;
  Level level;
};

template <typename A>
inline bool MakeGeometry(const RotatedConfig& cfg, const A* roi, int64_t num_images, RotatedGeometry<A>* g,
                         int64_t* image) {
  return RotatedGeometry<A>::make(roi, num_images, static_cast<A>(cfg.level.scale), cfg.oh, cfg.ow, cfg.level.height,
                                  cfg.level.width, cfg.sampling_ratio, cfg.aligned, g, image) &&
         g->live();
}

// The four taps of a sample: their offsets (pixel * C) in an image and their weights.
template <typename A>
inline void SampleTaps(const RotatedSample<A>& s, int64_t W, int64_t C, int64_t (&offset)[4], A (&weight)[4]) {
  const int64_t row_lo = static_cast<int64_t>(s.ty.lo) * W, row_hi = static_cast<int64_t>(s.ty.hi) * W;
  offset[0] = (row_lo + s.tx.lo) * C;
  offset[1] = (row_lo + s.tx.hi) * C;
  offset[2] = (row_hi + s.tx.lo) * C;
  offset[3] = (row_hi + s.tx.hi) * C;
  weight[0] = s.ty.w_lo * s.tx.w_lo;
  weight[1] = s.ty.w_lo * s.tx.w_hi;
  weight[2] = s.ty.w_hi * s.tx.w_lo;
  weight[3] = s.ty.w_hi * s.tx.w_hi;
}

template <typename S>
void ForwardRange(const RotatedConfig& cfg, const typename AccOf<S>::type* rois, S* out, const int64_t* order,
                  int64_t k0, int64_t k1) {
  using A = typename AccOf<S>::type;
  const int64_t oh = cfg.oh, ow = cfg.ow, C = cfg.channels;
  const int64_t H = cfg.level.height, W = cfg.level.width;
  const int64_t row = oh * ow * C;
  std::vector<A> acc(C);
  for (int64_t i = k0; i < k1; ++i) {
    const int64_t k = order[i];
    S* out_k = out + k * row;
    RotatedGeometry<A> g;
    int64_t b;
    if (!MakeGeometry(cfg, rois + kRotatedRoiWidth * k, cfg.level.batch, &g, &b)) {
      std::memset(static_cast<void*>(out_k), 0, sizeof(S) * row);
      continue;
    }
    const S* img = static_cast<const S*>(cfg.level.data) + b * H * W * C;
    for (int64_t ph = 0; ph < oh; ++ph) {
      const A first_h = rotated_window_start(g.ah, ph);
      for (int64_t pw = 0; pw < ow; ++pw) {
        const A first_w = rotated_window_start(g.aw, pw);
        std::fill(acc.begin(), acc.end(), A(0));
        for (int iy = 0; iy < g.ah.count; ++iy) {
          for (int ix = 0; ix < g.aw.count; ++ix) {
            const RotatedSample<A> s = g.sample(ph, first_h, iy, pw, first_w, ix);
            if (s.dead()) continue;  // off the map or not a sample: adds nothing
            int64_t offset[4];
            A weight[4];
            SampleTaps(s, W, C, offset, weight);
            for (int t = 0; t < 4; ++t) {
              if (weight[t] == A(0)) continue;  // a zero fraction
              const S* p = img + offset[t];
              for (int64_t c = 0; c < C; ++c) acc[c] += weight[t] * to_acc(p[c]);
            }
          }
        }
        S* o = out_k + (ph * ow + pw) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = Store<S>::from(acc[c]);
      }
    }
  }
}

// Channel block [c0, c1) of image b of d_features: zeroes it, then adds the rois ks[0, nk)
// (all writing image b), and (rois_grad) their box-gradient shares over this block to
// partial[k*5 + {x_ctr, y_ctr, w, h, angle}].
template <typename S>
void BackwardBlock(const RotatedConfig& cfg, const S* cot, const typename AccOf<S>::type* rois,
                   typename AccOf<S>::type* d_feat, bool rois_grad, int64_t out_batch, int64_t b, const int64_t* ks,
                   int64_t nk, int64_t c0, int64_t c1, double* partial) {
  using A = typename AccOf<S>::type;
  const int64_t oh = cfg.oh, ow = cfg.ow, C = cfg.channels;
  const int64_t H = cfg.level.height, W = cfg.level.width, B = cfg.level.batch;
  A* dimg = d_feat + b * H * W * C;
  for (int64_t q = 0; q < H * W; ++q) std::memset(dimg + q * C + c0, 0, sizeof(A) * (c1 - c0));
  if (nk == 0) return;
  const S* img = static_cast<const S*>(cfg.level.data) + (b % B) * H * W * C;
  std::vector<A> gv(C);
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    RotatedGeometry<A> g;
    int64_t image;
    if (!MakeGeometry(cfg, rois + kRotatedRoiWidth * k, out_batch, &g, &image)) continue;  // zero gradients
    double box[kBoxNumbers] = {0, 0, 0, 0, 0};
    for (int64_t ph = 0; ph < oh; ++ph) {
      const A first_h = rotated_window_start(g.ah, ph);
      for (int64_t pw = 0; pw < ow; ++pw) {
        const A first_w = rotated_window_start(g.aw, pw);
        const S* gk = cot + ((k * oh + ph) * ow + pw) * C;
        for (int64_t c = c0; c < c1; ++c) gv[c] = to_acc(gk[c]);
        for (int iy = 0; iy < g.ah.count; ++iy) {
          for (int ix = 0; ix < g.aw.count; ++ix) {
            const RotatedSample<A> s = g.sample(ph, first_h, iy, pw, first_w, ix);
            if (s.dead()) continue;  // off the map or not a sample: no value, no gradient
            int64_t offset[4];
            A weight[4];
            SampleTaps(s, W, C, offset, weight);
            for (int t = 0; t < 4; ++t) {
              if (weight[t] == A(0)) continue;
              A* d = dimg + offset[t];
              for (int64_t c = c0; c < c1; ++c) d[c] += weight[t] * gv[c];
            }
            if (!rois_grad || (s.ty.dw == A(0) && s.tx.dw == A(0))) continue;
            A v[4] = {A(0), A(0), A(0), A(0)};  // <cotangent, tap features> over this block
            for (int t = 0; t < 4; ++t) {
              const S* f = img + offset[t];
              for (int64_t c = c0; c < c1; ++c) v[t] += gv[c] * to_acc(f[c]);
            }
            A d_py, d_px;
            bilinear_position_grad(s.ty, s.tx, A(1), v[0], v[1], v[2], v[3], &d_py, &d_px);
            g.box_grad(s, ph, first_h, iy, pw, first_w, ix, d_py, d_px, box);
          }
        }
      }
    }
    if (rois_grad) {
      for (int j = 0; j < kBoxNumbers; ++j) partial[kBoxNumbers * k + j] += box[j];
    }
  }
}

ffi::Error Decode(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, double scale,
                  int64_t sampling_ratio, int64_t aligned, ffi::DataType* dtype, RotatedConfig* cfg) {
  if (auto err = CheckSamplingRatio(op, sampling_ratio); err.failure()) return err;
  if (auto err = CheckSingleMap(op, features, scale, dtype); err.failure()) return err;
  if (auto err = CheckRois(rois, *dtype, op, &cfg->num_rois, kRotatedRoiWidth); err.failure()) return err;
  auto fd = features.dimensions();
  cfg->level = Level{features.untyped_data(), fd[0], fd[1], fd[2], scale};
  cfg->channels = fd[3];
  cfg->sampling_ratio = sampling_ratio;
  cfg->aligned = aligned != 0;
  return ffi::Error::Success();
}

// The roi order of the forward and the image buckets of the backward: neighbours on the map
// one after another (cpu/common.h); keyed by the box's centre.
template <typename A>
std::tuple<int64_t, double, double> LocalityKey(const RotatedConfig& cfg, const A* roi, int64_t num_images) {
  const bool map = cfg.level.height > 0 && cfg.level.width > 0;
  const int64_t b = map ? roi_batch_index(roi, num_images, kRotatedRoiWidth) : int64_t{-1};
  return std::make_tuple(b, cfg.level.scale * static_cast<double>(roi[2]),
                         cfg.level.scale * static_cast<double>(roi[1]));
}

ffi::Error RoiAlignRotatedForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                      ffi::Result<ffi::AnyBuffer> out, double spatial_scale, int64_t sampling_ratio,
                                      int64_t aligned) {
  const char* op = "jax_roi roi_align_rotated forward";
  RotatedConfig cfg;
  ffi::DataType dtype;
  if (auto err = Decode(op, rois, features, spatial_scale, sampling_ratio, aligned, &dtype, &cfg); err.failure()) {
    return err;
  }
  const int64_t K = cfg.num_rois, C = cfg.channels;
  if (auto err = CheckCotangent(op, *out, K, C, dtype, "output"); err.failure()) return err;
  cfg.oh = out->dimensions()[1];
  cfg.ow = out->dimensions()[2];
  if (K == 0 || C == 0) return ffi::Error::Success();
  AdviseHugePages(out->untyped_data(), out->size_bytes());
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    S* o = static_cast<S*>(out->untyped_data());
    const int64_t chunks = std::min<int64_t>(K, PoolThreads(pool) * 16);
    const std::vector<int64_t> order =
        LocalityOrder(K, [&](int64_t k) { return LocalityKey(cfg, r + kRotatedRoiWidth * k, cfg.level.batch); });
    ParallelFor(pool, chunks, [&](int64_t c) {
      ForwardRange<S>(cfg, r, o, order.data(), K * c / chunks, K * (c + 1) / chunks);
    });
  });
  return ffi::Error::Success();
}

ffi::Error RoiAlignRotatedBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                       ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_rois,
                                       ffi::Result<ffi::AnyBuffer> d_features, double spatial_scale,
                                       int64_t sampling_ratio, int64_t aligned, int64_t rois_grad) {
  const char* op = "jax_roi roi_align_rotated backward";
  RotatedConfig cfg;
  ffi::DataType dtype;
  if (auto err = Decode(op, rois, features, spatial_scale, sampling_ratio, aligned, &dtype, &cfg); err.failure()) {
    return err;
  }
  const int64_t K = cfg.num_rois, C = cfg.channels;
  if (auto err = CheckCotangent(op, cot, K, C, dtype); err.failure()) return err;
  cfg.oh = cot.dimensions()[1];
  cfg.ow = cot.dimensions()[2];
  const ffi::DataType ctype = CoordType(dtype);
  if (auto err = CheckShape(*d_rois, {K, kRotatedRoiWidth}, ctype, std::string(op) + ": d_rois"); err.failure()) {
    return err;
  }
  std::memset(d_rois->untyped_data(), 0, d_rois->size_bytes());
  int64_t out_batch;
  if (auto err = CheckFeatureGradient(op, *d_features, features.dimensions(), ctype, &out_batch); err.failure()) {
    return err;
  }
  if (out_batch == 0 || C == 0) return ffi::Error::Success();  // nothing to write
  const bool want = rois_grad != 0;
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    const S* g = static_cast<const S*>(cot.untyped_data());
    A* df = static_cast<A*>(d_features->untyped_data());
    ImageBuckets buckets;
    buckets.Build(K, out_batch, 1, [&](int64_t k) {
      auto [b, y, x] = LocalityKey(cfg, r + kRotatedRoiWidth * k, out_batch);
      return std::make_tuple(b, int64_t{0}, y, x);
    });
    const BackwardSplit split(C, out_batch, PoolThreads(pool));
    // Box-gradient shares per channel block; a roi writes one image, so the items of one
    // block never write the same k.
    std::vector<double> partial(want ? static_cast<size_t>(split.blocks) * kBoxNumbers * K : 0, 0.0);
    ParallelFor(pool, out_batch * split.blocks, [&](int64_t item) {
      const int64_t b = item / split.blocks, j = item % split.blocks;
      const int64_t c0 = j * split.width, c1 = std::min(C, c0 + split.width);
      const int64_t first = buckets.start[b];
      BackwardBlock<S>(cfg, g, r, df, want, out_batch, b, buckets.order.data() + first, buckets.start[b + 1] - first,
                       c0, c1, want ? partial.data() + static_cast<size_t>(j) * kBoxNumbers * K : nullptr);
    });
    if (!want) return;
    A* dr = static_cast<A*>(d_rois->untyped_data());
    for (int64_t k = 0; k < K; ++k) {
      double s[kBoxNumbers] = {0, 0, 0, 0, 0};
      for (int64_t c = 0; c < split.blocks; ++c) {
        for (int j = 0; j < kBoxNumbers; ++j) s[j] += partial[(static_cast<size_t>(c) * K + k) * kBoxNumbers + j];
      }
      for (int j = 0; j < kBoxNumbers; ++j) dr[kRotatedRoiWidth * k + 1 + j] = static_cast<A>(s[j]);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cpu
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiAlignRotatedForwardCpu, jax_roi::cpu::RoiAlignRotatedForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 6]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C]
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("aligned"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiAlignRotatedBackwardCpu, jax_roi::cpu::RoiAlignRotatedBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 6]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // d_rois [K, 6]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("aligned")
                                  .Attr<int64_t>("rois_grad"));
