// Rotated RoIAlign (detectron2's ROIAlignRotated) on CUDA: the kernels and XLA FFI handlers.
//
// NHWC: features [B, H, W, C], rois [K, 6] (batch index, x_ctr, y_ctr, w, h, angle in
// degrees), output [K, oh, ow, C]. The per-box and per-sample arithmetic is
// common/rotated.h's, shared with the CPU kernels. A thread owns one channel of one bin
// (block: x over channels, y over the bins of one roi), so the output, the cotangent and
// each tap's channel vector are read and written coalesced; every thread of a bin walks
// the bin's sample pairs (the axes are not separable).
//
// Forward: every output element is written (zeros for dead rois and empty bins).
// Feature gradient, as cuda/position_sensitive.cuh:
// * default (deterministic == 0): scatter with atomicAdd, one thread per (bin, channel);
// * deterministic != 0: a gather over feature tiles, one block per (image, tile, chunk of
//   channels); it lists, in roi order, the rois whose footprint can touch the tile, and
//   each thread (one channel) adds their contributions in a fixed order (roi, bin, sample)
//   into shared memory, then writes the tile once: bitwise reproducible.
// Box gradient (rois_grad, all five numbers): one block per roi, reduced in the block in a
// fixed order (block_box_gradient): deterministic in both modes; in the deterministic mode
// it runs as the scatter kernel with the feature scatter switched off.
//
// The same operands and attributes as cpu/roi_align_rotated.cc, plus `deterministic`
// (int64) on the backward. The host compiler builds this file too
// (cuda/emulated_roi_align_rotated.cc) and runs the same bodies for the emulated targets.
#include <string>

