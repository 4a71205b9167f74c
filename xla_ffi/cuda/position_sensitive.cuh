// The position-sensitive ops (ps_roi_align, ps_roi_pool) on CUDA: the kernels and the
// handler bodies of both, written once against the geometry interface of
// common/position_sensitive.h (each op's .cu file instantiates them with its geometry and
// binds its handlers).
//
// NHWC: features [B, H, W, C = C_out*oh*ow], rois [K, 5], output [K, oh, ow, C_out]; output
// channel c of bin `bin` = ph*ow + pw reads input channel c*bins + bin. A thread owns one
// output channel of one bin (block: x over output channels, y over the bins of one roi), so
// the output and the cotangent are read and written coalesced; the map is read with the
// stride of the channel groups (bins), which the layout imposes.
//
// Forward: every output element is written (zeros for dead rois and empty bins).
// Feature gradient, as cuda/roi_align.cu:
// * default (deterministic == 0): scatter with atomicAdd, one thread per (bin, output
//   channel) of a roi;
// * deterministic != 0: a gather over feature tiles, one block per (image, tile, chunk of
//   input channels); it lists, in roi order, the rois whose taps can touch the tile, and
//   each thread (one input channel, so one bin) adds their contributions in a fixed order
//   (roi, y tap, x tap) into shared memory, then writes the tile once: bitwise
//   reproducible.
// Box gradient (ps_roi_align, rois_grad): one block per roi, reduced in the block in a fixed
// order (block_box_gradient): deterministic in both modes; in the deterministic mode it
// runs as the scatter kernel with the feature scatter switched off.
//
// The host compiler builds the .cu files too (cuda/emulated_ps_roi_*.cc) and runs the same
// bodies for the emulated targets.
#ifndef JAX_ROI_XLA_FFI_CUDA_POSITION_SENSITIVE_CUH_
#define JAX_ROI_XLA_FFI_CUDA_POSITION_SENSITIVE_CUH_

#include <string>

