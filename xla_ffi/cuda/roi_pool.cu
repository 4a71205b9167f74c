// RoIPool (Fast R-CNN; binning "caffe" or "floor") on CUDA: XLA FFI handlers.
//
// NHWC: features [B, H, W, C], rois [K, 5], output [K, oh, ow, C]. Each bin takes the
// maximum over whole cells (roi_math.h's pool_bin_range, as the CPU kernels); a thread owns
// V neighbouring channels of one bin (16-byte loads when C % V == 0), so every cell read is
// coalesced. Backward: the first maximal cell (row-major, strict >) of each channel gets
// the cotangent, by atomicAdd, or (deterministic != 0) by a gather over feature tiles as in
// cuda/roi_align.cu: bitwise reproducible.
//
// Each kernel is a struct whose ROI_HD run() body takes its thread indices from the Block
// (cuda/device_ops.h); PlanPool computes every launch's geometry. The same file built by
// the host compiler (cuda/emulated_roi_pool.cc) runs these bodies on the CPU for the emulated
// targets.
//
// The same operands and attributes as cpu/roi_pool.cc, plus `deterministic` on the backward.
#include <string>

#include "cuda/common.cuh"

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {
namespace {

template <typename S>
struct PoolArgs {
  const typename AccOf<S>::type* rois;
  const S* feats;                   // [B, H, W, C]
  const S* cot;                     // backward: [K, oh, ow, C]
  S* out;                           // forward: [K, oh, ow, C]
  typename AccOf<S>::type* grad;    // backward: [out_batch, H, W, C]
  int64_t num_rois, channels, oh, ow;
  int64_t batch, out_batch, height, width;
  double scale;
  int64_t binning;
};

constexpr int kPoolThreads = 256;

// Bin (ph, pw) of a live roi: cells [*y0, *y0 + *hy) x [*x0, *x0 + *hx).
template <typename A>
ROI_HDI void pool_bin(const A* roi, A scale, int64_t ph, int64_t pw, int64_t oh, int64_t ow,
                                         int64_t H, int64_t W, int64_t binning, int* y0, int* hy, int* x0, int* hx) {
  pool_bin_range<A>(roi[2], roi[4], scale, ph, oh, H, binning, y0, hy);
  pool_bin_range<A>(roi[1], roi[3], scale, pw, ow, W, binning, x0, hx);
}

template <typename S, int V>
struct PoolForwardKernel {
  static constexpr int kMaxThreads = kPoolThreads;
  template <typename Block>
  ROI_HD static void run(const Block& blk, const PoolArgs<S>& args) {
    blk.each_thread([&](const Thread& t) { thread(t, args); });
  }
  ROI_HD static void thread(const Thread& t, const PoolArgs<S>& args) {
    using A = typename AccOf<S>::type;
    const int64_t bins = args.oh * args.ow, C = args.channels, CV = C / V;
    const int64_t H = args.height, W = args.width;
    const int64_t groups = (bins + t.block.y - 1) / t.block.y;
    const int64_t work = args.num_rois * groups;
    const A scale = static_cast<A>(args.scale);
    for (int64_t blk = t.block_idx.x; blk < work; blk += t.grid.x) {
      const int64_t k = blk / groups;
      const int64_t bin = (blk % groups) * t.block.y + t.idx.y;
      if (bin >= bins) continue;
      const int64_t ph = bin / args.ow, pw = bin % args.ow;
      S* out = args.out + (k * bins + bin) * C;
      const A* roi = args.rois + 5 * k;
      const int64_t b = (H > 0 && W > 0) ? roi_batch_index(roi, args.batch) : -1;
      int y0 = 0, hy = 0, x0 = 0, hx = 0;
      if (b >= 0) pool_bin(roi, scale, ph, pw, args.oh, args.ow, H, W, args.binning, &y0, &hy, &x0, &hx);
      const S* __restrict__ img = args.feats + (b >= 0 ? b : 0) * H * W * C;
      for (int64_t cv = t.idx.x; cv < CV; cv += t.block.x) {
        const int64_t c = cv * V;
        A best[V];
#pragma unroll
        for (int j = 0; j < V; ++j) best[j] = neg_infinity<A>();
        for (int dy = 0; dy < hy; ++dy) {
          for (int dx = 0; dx < hx; ++dx) {
            A v[V];
            load_vec<S, V>(img + ((static_cast<int64_t>(y0) + dy) * W + x0 + dx) * C + c, v);
#pragma unroll
            for (int j = 0; j < V; ++j) best[j] = v[j] > best[j] ? v[j] : best[j];
          }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) best[j] = best[j] == neg_infinity<A>() ? A(0) : best[j];
        store_vec<S, V>(out + c, best);
      }
    }
  }
};

template <typename S, int V>
struct PoolBackwardKernel {
  static constexpr int kMaxThreads = kPoolThreads;
  template <typename Block>
  ROI_HD static void run(const Block& blk, const PoolArgs<S>& args) {
    blk.each_thread([&](const Thread& t) { thread(t, args); });
  }
  ROI_HD static void thread(const Thread& t, const PoolArgs<S>& args) {
    using A = typename AccOf<S>::type;
    const int64_t bins = args.oh * args.ow, C = args.channels, CV = C / V;
    const int64_t H = args.height, W = args.width;
    const int64_t groups = (bins + t.block.y - 1) / t.block.y;
    const int64_t work = args.num_rois * groups;
    const A scale = static_cast<A>(args.scale);
    for (int64_t blk = t.block_idx.x; blk < work; blk += t.grid.x) {
      const int64_t k = blk / groups;
      const int64_t bin = (blk % groups) * t.block.y + t.idx.y;
      if (bin >= bins) continue;
      const int64_t ph = bin / args.ow, pw = bin % args.ow;
      const A* roi = args.rois + 5 * k;
      const int64_t b = roi_batch_index(roi, args.out_batch);
      if (b < 0) continue;
      int y0, hy, x0, hx;
      pool_bin(roi, scale, ph, pw, args.oh, args.ow, H, W, args.binning, &y0, &hy, &x0, &hx);
      const S* __restrict__ img = args.feats + (b % args.batch) * H * W * C;
      A* dimg = args.grad + b * H * W * C;
      const S* __restrict__ gk = args.cot + (k * bins + bin) * C;
      for (int64_t cv = t.idx.x; cv < CV; cv += t.block.x) {
        const int64_t c = cv * V;
        A best[V];
        int64_t arg[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          best[j] = neg_infinity<A>();
          arg[j] = -1;
        }
        for (int dy = 0; dy < hy; ++dy) {
          for (int dx = 0; dx < hx; ++dx) {
            const int64_t cell = (static_cast<int64_t>(y0) + dy) * W + x0 + dx;
            A v[V];
            load_vec<S, V>(img + cell * C + c, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              if (v[j] > best[j]) {
                best[j] = v[j];
                arg[j] = cell;
              }
            }
          }
        }
        A g[V];
        load_vec<S, V>(gk + c, g);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (arg[j] >= 0) atomic_add(dimg + arg[j] * C + c + j, g[j]);
        }
      }
    }
  }
};

// The deterministic gather's tiling of d_features (PlanPool).
struct PoolTiles {
  int tile;
  int64_t tiles_y, tiles_x, chunks;
};

// Deterministic: one block per (image, tile, channel chunk); rois listed in order; each
// thread (one channel) adds the cotangent of every bin whose first maximal cell lies in the
// tile, in (roi, ph, pw) order, then writes the tile once. Shared memory: the tile's
// accumulators [tile*tile][nt], the roi list [nt], one int per warp for block_compact.
template <typename S>
struct PoolGatherKernel {
  static constexpr int kMaxThreads = 128;
  using A = typename AccOf<S>::type;
  ROI_HD static size_t shared_bytes(int tile, int nt) {
    return sizeof(A) * tile * tile * nt + sizeof(int) * nt + sizeof(int) * (nt / kWarpSize);
  }
  template <typename Block>
  ROI_HD static void run(const Block& blk, const PoolArgs<S>& args, const PoolTiles& tl) {
    const int tile = tl.tile;
    const int nt = static_cast<int>(blk.block_dim().x);
    A* acc = reinterpret_cast<A*>(blk.shared());      // [tile*tile][nt]
    int* rlist = reinterpret_cast<int*>(acc + tile * tile * nt);  // [nt]
    int* warp_sums = rlist + nt;                       // [nt / 32]
    const int64_t K = args.num_rois, C = args.channels, oh = args.oh, ow = args.ow, bins = oh * ow;
    const int64_t H = args.height, W = args.width;
    const A scale = static_cast<A>(args.scale);
    const int64_t work = args.out_batch * tl.tiles_y * tl.tiles_x * tl.chunks;
    for (int64_t bi = blk.block_index().x; bi < work; bi += blk.grid_dim().x) {  // uniform over the block
      int64_t q = bi;
      const int64_t chunk = q % tl.chunks;
      q /= tl.chunks;
      const int64_t tx = q % tl.tiles_x;
      q /= tl.tiles_x;
      const int64_t ty = q % tl.tiles_y;
      const int64_t b = q / tl.tiles_y;
      const int r0 = static_cast<int>(ty * tile), r1 = static_cast<int>(ty * tile + tile < H ? ty * tile + tile : H);
      const int c0 = static_cast<int>(tx * tile), c1 = static_cast<int>(tx * tile + tile < W ? tx * tile + tile : W);
      const S* __restrict__ img = args.feats + (b % args.batch) * H * W * C;
      blk.each_thread([&](const Thread& t) {
        const int tid = t.linear();
        for (int e = 0; e < tile * tile; ++e) acc[e * nt + tid] = A(0);
      });
      for (int64_t k0 = 0; k0 < K; k0 += nt) {
        PerThread<Block, int> hit, pos;
        blk.each_thread([&](const Thread& t) {
          hit[t] = 0;
          const int64_t k = k0 + t.linear();
          if (k >= K) return;
          const A* roi = args.rois + 5 * k;
          if (roi_batch_index(roi, args.out_batch) != b) return;
          // Union of the bins' cell ranges against the tile.
          bool ytouch = false, xtouch = false;
          for (int64_t p = 0; p < oh && !ytouch; ++p) {
            int s, e;
            pool_bin_range<A>(roi[2], roi[4], scale, p, oh, H, args.binning, &s, &e);
            ytouch = e > 0 && s < r1 && s + e > r0;
          }
          for (int64_t p = 0; p < ow && !xtouch && ytouch; ++p) {
            int s, e;
            pool_bin_range<A>(roi[1], roi[3], scale, p, ow, W, args.binning, &s, &e);
            xtouch = e > 0 && s < c1 && s + e > c0;
          }
          hit[t] = ytouch && xtouch;
        });
        const int n = block_compact(blk, hit, pos, warp_sums);
        blk.each_thread([&](const Thread& t) {
          if (hit[t]) rlist[pos[t]] = static_cast<int>(k0 + t.linear());
        });
        blk.sync();
        blk.each_thread([&](const Thread& t) {
          const int tid = t.linear();
          const int64_t c = chunk * nt + tid;
          if (c >= C) return;
          for (int i = 0; i < n; ++i) {
            const int64_t kk = rlist[i];
            const A* roi = args.rois + 5 * kk;
            const S* __restrict__ gk = args.cot + kk * bins * C + c;
            for (int64_t ph = 0; ph < oh; ++ph) {
              int y0, hy;
              pool_bin_range<A>(roi[2], roi[4], scale, ph, oh, H, args.binning, &y0, &hy);
              if (!(hy > 0 && y0 < r1 && y0 + hy > r0)) continue;
              for (int64_t pw = 0; pw < ow; ++pw) {
                int x0, hx;
                pool_bin_range<A>(roi[1], roi[3], scale, pw, ow, W, args.binning, &x0, &hx);
                if (!(hx > 0 && x0 < c1 && x0 + hx > c0)) continue;
                A best = neg_infinity<A>();
                int ay = -1, ax = -1;
                for (int dy = 0; dy < hy; ++dy) {
                  for (int dx = 0; dx < hx; ++dx) {
                    const A v = to_acc(img[((static_cast<int64_t>(y0) + dy) * W + x0 + dx) * C + c]);
                    if (v > best) {
                      best = v;
                      ay = y0 + dy;
                      ax = x0 + dx;
                    }
                  }
                }
                if (ay >= r0 && ay < r1 && ax >= c0 && ax < c1) {
                  acc[((ay - r0) * tile + (ax - c0)) * nt + tid] += to_acc(gk[(ph * ow + pw) * C]);
                }
              }
            }
          }
        });
        blk.sync();  // rlist and warp_sums are rewritten next
      }
      blk.each_thread([&](const Thread& t) {
        const int tid = t.linear();
        const int64_t c = chunk * nt + tid;
        if (c >= C) return;
        for (int y = r0; y < r1; ++y) {
          for (int x = c0; x < c1; ++x) {
            args.grad[((b * H + y) * W + x) * C + c] = acc[((y - r0) * tile + (x - c0)) * nt + tid];
          }
        }
      });
    }
  }
};

// ---------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------

// Launch geometry of the three kernels (the CUDA launch and the host runner both use it).
struct PoolPlan {
  int vec;          // channels per thread of the forward / atomic backward: VecWidth or 1
  LaunchGeom geom;
  PoolTiles tiles;  // the deterministic gather only
};

template <typename S>
PoolPlan PlanPool(const PoolArgs<S>& args, bool gather) {
  using A = typename AccOf<S>::type;
  PoolPlan p{};
  const int64_t C = args.channels;
  if (!gather) {
    p.vec = C % VecWidth<S>() == 0 ? VecWidth<S>() : 1;
    const int64_t CV = C / p.vec;
    const int64_t bins = args.oh * args.ow;
    const int bx = CV >= kPoolThreads ? kPoolThreads : RoundUp32(CV);
    int by = kPoolThreads / bx;
    if (by > bins) by = static_cast<int>(bins);
    if (by < 1) by = 1;
    p.geom = LaunchGeom{Dim3{GridFor(args.num_rois * ((bins + by - 1) / by)), 1, 1},
                        Dim3{static_cast<unsigned>(bx), static_cast<unsigned>(by), 1}, 0};
    return p;
  }
  p.vec = 1;
  const int64_t H = args.height, W = args.width;
  const int cap = sizeof(A) == 8 ? 64 : 128;
  const int nt = C >= cap ? cap : RoundUp32(C);
  PoolTiles& t = p.tiles;
  t.chunks = (C + nt - 1) / nt;
  const int64_t blocks8 = args.out_batch * ((H + 7) / 8) * ((W + 7) / 8) * t.chunks;
  t.tile = blocks8 >= 1024 ? 8 : 4;
  t.tiles_y = (H + t.tile - 1) / t.tile;
  t.tiles_x = (W + t.tile - 1) / t.tile;
  p.geom = LaunchGeom{Dim3{GridFor(args.out_batch * t.tiles_y * t.tiles_x * t.chunks), 1, 1},
                      Dim3{static_cast<unsigned>(nt), 1, 1}, PoolGatherKernel<S>::shared_bytes(t.tile, nt)};
  return p;
}

template <typename S, bool kBackward, typename Exec>
void LaunchPool(Exec& exec, const PoolArgs<S>& args) {
  constexpr int kV = VecWidth<S>();
  const PoolPlan p = PlanPool(args, false);
  if (p.vec == kV) {
    if (kBackward) {
      exec.template launch<PoolBackwardKernel<S, kV>>(p.geom, args);
    } else {
      exec.template launch<PoolForwardKernel<S, kV>>(p.geom, args);
    }
  } else if (kBackward) {
    exec.template launch<PoolBackwardKernel<S, 1>>(p.geom, args);
  } else {
    exec.template launch<PoolForwardKernel<S, 1>>(p.geom, args);
  }
}

template <typename S, typename Exec>
void LaunchPoolGather(Exec& exec, const PoolArgs<S>& args) {
  const PoolPlan p = PlanPool(args, true);
  exec.template launch<PoolGatherKernel<S>>(p.geom, args, p.tiles);
}

template <typename S>
PoolArgs<S> MakePoolArgs(const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, int64_t num_rois, int64_t oh,
                         int64_t ow, double scale, int64_t binning) {
  auto fd = features.dimensions();
  PoolArgs<S> a{};
  a.rois = static_cast<const typename AccOf<S>::type*>(rois.untyped_data());
  a.feats = static_cast<const S*>(features.untyped_data());
  a.num_rois = num_rois;
  a.channels = fd[3];
  a.oh = oh;
  a.ow = ow;
  a.batch = fd[0];
  a.out_batch = fd[0];
  a.height = fd[1];
  a.width = fd[2];
  a.scale = scale;
  a.binning = binning;
  return a;
}

ffi::Error RoiPoolForwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                  ffi::Result<ffi::AnyBuffer> out, double spatial_scale, int64_t binning) {
  const char* op = "jax_roi roi_pool forward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  ffi::DataType dtype;
  int64_t K;
  if (auto err = CheckPool(op, rois, features, spatial_scale, binning, &dtype, &K); err.failure()) return err;
  const int64_t C = features.dimensions()[3];
  auto od = out->dimensions();
  if (od.size() != 4 || od[0] != K || od[1] < 1 || od[2] < 1 || od[3] != C || out->element_type() != dtype) {
    return Invalid(std::string(op) + ": output: expected " + DtypeName(dtype) + " [K=" + std::to_string(K) +
                   ", oh, ow, C=" + std::to_string(C) + "], got " + DtypeName(out->element_type()) + " " +
                   ShapeString(od));
  }
  if (K == 0 || C == 0) return ffi::Error::Success();
  // Every output element is written by the kernel (zeros for dead rois and empty bins).
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    PoolArgs<S> args = MakePoolArgs<S>(rois, features, K, od[1], od[2], spatial_scale, binning);
    args.out = static_cast<S*>(out->untyped_data());
    LaunchPool<S, false>(exec, args);
  });
  return exec.status(op);
}