#include "common/rotated.h"
#include "cuda/common.cuh"

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {
namespace {

constexpr int kBoxNumbers = 5;  // the box gradient's numbers: x_ctr, y_ctr, w, h, angle
constexpr int kRotatedThreads = 256;

template <typename S>
struct RotatedArgs {
  const typename AccOf<S>::type* rois;
  const S* feats;                   // [B, H, W, C]
  const S* cot;                     // backward: [K, oh, ow, C]
  S* out;                           // forward: [K, oh, ow, C]
  typename AccOf<S>::type* grad;    // backward: [out_batch, H, W, C]
  typename AccOf<S>::type* d_rois;  // backward: [K, 6]
  int64_t num_rois, channels, oh, ow;
  int64_t batch, out_batch, height, width, sampling_ratio;
  double scale;
  int aligned, do_features, do_rois;
};

// The geometry of roi k if it is live against `num_images` images (*image set), else false.
template <typename S>
ROI_HDI bool live_roi(const RotatedArgs<S>& args, int64_t k, int64_t num_images,
                      RotatedGeometry<typename AccOf<S>::type>* g, int64_t* image) {
  using A = typename AccOf<S>::type;
  return RotatedGeometry<A>::make(args.rois + kRotatedRoiWidth * k, num_images, static_cast<A>(args.scale), args.oh,
                                  args.ow, args.height, args.width, args.sampling_ratio, args.aligned != 0, g,
                                  image) &&
         g->live();
}

// The four taps of a sample: pixel offsets (row * W + column) and weights.
template <typename A>
ROI_HDI void sample_taps(const RotatedSample<A>& s, int64_t W, int64_t (&pixel)[4], A (&weight)[4]) {
  const int64_t row_lo = static_cast<int64_t>(s.ty.lo) * W, row_hi = static_cast<int64_t>(s.ty.hi) * W;
  pixel[0] = row_lo + s.tx.lo;
  pixel[1] = row_lo + s.tx.hi;
  pixel[2] = row_hi + s.tx.lo;
  pixel[3] = row_hi + s.tx.hi;
  weight[0] = s.ty.w_lo * s.tx.w_lo;
  weight[1] = s.ty.w_lo * s.tx.w_hi;
  weight[2] = s.ty.w_hi * s.tx.w_lo;
  weight[3] = s.ty.w_hi * s.tx.w_hi;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

template <typename S>
struct RotatedForwardKernel {
  static constexpr int kMaxThreads = kRotatedThreads;
  template <typename Block>
  ROI_HD static void run(const Block& blk, const RotatedArgs<S>& args) {
    blk.each_thread([&](const Thread& t) { thread(t, args); });
  }
  ROI_HD static void thread(const Thread& t, const RotatedArgs<S>& args) {
    using A = typename AccOf<S>::type;
    const int64_t bins = args.oh * args.ow, C = args.channels, W = args.width;
    const int64_t groups = (bins + t.block.y - 1) / t.block.y;
    const int64_t work = args.num_rois * groups;
    for (int64_t blk = t.block_idx.x; blk < work; blk += t.grid.x) {
      const int64_t k = blk / groups;
      const int64_t bin = (blk % groups) * t.block.y + t.idx.y;
      if (bin >= bins) continue;
      S* out = args.out + (k * bins + bin) * C;
      RotatedGeometry<A> g;
      int64_t b;
      if (!live_roi(args, k, args.batch, &g, &b)) {
        for (int64_t c = t.idx.x; c < C; c += t.block.x) out[c] = Store<S>::from(A(0));
        continue;
      }
      const int64_t ph = bin / args.ow, pw = bin % args.ow;
      const A first_h = rotated_window_start(g.ah, ph), first_w = rotated_window_start(g.aw, pw);
      const S* __restrict__ img = args.feats + b * args.height * W * C;
      for (int64_t c = t.idx.x; c < C; c += t.block.x) {
        A acc = A(0);
        for (int iy = 0; iy < g.ah.count; ++iy) {
          for (int ix = 0; ix < g.aw.count; ++ix) {
            const RotatedSample<A> s = g.sample(ph, first_h, iy, pw, first_w, ix);
            if (s.dead()) continue;  // off the map or not a sample: adds nothing
            int64_t pixel[4];
            A weight[4];
            sample_taps(s, W, pixel, weight);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (weight[q] != A(0)) acc += weight[q] * to_acc(img[pixel[q] * C + c]);  // (CPU alike)
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
// gradient (x_ctr, y_ctr, w, h, angle).
template <typename S>
ROI_HD void RotatedScatterThread(const Thread& th, const RotatedArgs<S>& args, int64_t blk,
                                 double (&box)[kBoxNumbers]) {
  using A = typename AccOf<S>::type;
  const int64_t bins = args.oh * args.ow, C = args.channels, H = args.height, W = args.width;
  const bool do_features = args.do_features != 0, do_rois = args.do_rois != 0;
  // With the box gradient, one block per roi (the reduction stays in the block).
  const int64_t groups = do_rois ? 1 : (bins + th.block.y - 1) / th.block.y;
  const int64_t k = blk / groups;
  const int64_t g0 = (blk % groups) * th.block.y;
  const int64_t bin_end = do_rois ? bins : (g0 + th.block.y < bins ? g0 + th.block.y : bins);
  for (int j = 0; j < kBoxNumbers; ++j) box[j] = 0;
  RotatedGeometry<A> g;
  int64_t b;
  if (!live_roi(args, k, args.out_batch, &g, &b)) return;
  const S* __restrict__ img = args.feats + (b % args.batch) * H * W * C;
  A* dimg = args.grad + b * H * W * C;
  for (int64_t bin = g0 + th.idx.y; bin < bin_end; bin += th.block.y) {
    const int64_t ph = bin / args.ow, pw = bin % args.ow;
    const A first_h = rotated_window_start(g.ah, ph), first_w = rotated_window_start(g.aw, pw);
    const S* __restrict__ gk = args.cot + (k * bins + bin) * C;
    for (int64_t c = th.idx.x; c < C; c += th.block.x) {
      const A gv = to_acc(gk[c]);
      for (int iy = 0; iy < g.ah.count; ++iy) {
        for (int ix = 0; ix < g.aw.count; ++ix) {
          const RotatedSample<A> s = g.sample(ph, first_h, iy, pw, first_w, ix);
          if (s.dead()) continue;  // off the map or not a sample: no value, no gradient
          int64_t pixel[4];
          A weight[4];
          sample_taps(s, W, pixel, weight);
          if (do_features) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (weight[q] != A(0)) atomic_add(dimg + pixel[q] * C + c, weight[q] * gv);
            }
          }
          if (!do_rois || (s.ty.dw == A(0) && s.tx.dw == A(0))) continue;
          A d_py, d_px;
          bilinear_position_grad(s.ty, s.tx, gv, to_acc(img[pixel[0] * C + c]), to_acc(img[pixel[1] * C + c]),
                                 to_acc(img[pixel[2] * C + c]), to_acc(img[pixel[3] * C + c]), &d_py, &d_px);
          g.box_grad(s, ph, first_h, iy, pw, first_w, ix, d_py, d_px, box);
        }
      }
    }
  }
}

template <typename S>
struct RotatedScatterKernel {
  static constexpr int kMaxThreads = kRotatedThreads;
  // Shared memory: the box gradient's per-warp partial sums.
  ROI_HD static size_t shared_bytes(int threads, bool do_rois) {
    return do_rois ? box_gradient_shared_bytes(threads, kBoxNumbers) : 0;
  }
  template <typename Block>
  ROI_HD static void run(const Block& blk, const RotatedArgs<S>& args) {
    const Dim3 bd = blk.block_dim();
    const int64_t bins = args.oh * args.ow;
    const bool do_rois = args.do_rois != 0;
    const int64_t groups = do_rois ? 1 : (bins + bd.y - 1) / bd.y;
    const int64_t work = args.num_rois * groups;
    double* red = reinterpret_cast<double*>(blk.shared());
    PerThread<Block, double> v[kBoxNumbers];
    for (int64_t bi = blk.block_index().x; bi < work; bi += blk.grid_dim().x) {  // uniform over the block
      blk.each_thread([&](const Thread& t) {
        double box[kBoxNumbers];
        RotatedScatterThread<S>(t, args, bi, box);
#pragma unroll
        for (int q = 0; q < kBoxNumbers; ++q) v[q][t] = box[q];
      });
      if (do_rois) block_box_gradient(blk, v, red, args.d_rois + kRotatedRoiWidth * (bi / groups));
    }
  }
};

// ---------------------------------------------------------------------------------------
// Deterministic gather backward
// ---------------------------------------------------------------------------------------

struct RotatedTiles {
  int tile;
  int64_t tiles_y, tiles_x, chunks;
};

// One block per (image, tile, chunk of channels); a thread owns one channel. Shared memory:
// the tile's accumulators [tile*tile][nt], the roi list [nt], one int per warp for
// block_compact.
template <typename S>
struct RotatedGatherKernel {
  static constexpr int kMaxThreads = 128;
  using A = typename AccOf<S>::type;
  ROI_HD static size_t shared_bytes(int tile, int nt) {
    return sizeof(A) * tile * tile * nt + sizeof(int) * nt + sizeof(int) * (nt / kWarpSize);
  }
  template <typename Block>
  ROI_HD static void run(const Block& blk, const RotatedArgs<S>& args, const RotatedTiles& tl) {
    const int tile = tl.tile;
    const int nt = static_cast<int>(blk.block_dim().x);
    A* acc = reinterpret_cast<A*>(blk.shared());                  // [tile*tile][nt]
    int* rlist = reinterpret_cast<int*>(acc + tile * tile * nt);  // [nt]
    int* warp_sums = rlist + nt;                                  // [nt / 32]
    const int64_t K = args.num_rois, C = args.channels, bins = args.oh * args.ow;
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
        // The rois of this image whose footprint can touch the tile, in roi order.
        blk.each_thread([&](const Thread& t) {
          hit[t] = 0;
          const int64_t k = k0 + t.linear();
          if (k >= K) return;
          RotatedGeometry<A> g;
          int64_t image;
          if (!live_roi(args, k, args.out_batch, &g, &image) || image != b) return;
          int ylo, yhi, xlo, xhi;
          hit[t] = g.footprint(&ylo, &yhi, &xlo, &xhi) && ylo < r1 && yhi >= r0 && xlo < c1 && xhi >= c0;
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
          for (int i = 0; i < n; ++i) {
            const int64_t kk = rlist[i];
            RotatedGeometry<A> g;
            int64_t image;
            live_roi(args, kk, args.out_batch, &g, &image);  // listed: live, of image b
            for (int64_t bin = 0; bin < bins; ++bin) {
              const int64_t ph = bin / args.ow, pw = bin % args.ow;
              const A first_h = rotated_window_start(g.ah, ph), first_w = rotated_window_start(g.aw, pw);
              const A gv = to_acc(args.cot[(kk * bins + bin) * C + channel]);
              for (int iy = 0; iy < g.ah.count; ++iy) {
                for (int ix = 0; ix < g.aw.count; ++ix) {
                  const RotatedSample<A> s = g.sample(ph, first_h, iy, pw, first_w, ix);
                  if (s.dead()) continue;
                  const int rows[2] = {s.ty.lo, s.ty.hi}, cols[2] = {s.tx.lo, s.tx.hi};
                  const A wy[2] = {s.ty.w_lo, s.ty.w_hi}, wx[2] = {s.tx.w_lo, s.tx.w_hi};
#pragma unroll
                  for (int u = 0; u < 2; ++u) {
#pragma unroll
                    for (int v = 0; v < 2; ++v) {
                      const A w = wy[u] * wx[v];
                      if (w == A(0) || rows[u] < r0 || rows[u] >= r1 || cols[v] < c0 || cols[v] >= c1) continue;
                      acc[((rows[u] - r0) * tile + (cols[v] - c0)) * nt + tid] += w * gv;
                    }
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

// The forward and the scatter: block x over channels, y over bins, 256 threads.
template <typename S>
LaunchGeom PlanBins(const RotatedArgs<S>& args, bool one_block_per_roi) {
  const int64_t bins = args.oh * args.ow;
  const int bx = args.channels >= kRotatedThreads ? kRotatedThreads : RoundUp32(args.channels);
  int by = kRotatedThreads / bx;
  if (by > bins) by = static_cast<int>(bins);
  if (by < 1) by = 1;
  const int64_t groups = one_block_per_roi ? 1 : (bins + by - 1) / by;
  return LaunchGeom{Dim3{GridFor(args.num_rois * groups), 1, 1},
                    Dim3{static_cast<unsigned>(bx), static_cast<unsigned>(by), 1}, 0};
}

struct GatherPlan {
  LaunchGeom geom;
  RotatedTiles tiles;
};

template <typename S>
GatherPlan PlanGather(const RotatedArgs<S>& args) {
  using A = typename AccOf<S>::type;
  GatherPlan p{};
  const int64_t C = args.channels, H = args.height, W = args.width;
  const int cap = sizeof(A) == 8 ? 64 : 128;
  const int nt = C >= cap ? cap : RoundUp32(C);
  RotatedTiles& t = p.tiles;
  t.chunks = (C + nt - 1) / nt;
  // 8 x 8 tiles when there are enough of them to fill the GPU, else 4 x 4.
  const int64_t blocks8 = args.out_batch * ((H + 7) / 8) * ((W + 7) / 8) * t.chunks;
  t.tile = blocks8 >= 1024 ? 8 : 4;
  t.tiles_y = (H + t.tile - 1) / t.tile;
  t.tiles_x = (W + t.tile - 1) / t.tile;
  p.geom = LaunchGeom{Dim3{GridFor(args.out_batch * t.tiles_y * t.tiles_x * t.chunks), 1, 1},
                      Dim3{static_cast<unsigned>(nt), 1, 1}, RotatedGatherKernel<S>::shared_bytes(t.tile, nt)};
  return p;
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

ffi::Error Decode(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, double scale,
                  int64_t sampling_ratio, ffi::DataType* dtype, int64_t* num_rois) {
  if (auto err = CheckSamplingRatio(op, sampling_ratio); err.failure()) return err;
  if (auto err = CheckSingleMap(op, features, scale, dtype); err.failure()) return err;
  return CheckRois(rois, *dtype, op, num_rois, kRotatedRoiWidth);
}

template <typename S>
RotatedArgs<S> MakeArgs(const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, int64_t num_rois,
                        const ffi::AnyBuffer& per_bin, double scale, int64_t sampling_ratio, int64_t aligned) {
  auto fd = features.dimensions();
  RotatedArgs<S> a{};
  a.rois = static_cast<const typename AccOf<S>::type*>(rois.untyped_data());
  a.feats = static_cast<const S*>(features.untyped_data());
  a.num_rois = num_rois;
  a.channels = fd[3];
  a.oh = per_bin.dimensions()[1];
  a.ow = per_bin.dimensions()[2];
  a.batch = fd[0];
  a.out_batch = fd[0];
  a.height = fd[1];
  a.width = fd[2];
  a.scale = scale;
  a.sampling_ratio = sampling_ratio;
  a.aligned = aligned != 0 ? 1 : 0;
  return a;
}

ffi::Error RoiAlignRotatedForwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                      ffi::Result<ffi::AnyBuffer> out, double spatial_scale, int64_t sampling_ratio,
                                      int64_t aligned) {
  const char* op = "jax_roi roi_align_rotated forward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  ffi::DataType dtype;
  int64_t K;
  if (auto err = Decode(op, rois, features, spatial_scale, sampling_ratio, &dtype, &K); err.failure()) return err;
  const int64_t C = features.dimensions()[3];
  if (auto err = CheckCotangent(op, *out, K, C, dtype, "output"); err.failure()) return err;
  if (K == 0 || C == 0) return ffi::Error::Success();
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    RotatedArgs<S> args = MakeArgs<S>(rois, features, K, *out, spatial_scale, sampling_ratio, aligned);
    args.out = static_cast<S*>(out->untyped_data());
    exec.template launch<RotatedForwardKernel<S>>(PlanBins(args, false), args);
  });
  return exec.status(op);
}

ffi::Error RoiAlignRotatedBackwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                       ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_rois,
                                       ffi::Result<ffi::AnyBuffer> d_features, double spatial_scale,
                                       int64_t sampling_ratio, int64_t aligned, int64_t rois_grad,
                                       int64_t deterministic) {
  const char* op = "jax_roi roi_align_rotated backward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  ffi::DataType dtype;
  int64_t K;
  if (auto err = Decode(op, rois, features, spatial_scale, sampling_ratio, &dtype, &K); err.failure()) return err;
  auto fd = features.dimensions();
  const int64_t B = fd[0], H = fd[1], W = fd[2], C = fd[3];
  if (auto err = CheckCotangent(op, cot, K, C, dtype); err.failure()) return err;
  const ffi::DataType ctype = CoordType(dtype);
  if (auto err = CheckShape(*d_rois, {K, kRotatedRoiWidth}, ctype, std::string(op) + ": d_rois"); err.failure()) {
    return err;
  }
  int64_t out_batch;
  if (auto err = CheckFeatureGradient(op, *d_features, fd, ctype, &out_batch); err.failure()) return err;
  const bool det = deterministic != 0;
  if (det && K > kMaxDeterministicRois) {
    return Invalid(std::string(op) + ": deterministic: expected at most " + std::to_string(kMaxDeterministicRois) +
                   " rois, got " + std::to_string(K));
  }
  // Outputs initialised on the stream: d_rois always (rows of dead rois stay zero unless the
  // box-gradient kernel writes them); d_features unless the gather kernel writes them all.
  if (auto err = exec.zero(op, d_rois->untyped_data(), d_rois->size_bytes()); err.failure()) return err;
  const bool trivial = K == 0 || C == 0 || B <= 0 || H <= 0 || W <= 0;
  if (!det || trivial) {
    if (auto err = exec.zero(op, d_features->untyped_data(), d_features->size_bytes()); err.failure()) return err;
  }
  if (trivial) return ffi::Error::Success();
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    RotatedArgs<S> args = MakeArgs<S>(rois, features, K, cot, spatial_scale, sampling_ratio, aligned);
    args.cot = static_cast<const S*>(cot.untyped_data());
    args.grad = static_cast<typename AccOf<S>::type*>(d_features->untyped_data());
    args.d_rois = static_cast<typename AccOf<S>::type*>(d_rois->untyped_data());
    args.out_batch = out_batch;
    args.do_features = det ? 0 : 1;
    args.do_rois = rois_grad != 0 ? 1 : 0;
    if (args.do_features || args.do_rois) {
      LaunchGeom geom = PlanBins(args, args.do_rois != 0);
      geom.shared_bytes =
          RotatedScatterKernel<S>::shared_bytes(static_cast<int>(geom.block.x * geom.block.y), args.do_rois != 0);
      exec.template launch<RotatedScatterKernel<S>>(geom, args);
    }
    if (det) {
      const GatherPlan p = PlanGather(args);
      exec.template launch<RotatedGatherKernel<S>>(p.geom, args, p.tiles);
    }
  });
  return exec.status(op);
}

}  // namespace
}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiAlignRotatedForward),
                              jax_roi::JAX_ROI_CUDA_NS::RoiAlignRotatedForwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 6]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C]
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("aligned"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiAlignRotatedBackward),
                              jax_roi::JAX_ROI_CUDA_NS::RoiAlignRotatedBackwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 6]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // d_rois [K, 6]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("aligned")
                                  .Attr<int64_t>("rois_grad")
                                  .Attr<int64_t>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});