#include "common/position_sensitive.h"
#include "cuda/common.cuh"

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {
namespace ps {

template <typename S>
struct PsArgs {
  const typename AccOf<S>::type* rois;
  const S* feats;                   // [B, H, W, C]
  const S* cot;                     // backward: [K, oh, ow, C_out]
  S* out;                           // forward: [K, oh, ow, C_out]
  typename AccOf<S>::type* grad;    // backward: [out_batch, H, W, C]
  typename AccOf<S>::type* d_rois;  // backward with the box gradient: [K, 5]
  int64_t num_rois, channels, c_out, oh, ow;
  int64_t batch, out_batch, height, width, sampling_ratio;
  double scale;
  int do_features, do_rois;
};

template <typename A>
ROI_HDI bool dead_tap(const Tap<A>& t) {
  return t.w_lo == A(0) && t.w_hi == A(0);
}

// The geometry of roi k if it is live against `num_images` images (*image set), else false.
template <typename Geometry, typename S>
ROI_HDI bool live_roi(const PsArgs<S>& args, int64_t k, int64_t num_images, Geometry* g, int64_t* image) {
  using A = typename AccOf<S>::type;
  if (args.height <= 0 || args.width <= 0) return false;
  const A* roi = args.rois + 5 * k;
  *image = roi_batch_index(roi, num_images);
  if (*image < 0) return false;
  *g = Geometry::make(roi, static_cast<A>(args.scale), args.oh, args.ow, args.height, args.width,
                      args.sampling_ratio);
  return g->live();
}

constexpr int kPsThreads = 256;

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

template <template <typename> class G, typename S>
struct PsForwardKernel {
  static constexpr int kMaxThreads = kPsThreads;
  template <typename Block>
  ROI_HD static void run(const Block& blk, const PsArgs<S>& args) {
    blk.each_thread([&](const Thread& t) { thread(t, args); });
  }
  ROI_HD static void thread(const Thread& t, const PsArgs<S>& args) {
    using A = typename AccOf<S>::type;
    const int64_t bins = args.oh * args.ow, C = args.channels, c_out = args.c_out;
    const int64_t H = args.height, W = args.width;
    const int64_t groups = (bins + t.block.y - 1) / t.block.y;
    const int64_t work = args.num_rois * groups;
    for (int64_t blk = t.block_idx.x; blk < work; blk += t.grid.x) {
      const int64_t k = blk / groups;
      const int64_t bin = (blk % groups) * t.block.y + t.idx.y;
      if (bin >= bins) continue;
      S* out = args.out + (k * bins + bin) * c_out;
      G<A> g;
      int64_t b;
      if (!live_roi(args, k, args.batch, &g, &b)) {
        for (int64_t c = t.idx.x; c < c_out; c += t.block.x) out[c] = Store<S>::from(A(0));
        continue;
      }
      const auto ay = g.y(bin / args.ow);
      const auto ax = g.x(bin % args.ow);
      const S* __restrict__ img = args.feats + b * H * W * C + bin;  // channel c: img[pixel*C + c*bins]
      for (int64_t c = t.idx.x; c < c_out; c += t.block.x) {
        const S* __restrict__ ch = img + c * bins;
        A acc = A(0);
        for (int iy = 0; iy < ay.count; ++iy) {
          const Tap<A> a = ay.tap(iy);
          if (dead_tap(a)) continue;  // invalid sample: adds nothing
          const int rows[2] = {a.lo, a.hi};
          const A wy[2] = {a.w_lo, a.w_hi};
          for (int ix = 0; ix < ax.count; ++ix) {
            const Tap<A> e = ax.tap(ix);
            if (dead_tap(e)) continue;
            const int cols[2] = {e.lo, e.hi};
            const A wx[2] = {e.w_lo, e.w_hi};
#pragma unroll
            for (int u = 0; u < 2; ++u) {
#pragma unroll
              for (int q = 0; q < 2; ++q) {
                const A w = wy[u] * wx[q];
                if (w == A(0)) continue;  // a zero fraction, or the pool's unused second tap (CPU alike)
                acc += w * to_acc(ch[(static_cast<int64_t>(rows[u]) * W + cols[q]) * C]);
              }
            }
          }
        }
        out[c] = Store<S>::from(acc);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Scatter (atomic) backward; also the box gradient of both modes
// ---------------------------------------------------------------------------------------

// One thread's share of block-iteration `blk`: its feature scatter and its partial box
// gradient s = {x1, y1, x2, y2}.
template <template <typename> class G, typename S>
ROI_HD void PsScatterThread(const Thread& th, const PsArgs<S>& args, int64_t blk, double (&s)[4]) {
  using A = typename AccOf<S>::type;
  const int64_t bins = args.oh * args.ow, C = args.channels, c_out = args.c_out;
  const int64_t H = args.height, W = args.width;
  const bool do_features = args.do_features != 0, do_rois = args.do_rois != 0;
  // With the box gradient, one block per roi (the reduction stays in the block).
  const int64_t groups = do_rois ? 1 : (bins + th.block.y - 1) / th.block.y;
  const int64_t k = blk / groups;
  const int64_t g0 = (blk % groups) * th.block.y;
  const int64_t bin_end = do_rois ? bins : (g0 + th.block.y < bins ? g0 + th.block.y : bins);
  double s_x1 = 0, s_y1 = 0, s_x2 = 0, s_y2 = 0;
  G<A> g;
  int64_t b;
  if (live_roi(args, k, args.out_batch, &g, &b)) {
    const S* __restrict__ img = args.feats + (b % args.batch) * H * W * C;
    A* dimg = args.grad + b * H * W * C;
    for (int64_t bin = g0 + th.idx.y; bin < bin_end; bin += th.block.y) {
      const int64_t ph = bin / args.ow, pw = bin % args.ow;
      const auto ay = g.y(ph);
      const auto ax = g.x(pw);
      const S* __restrict__ gk = args.cot + (k * bins + bin) * c_out;
      for (int64_t c = th.idx.x; c < c_out; c += th.block.x) {
        const A gv = to_acc(gk[c]);
        const int64_t channel = ps_input_channel(c, bin, bins);
        for (int iy = 0; iy < ay.count; ++iy) {
          const Tap<A> a = ay.tap(iy);
          if (dead_tap(a)) continue;  // invalid sample: no value, no gradient
          const int64_t row_lo = static_cast<int64_t>(a.lo) * W, row_hi = static_cast<int64_t>(a.hi) * W;
          for (int ix = 0; ix < ax.count; ++ix) {
            const Tap<A> e = ax.tap(ix);
            if (dead_tap(e)) continue;
            const int64_t o4[4] = {(row_lo + e.lo) * C + channel, (row_lo + e.hi) * C + channel,
                                   (row_hi + e.lo) * C + channel, (row_hi + e.hi) * C + channel};
            if (do_features) {
              const A w4[4] = {a.w_lo * e.w_lo, a.w_lo * e.w_hi, a.w_hi * e.w_lo, a.w_hi * e.w_hi};
#pragma unroll
              for (int t = 0; t < 4; ++t) {
                if (w4[t] != A(0)) atomic_add(dimg + o4[t], w4[t] * gv);
              }
            }
            if constexpr (G<A>::kBoxGradient) {
              if (!do_rois || (a.dw == A(0) && e.dw == A(0))) continue;
              A sy, sx;
              bilinear_position_grad(a, e, gv, to_acc(img[o4[0]]), to_acc(img[o4[1]]), to_acc(img[o4[2]]),
                                     to_acc(img[o4[3]]), &sy, &sx);
              A y1, y2, x1, x2;
              ay.position_grad(iy, &y1, &y2);
              ax.position_grad(ix, &x1, &x2);
              s_y1 += static_cast<double>(sy) * static_cast<double>(y1);
              s_y2 += static_cast<double>(sy) * static_cast<double>(y2);
              s_x1 += static_cast<double>(sx) * static_cast<double>(x1);
              s_x2 += static_cast<double>(sx) * static_cast<double>(x2);
            }
          }
        }
      }
    }
  }
  s[0] = s_x1;
  s[1] = s_y1;
  s[2] = s_x2;
  s[3] = s_y2;
}

template <template <typename> class G, typename S>
struct PsScatterKernel {
  static constexpr int kMaxThreads = kPsThreads;
  // Shared memory: the box gradient's per-warp partial sums.
  ROI_HD static size_t shared_bytes(int threads, bool do_rois) {
    return do_rois ? box_gradient_shared_bytes(threads) : 0;
  }
  template <typename Block>
  ROI_HD static void run(const Block& blk, const PsArgs<S>& args) {
    const Dim3 bd = blk.block_dim();
    const int64_t bins = args.oh * args.ow;
    const bool do_rois = args.do_rois != 0;
    const int64_t groups = do_rois ? 1 : (bins + bd.y - 1) / bd.y;
    const int64_t work = args.num_rois * groups;
    double* red = reinterpret_cast<double*>(blk.shared());
    PerThread<Block, double> v[4];
    for (int64_t bi = blk.block_index().x; bi < work; bi += blk.grid_dim().x) {  // uniform over the block
      blk.each_thread([&](const Thread& t) {
        double s[4];
        PsScatterThread<G, S>(t, args, bi, s);
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q][t] = s[q];
      });
      if (do_rois) block_box_gradient(blk, v, red, args.d_rois + 5 * (bi / groups));
    }
  }
};

// ---------------------------------------------------------------------------------------
// Deterministic gather backward
// ---------------------------------------------------------------------------------------

struct PsTiles {
  int tile;
  int64_t tiles_y, tiles_x, chunks;
};

// One block per (image, tile, chunk of input channels); a thread owns one input channel.
// Shared memory: the tile's accumulators [tile*tile][nt], the roi list [nt], one int per
// warp for block_compact.
template <template <typename> class G, typename S>
struct PsGatherKernel {
  static constexpr int kMaxThreads = 128;
  using A = typename AccOf<S>::type;
  ROI_HD static size_t shared_bytes(int tile, int nt) {
    return sizeof(A) * tile * tile * nt + sizeof(int) * nt + sizeof(int) * (nt / kWarpSize);
  }
  template <typename Block>
  ROI_HD static void run(const Block& blk, const PsArgs<S>& args, const PsTiles& tl) {
    const int tile = tl.tile;
    const int nt = static_cast<int>(blk.block_dim().x);
    A* acc = reinterpret_cast<A*>(blk.shared());                  // [tile*tile][nt]
    int* rlist = reinterpret_cast<int*>(acc + tile * tile * nt);  // [nt]
    int* warp_sums = rlist + nt;                                  // [nt / 32]
    const int64_t K = args.num_rois, C = args.channels, c_out = args.c_out, bins = args.oh * args.ow;
    const int64_t H = args.height, W = args.width;
    const int64_t work = args.out_batch * tl.tiles_y * tl.tiles_x * tl.chunks;
    PerThread<Block, int> hit, pos;
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
      blk.each_thread([&](const Thread& t) {
        const int tid = t.linear();
        for (int e = 0; e < tile * tile; ++e) acc[e * nt + tid] = A(0);
      });
      for (int64_t k0 = 0; k0 < K; k0 += nt) {
        // The rois of this image whose taps can touch the tile, in roi order.
        blk.each_thread([&](const Thread& t) {
          hit[t] = 0;
          const int64_t k = k0 + t.linear();
          if (k >= K) return;
          G<A> g;
          int64_t image;
          if (!live_roi(args, k, args.out_batch, &g, &image) || image != b) return;
          int ylo, yhi, xlo, xhi;
          hit[t] = g.footprint_y(&ylo, &yhi) && g.footprint_x(&xlo, &xhi) && ylo < r1 && yhi >= r0 && xlo < c1 &&
                   xhi >= c0;
        });
        const int n = block_compact(blk, hit, pos, warp_sums);
        blk.each_thread([&](const Thread& t) {
          if (hit[t]) rlist[pos[t]] = static_cast<int>(k0 + t.linear());
        });
        blk.sync();
        blk.each_thread([&](const Thread& t) {
          const int tid = t.linear();
          const int64_t channel = chunk * nt + tid;
          if (channel >= C) return;
          const int64_t bin = channel % bins, c = channel / bins;
          for (int i = 0; i < n; ++i) {
            const int64_t kk = rlist[i];
            G<A> g;
            int64_t image;
            live_roi(args, kk, args.out_batch, &g, &image);  // listed: live, of image b
            const auto ay = g.y(bin / args.ow);
            const auto ax = g.x(bin % args.ow);
            const A gv = to_acc(args.cot[(kk * bins + bin) * c_out + c]);
            for (int iy = 0; iy < ay.count; ++iy) {
              const Tap<A> a = ay.tap(iy);
              const int rows[2] = {a.lo, a.hi};
              const A wy[2] = {a.w_lo, a.w_hi};
              const bool in_y[2] = {wy[0] != A(0) && a.lo >= r0 && a.lo < r1, wy[1] != A(0) && a.hi >= r0 && a.hi < r1};
              if (!in_y[0] && !in_y[1]) continue;
              for (int ix = 0; ix < ax.count; ++ix) {
                const Tap<A> e = ax.tap(ix);
                const int cols[2] = {e.lo, e.hi};
                const A wx[2] = {e.w_lo, e.w_hi};
#pragma unroll
                for (int u = 0; u < 2; ++u) {
#pragma unroll
                  for (int v = 0; v < 2; ++v) {
                    if (!in_y[u] || wx[v] == A(0) || cols[v] < c0 || cols[v] >= c1) continue;
                    acc[((rows[u] - r0) * tile + (cols[v] - c0)) * nt + tid] += (wy[u] * wx[v]) * gv;
                  }
                }
              }
            }
          }
        });
        blk.sync();  // rlist and warp_sums are rewritten next
      }
      blk.each_thread([&](const Thread& t) {
        const int tid = t.linear();
        const int64_t channel = chunk * nt + tid;
        if (channel >= C) return;
        for (int y = r0; y < r1; ++y) {
          for (int x = c0; x < c1; ++x) {
            args.grad[((b * H + y) * W + x) * C + channel] = acc[((y - r0) * tile + (x - c0)) * nt + tid];
          }
        }
      });
    }
  }
};

// ---------------------------------------------------------------------------------------
// Launch geometry (the CUDA launch and the host runner both use it)
// ---------------------------------------------------------------------------------------

// The forward and the scatter: block x over output channels, y over bins, 256 threads.
template <typename S>
LaunchGeom PlanBins(const PsArgs<S>& args, bool one_block_per_roi) {
  const int64_t bins = args.oh * args.ow;
  const int bx = args.c_out >= kPsThreads ? kPsThreads : RoundUp32(args.c_out);
  int by = kPsThreads / bx;
  if (by > bins) by = static_cast<int>(bins);
  if (by < 1) by = 1;
  const int64_t groups = one_block_per_roi ? 1 : (bins + by - 1) / by;
  return LaunchGeom{Dim3{GridFor(args.num_rois * groups), 1, 1},
                    Dim3{static_cast<unsigned>(bx), static_cast<unsigned>(by), 1}, 0};
}

struct GatherPlan {
  LaunchGeom geom;
  PsTiles tiles;
};

template <template <typename> class G, typename S>
GatherPlan PlanGather(const PsArgs<S>& args) {
  using A = typename AccOf<S>::type;
  GatherPlan p{};
  const int64_t C = args.channels, H = args.height, W = args.width;
  const int cap = sizeof(A) == 8 ? 64 : 128;
  const int nt = C >= cap ? cap : RoundUp32(C);
  PsTiles& t = p.tiles;
  t.chunks = (C + nt - 1) / nt;
  // 8 x 8 tiles when there are enough of them to fill the GPU, else 4 x 4.
  const int64_t blocks8 = args.out_batch * ((H + 7) / 8) * ((W + 7) / 8) * t.chunks;
  t.tile = blocks8 >= 1024 ? 8 : 4;
  t.tiles_y = (H + t.tile - 1) / t.tile;
  t.tiles_x = (W + t.tile - 1) / t.tile;
  p.geom = LaunchGeom{Dim3{GridFor(args.out_batch * t.tiles_y * t.tiles_x * t.chunks), 1, 1},
                      Dim3{static_cast<unsigned>(nt), 1, 1}, PsGatherKernel<G, S>::shared_bytes(t.tile, nt)};
  return p;
}

// ---------------------------------------------------------------------------------------
// Handler bodies (the op's own attributes are checked by its .cu before these)
// ---------------------------------------------------------------------------------------

template <typename S>
PsArgs<S> MakeArgs(const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, int64_t num_rois, int64_t oh,
                   int64_t ow, double scale, int64_t sampling_ratio) {
  auto fd = features.dimensions();
  PsArgs<S> a{};
  a.rois = static_cast<const typename AccOf<S>::type*>(rois.untyped_data());
  a.feats = static_cast<const S*>(features.untyped_data());
  a.num_rois = num_rois;
  a.channels = fd[3];
  a.oh = oh;
  a.ow = ow;
  a.c_out = fd[3] / (oh * ow);
  a.batch = fd[0];
  a.out_batch = fd[0];
  a.height = fd[1];
  a.width = fd[2];
  a.scale = scale;
  a.sampling_ratio = sampling_ratio;
  return a;
}

template <template <typename> class G, typename Exec>
ffi::Error Forward(Exec& exec, const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features,
                   ffi::AnyBuffer& out, double scale, int64_t sampling_ratio) {
  ffi::DataType dtype;
  int64_t K, oh, ow;
  if (auto err = CheckSingleMap(op, features, scale, &dtype); err.failure()) return err;
  if (auto err = CheckRois(rois, dtype, op, &K); err.failure()) return err;
  const int64_t C = features.dimensions()[3];
  if (auto err = CheckPositionSensitiveBins(op, "output", out, K, C, dtype, &oh, &ow); err.failure()) return err;
  if (K == 0 || C == 0) return ffi::Error::Success();
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    PsArgs<S> args = MakeArgs<S>(rois, features, K, oh, ow, scale, sampling_ratio);
    args.out = static_cast<S*>(out.untyped_data());
    exec.template launch<PsForwardKernel<G, S>>(PlanBins(args, false), args);
  });
  return exec.status(op);
}

// d_rois: null for an op without a box gradient (no such result).
template <template <typename> class G, typename Exec>
ffi::Error Backward(Exec& exec, const char* op, const ffi::AnyBuffer& cot, const ffi::AnyBuffer& rois,
                    const ffi::AnyBuffer& features, ffi::AnyBuffer* d_rois, ffi::AnyBuffer& d_features, double scale,
                    int64_t sampling_ratio, bool rois_grad, int64_t deterministic) {
  ffi::DataType dtype;
  int64_t K, oh, ow;
  if (auto err = CheckSingleMap(op, features, scale, &dtype); err.failure()) return err;
  if (auto err = CheckRois(rois, dtype, op, &K); err.failure()) return err;
  auto fd = features.dimensions();
  const int64_t B = fd[0], H = fd[1], W = fd[2], C = fd[3];
  if (auto err = CheckPositionSensitiveBins(op, "cotangent", cot, K, C, dtype, &oh, &ow); err.failure()) return err;
  const ffi::DataType ctype = CoordType(dtype);
  if (d_rois != nullptr) {
    if (auto err = CheckShape(*d_rois, {K, 5}, ctype, std::string(op) + ": d_rois"); err.failure()) return err;
  }
  int64_t out_batch;
  if (auto err = CheckFeatureGradient(op, d_features, fd, ctype, &out_batch); err.failure()) return err;
  const bool det = deterministic != 0;
  if (det && K > kMaxDeterministicRois) {
    return Invalid(std::string(op) + ": deterministic: expected at most " + std::to_string(kMaxDeterministicRois) +
                   " rois, got " + std::to_string(K));
  }
  // Outputs initialised on the stream: d_rois always (rows of dead rois stay zero unless the
  // box-gradient kernel writes them); d_features unless the gather kernel writes them all.
  if (d_rois != nullptr) {
    if (auto err = exec.zero(op, d_rois->untyped_data(), d_rois->size_bytes()); err.failure()) return err;
  }
  const bool trivial = K == 0 || C == 0 || B <= 0 || H <= 0 || W <= 0;
  if (!det || trivial) {
    if (auto err = exec.zero(op, d_features.untyped_data(), d_features.size_bytes()); err.failure()) return err;
  }
  if (trivial) return ffi::Error::Success();
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    PsArgs<S> args = MakeArgs<S>(rois, features, K, oh, ow, scale, sampling_ratio);
    args.cot = static_cast<const S*>(cot.untyped_data());
    args.grad = static_cast<typename AccOf<S>::type*>(d_features.untyped_data());
    args.d_rois = d_rois != nullptr ? static_cast<typename AccOf<S>::type*>(d_rois->untyped_data()) : nullptr;
    args.out_batch = out_batch;
    args.do_features = det ? 0 : 1;
    args.do_rois = (d_rois != nullptr && rois_grad) ? 1 : 0;
    if (args.do_features || args.do_rois) {
      LaunchGeom geom = PlanBins(args, args.do_rois != 0);
      geom.shared_bytes = PsScatterKernel<G, S>::shared_bytes(static_cast<int>(geom.block.x * geom.block.y),
                                                               args.do_rois != 0);
      exec.template launch<PsScatterKernel<G, S>>(geom, args);
    }
    if (det) {
      const GatherPlan p = PlanGather<G>(args);
      exec.template launch<PsGatherKernel<G, S>>(p.geom, args, p.tiles);
    }
  });
  return exec.status(op);
}

}  // namespace ps
}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CUDA_POSITION_SENSITIVE_CUH_