ffi::Error RoiPoolBackwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                   ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_features,
                                   double spatial_scale, int64_t binning, int64_t deterministic) {
  const char* op = "jax_roi roi_pool backward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  ffi::DataType dtype;
  int64_t K;
  if (auto err = CheckPool(op, rois, features, spatial_scale, binning, &dtype, &K); err.failure()) return err;
  auto fd = features.dimensions();
  const int64_t B = fd[0], H = fd[1], W = fd[2], C = fd[3];
  auto cd = cot.dimensions();
  if (auto err = CheckCotangent(op, cot, K, C, dtype); err.failure()) return err;
  const ffi::DataType ctype = CoordType(dtype);
  auto dd = d_features->dimensions();
  const int64_t out_batch = dd.size() == 4 ? dd[0] : -1;
  const bool batch_ok = B == 0 ? out_batch == 0 : (out_batch >= 0 && out_batch % B == 0);
  if (dd.size() != 4 || !batch_ok || dd[1] != H || dd[2] != W || dd[3] != C || d_features->element_type() != ctype) {
    return Invalid(std::string(op) + ": d_features: expected " + DtypeName(ctype) + " [n*" + std::to_string(B) + ", " +
                   std::to_string(H) + ", " + std::to_string(W) + ", " + std::to_string(C) + "], got " +
                   DtypeName(d_features->element_type()) + " " + ShapeString(dd));
  }
  const bool det = deterministic != 0;
  if (det && K > kMaxDeterministicRois) {
    return Invalid(std::string(op) + ": deterministic: supports at most " + std::to_string(kMaxDeterministicRois) +
                   " rois, got " + std::to_string(K));
  }
  const bool trivial = K == 0 || C == 0 || B <= 0 || H <= 0 || W <= 0;
  if (!det || trivial) {
    if (auto err = exec.zero(op, d_features->untyped_data(), d_features->size_bytes()); err.failure()) {
      return err;
    }
  }
  if (trivial) return ffi::Error::Success();
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    PoolArgs<S> args = MakePoolArgs<S>(rois, features, K, cd[1], cd[2], spatial_scale, binning);
    args.cot = static_cast<const S*>(cot.untyped_data());
    args.grad = static_cast<typename AccOf<S>::type*>(d_features->untyped_data());
    args.out_batch = out_batch;
    if (det) {
      LaunchPoolGather<S>(exec, args);
    } else {
      LaunchPool<S, true>(exec, args);
    }
  });
  return exec.status(op);
}

}  // namespace
}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiPoolForward), jax_roi::JAX_ROI_CUDA_NS::RoiPoolForwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C]
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("binning"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiPoolBackward), jax_roi::JAX_ROI_CUDA_NS::RoiPoolBackwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("binning")
                                  .Attr<int64_t>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});
