// RoIPool (Fast R-CNN; binning "caffe" or "floor") on CPU: XLA FFI handlers.
//
// NHWC: features [B, H, W, C], rois [K, 5], output [K, oh, ow, C]. Each bin takes the
// maximum over whole cells; the channel loop is innermost and contiguous. Forward splits
// boxes across threads; backward splits channels (each thread owns a block of d_features)
// and recomputes each bin's first maximal cell (row-major) per channel.
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "cpu/common.h"

namespace jax_roi {
namespace cpu {
namespace {

struct PoolConfig {
  int64_t oh = 1, ow = 1, channels = 0, num_rois = 0;
  int64_t binning = kPoolCaffe;
  Level level;
};

// Per-bin cell ranges of one box along both axes.
struct PoolBins {
  std::vector<int> y0, hy, x0, hx;
  template <typename T>
  void Build(const PoolConfig& cfg, const T* roi) {
    y0.resize(cfg.oh);
    hy.resize(cfg.oh);
    x0.resize(cfg.ow);
    hx.resize(cfg.ow);
    const T scale = static_cast<T>(cfg.level.scale);
    for (int64_t p = 0; p < cfg.oh; ++p) {
      pool_bin_range<T>(roi[2], roi[4], scale, p, cfg.oh, cfg.level.height, cfg.binning, &y0[p], &hy[p]);
    }
    for (int64_t p = 0; p < cfg.ow; ++p) {
      pool_bin_range<T>(roi[1], roi[3], scale, p, cfg.ow, cfg.level.width, cfg.binning, &x0[p], &hx[p]);
    }
  }
};

// Offsets (times C) of the cells of bin (ph, pw) in row-major order; returns their count.
inline int BinCells(const PoolBins& bins, int64_t ph, int64_t pw, int64_t W, int64_t C, std::vector<int64_t>* off) {
  const int n = bins.hy[ph] * bins.hx[pw];
  if (off->size() < static_cast<size_t>(n)) off->resize(n);
  int t = 0;
  for (int dy = 0; dy < bins.hy[ph]; ++dy) {
    for (int dx = 0; dx < bins.hx[pw]; ++dx) {
      (*off)[t++] = ((static_cast<int64_t>(bins.y0[ph]) + dy) * W + bins.x0[pw] + dx) * C;
    }
  }
  return n;
}

template <typename S>
void PoolForwardRange(const PoolConfig& cfg, const typename AccOf<S>::type* rois, S* out, const int64_t* order,
                      int64_t k0, int64_t k1) {
  using A = typename AccOf<S>::type;
  const int64_t oh = cfg.oh, ow = cfg.ow, C = cfg.channels;
  const int64_t H = cfg.level.height, W = cfg.level.width;
  const int64_t row = oh * ow * C;
  PoolBins bins;
  std::vector<int64_t> off;
  for (int64_t i = k0; i < k1; ++i) {
    const int64_t k = order[i];
    S* out_k = out + k * row;
    const A* roi = rois + 5 * k;
    const int64_t b = (H > 0 && W > 0) ? roi_batch_index(roi, cfg.level.batch) : -1;
    if (b < 0) {
      std::memset(static_cast<void*>(out_k), 0, sizeof(S) * row);
      continue;
    }
    const S* img = static_cast<const S*>(cfg.level.data) + b * H * W * C;
    bins.Build(cfg, roi);
    for (int64_t ph = 0; ph < oh; ++ph) {
      for (int64_t pw = 0; pw < ow; ++pw) {
        const int n = BinCells(bins, ph, pw, W, C, &off);
        CellBinMax(img, off.data(), n, out_k + (ph * ow + pw) * C, C);
      }
    }
  }
}

// Channel block [c0, c1) of image b of d_features: zeroes it, then adds the rois ks[0, nk)
// (all writing image b) at each bin's first maximal cell.
template <typename S>
void PoolBackwardBlock(const PoolConfig& cfg, const S* cot, const typename AccOf<S>::type* rois,
                       typename AccOf<S>::type* d_feat, int64_t b, const int64_t* ks, int64_t nk, int64_t c0,
                       int64_t c1) {
  using A = typename AccOf<S>::type;
  const int64_t oh = cfg.oh, ow = cfg.ow, C = cfg.channels;
  const int64_t H = cfg.level.height, W = cfg.level.width, B = cfg.level.batch;
  const int64_t cw = c1 - c0;
  A* dimg = d_feat + b * H * W * C + c0;
  for (int64_t q = 0; q < H * W; ++q) std::memset(dimg + q * C, 0, sizeof(A) * cw);
  if (nk == 0) return;
  const S* img = static_cast<const S*>(cfg.level.data) + (b % B) * H * W * C + c0;
  PoolBins bins;
  std::vector<int64_t> off;
  std::vector<A> g(cw);
  for (int64_t i = 0; i < nk; ++i) {
    const int64_t k = ks[i];
    bins.Build(cfg, rois + 5 * k);
    for (int64_t ph = 0; ph < oh; ++ph) {
      for (int64_t pw = 0; pw < ow; ++pw) {
        const int n = BinCells(bins, ph, pw, W, C, &off);
        if (n == 0) continue;
        const S* gs = cot + ((k * oh + ph) * ow + pw) * C + c0;
        const A* gp;
        if constexpr (std::is_same_v<S, A>) {
          gp = gs;
        } else {
          for (int64_t c = 0; c < cw; ++c) g[c] = to_acc(gs[c]);
          gp = g.data();
        }
        CellBinMaxScatter(img, off.data(), n, gp, dimg, cw);
      }
    }
  }
}

ffi::Error DecodePool(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, double scale,
                      int64_t binning, ffi::DataType* dtype, PoolConfig* cfg) {
  if (auto err = CheckPool(op, rois, features, scale, binning, dtype, &cfg->num_rois); err.failure()) return err;
  auto fd = features.dimensions();
  cfg->level = Level{features.untyped_data(), fd[0], fd[1], fd[2], scale};
  cfg->channels = fd[3];
  cfg->binning = binning;
  return ffi::Error::Success();
}

ffi::Error RoiPoolForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer rois, ffi::AnyBuffer features,
                              ffi::Result<ffi::AnyBuffer> out, double spatial_scale, int64_t binning) {
  const char* op = "jax_roi roi_pool forward";
  PoolConfig cfg;
  ffi::DataType dtype;
  if (auto err = DecodePool(op, rois, features, spatial_scale, binning, &dtype, &cfg); err.failure()) return err;
  auto od = out->dimensions();
  if (od.size() != 4 || od[0] != cfg.num_rois || od[1] < 1 || od[2] < 1 || od[3] != cfg.channels ||
      out->element_type() != dtype) {
    return Invalid(std::string(op) + ": output: expected " + DtypeName(dtype) + " [K=" + std::to_string(cfg.num_rois) +
                   ", oh, ow, C=" + std::to_string(cfg.channels) + "], got " + DtypeName(out->element_type()) + " " +
                   ShapeString(od));
  }
  cfg.oh = od[1];
  cfg.ow = od[2];
  const int64_t K = cfg.num_rois;
  if (K == 0 || cfg.channels == 0) return ffi::Error::Success();
  AdviseHugePages(out->untyped_data(), out->size_bytes());
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    S* o = static_cast<S*>(out->untyped_data());
    const int64_t chunks = std::min<int64_t>(K, PoolThreads(pool) * 16);
    const int64_t H = cfg.level.height, W = cfg.level.width;
    const double sc = cfg.level.scale;
    const std::vector<int64_t> order = LocalityOrder(K, [&](int64_t k) {
      const A* roi = r + 5 * k;
      const int64_t b = (H > 0 && W > 0) ? roi_batch_index(roi, cfg.level.batch) : int64_t{-1};
      return std::make_tuple(b, 0.5 * sc * static_cast<double>(roi[2] + roi[4]),
                             0.5 * sc * static_cast<double>(roi[1] + roi[3]));
    });
    ParallelFor(pool, chunks, [&](int64_t c) {
      PoolForwardRange<S>(cfg, r, o, order.data(), K * c / chunks, K * (c + 1) / chunks);
    });
  });
  return ffi::Error::Success();
}

ffi::Error RoiPoolBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer cot, ffi::AnyBuffer rois, ffi::AnyBuffer features,
                               ffi::Result<ffi::AnyBuffer> d_features, double spatial_scale, int64_t binning) {
  const char* op = "jax_roi roi_pool backward";
  PoolConfig cfg;
  ffi::DataType dtype;
  if (auto err = DecodePool(op, rois, features, spatial_scale, binning, &dtype, &cfg); err.failure()) return err;
  const int64_t K = cfg.num_rois, C = cfg.channels;
  auto cd = cot.dimensions();
  if (auto err = CheckCotangent(op, cot, K, C, dtype); err.failure()) return err;
  cfg.oh = cd[1];
  cfg.ow = cd[2];
  const ffi::DataType ctype = CoordType(dtype);
  auto dd = d_features->dimensions();
  const int64_t B = cfg.level.batch;
  const int64_t out_batch = dd.size() == 4 ? dd[0] : -1;
  const bool batch_ok = B == 0 ? out_batch == 0 : (out_batch >= 0 && out_batch % B == 0);
  if (dd.size() != 4 || !batch_ok || dd[1] != cfg.level.height || dd[2] != cfg.level.width || dd[3] != C ||
      d_features->element_type() != ctype) {
    return Invalid(std::string(op) + ": d_features: expected " + DtypeName(ctype) + " [n*" + std::to_string(B) + ", " +
                   std::to_string(cfg.level.height) + ", " + std::to_string(cfg.level.width) + ", " +
                   std::to_string(C) + "], got " + DtypeName(d_features->element_type()) + " " + ShapeString(dd));
  }
  if (C == 0) return ffi::Error::Success();
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    using A = typename AccOf<S>::type;
    const A* r = static_cast<const A*>(rois.untyped_data());
    const S* g = static_cast<const S*>(cot.untyped_data());
    A* df = static_cast<A*>(d_features->untyped_data());
    const int64_t H = cfg.level.height, W = cfg.level.width;
    ImageBuckets buckets;
    const double sc = cfg.level.scale;
    buckets.Build(K, out_batch, 1, [&](int64_t k) {
      const A* roi = r + 5 * k;
      const int64_t b = (H > 0 && W > 0) ? roi_batch_index(roi, out_batch) : int64_t{-1};
      return std::make_tuple(b, int64_t{0}, 0.5 * sc * static_cast<double>(roi[2] + roi[4]),
                             0.5 * sc * static_cast<double>(roi[1] + roi[3]));
    });
    const BackwardSplit split(C, out_batch, PoolThreads(pool));
    ParallelFor(pool, out_batch * split.blocks, [&](int64_t item) {
      const int64_t b = item / split.blocks, j = item % split.blocks;
      const int64_t c0 = j * split.width, c1 = std::min(C, c0 + split.width);
      const int64_t first = buckets.start[b];
      PoolBackwardBlock<S>(cfg, g, r, df, b, buckets.order.data() + first, buckets.start[b + 1] - first, c0, c1);
    });
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cpu
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPoolForwardCpu, jax_roi::cpu::RoiPoolForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C]
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("binning"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPoolBackwardCpu, jax_roi::cpu::RoiPoolBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("binning"));
