// RoIAlign (avg / max), RoIWarp and multi-level RoIAlign on CUDA: the forward and backward
// kernels and their XLA FFI handlers.
//
// NHWC: features [B, H_l, W_l, C] per level, rois [K, 5], output [K, oh, ow, C]. A thread
// owns V neighbouring channels (one 16-byte vector when C % V == 0, else one channel) of one
// output bin, so the lanes of a warp read neighbouring channels of the same tap: each tap is
// one coalesced load. Block: x over channel vectors, y over the bins of one roi. The
// per-sample geometry is common/roi_math.h's, the same functions the CPU kernels call.
//
// Forward: one thread per (bin, channel vector); every output element is written.
// Feature gradient, two ways:
// * default (deterministic == 0): scatter with atomicAdd (float4 atomics on sm_90). One
//   block per (roi, group of bins); a thread owns V neighbouring channels.
// * deterministic != 0: a gather over feature tiles. One block per (image, tile of T x T
//   cells, chunk of channels); it lists, in roi order, the rois whose samples can touch the
//   tile, and each thread (one channel) adds their contributions into a shared-memory tile
//   in a fixed order (roi, then y sample, then x sample), then writes the tile once. No
//   atomics, every d_features element written exactly once: bitwise reproducible.
// Box gradient (rois_grad): reduced over channels and samples inside the block (one block
// per roi, warp shuffles, then warps in order): deterministic in both modes. In the
// deterministic mode it runs as the atomic kernel with the feature scatter switched off.
//
// Each kernel is a struct whose ROI_HD run() body takes its thread indices from the Block
// (cuda/device_ops.h); the kernels with barriers are written as phases. PlanForward,
// PlanScatter and PlanGather compute the launch geometry for both executors. The host
// compiler builds this file too (cuda/emulated_roi_align.cc) and runs the same bodies for
// the emulated targets.
//
// The same operands and attributes as the CPU handlers (cpu/roi_align.cc), plus
// `deterministic` (int64) on the backward.
#include <string>
#include <vector>

#include "cuda/common.cuh"

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {
namespace {

// =======================================================================================
// Forward
// =======================================================================================

template <typename S>
struct AlignFwdArgs {
  const typename AccOf<S>::type* rois;
  const int32_t* level;
  S* out;
  AlignAttrs at;
  Levels lv;
};

// Grid-stride over (roi, group of t.block.y bins).
template <typename S, int V, bool kMax>
ROI_HD void AlignForwardThread(const Thread& t, const AlignFwdArgs<S>& args) {
  using A = typename AccOf<S>::type;
  const AlignAttrs& at = args.at;
  const int64_t bins = at.oh * at.ow;
  const int64_t C = at.channels;
  const int64_t CV = C / V;
  const int64_t groups = (bins + t.block.y - 1) / t.block.y;
  const int64_t work = at.num_rois * groups;
  for (int64_t blk = t.block_idx.x; blk < work; blk += t.grid.x) {
    const int64_t k = blk / groups;
    const int64_t bin = (blk % groups) * t.block.y + t.idx.y;
    if (bin >= bins) continue;
    const int64_t ph = bin / at.ow, pw = bin % at.ow;
    S* out = args.out + (k * bins + bin) * C;
    const AlignRoi<A> r = resolve_align<A>(args.lv, at, args.rois, args.level, k, args.lv.batch, !kMax);
    if (!r.live) {
      A zero[V];
#pragma unroll
      for (int j = 0; j < V; ++j) zero[j] = A(0);
      for (int64_t cv = t.idx.x; cv < CV; cv += t.block.x) store_vec<S, V>(out + cv * V, zero);
      continue;
    }
    const int64_t H = r.H, W = r.W;
    const S* __restrict__ img = static_cast<const S*>(args.lv.data[r.l]) + r.b * H * W * C;
    const A y0 = window_start(r.gy, ph), x0 = window_start(r.gx, pw);  // first visited samples
    for (int64_t cv = t.idx.x; cv < CV; cv += t.block.x) {
      const int64_t c = cv * V;
      A acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = kMax ? neg_infinity<A>() : A(0);
      for (int iy = 0; iy < r.cy; ++iy) {
        const Tap<A> a = bilinear_tap(sample_position(r.gy, ph, y0, iy), H, true, r.ny);
        if (!kMax && a.w_lo == A(0) && a.w_hi == A(0)) continue;  // invalid sample: adds nothing
        const int64_t row_lo = static_cast<int64_t>(a.lo) * W, row_hi = static_cast<int64_t>(a.hi) * W;
        for (int ix = 0; ix < r.cx; ++ix) {
          const Tap<A> e = bilinear_tap(sample_position(r.gx, pw, x0, ix), W, true, r.nx);
          const A w_ll = a.w_lo * e.w_lo, w_lh = a.w_lo * e.w_hi;
          const A w_hl = a.w_hi * e.w_lo, w_hh = a.w_hi * e.w_hi;
          if constexpr (kMax) {
            // v = w_ll*f_ll + w_lh*f_lh + w_hl*f_hl + w_hh*f_hh in this order, every term
            // (an invalid sample has zero weights: its value is 0), strict > (CPU: sample_max).
            A f_ll[V], f_lh[V], f_hl[V], f_hh[V];
            load_vec<S, V>(img + (row_lo + e.lo) * C + c, f_ll);
            load_vec<S, V>(img + (row_lo + e.hi) * C + c, f_lh);
            load_vec<S, V>(img + (row_hi + e.lo) * C + c, f_hl);
            load_vec<S, V>(img + (row_hi + e.hi) * C + c, f_hh);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              A v = w_ll * f_ll[j];
              v = v + w_lh * f_lh[j];
              v = v + w_hl * f_hl[j];
              v = v + w_hh * f_hh[j];
              if (v > acc[j]) acc[j] = v;
            }
          } else {
            // Taps of weight 0 are skipped (CPU: merged taps drop zero weights).
            A f[V];
            if (w_ll != A(0)) {
              load_vec<S, V>(img + (row_lo + e.lo) * C + c, f);
#pragma unroll
              for (int j = 0; j < V; ++j) acc[j] += w_ll * f[j];
            }
            if (w_lh != A(0)) {
              load_vec<S, V>(img + (row_lo + e.hi) * C + c, f);
#pragma unroll
              for (int j = 0; j < V; ++j) acc[j] += w_lh * f[j];
            }
            if (w_hl != A(0)) {
              load_vec<S, V>(img + (row_hi + e.lo) * C + c, f);
#pragma unroll
              for (int j = 0; j < V; ++j) acc[j] += w_hl * f[j];
            }
            if (w_hh != A(0)) {
              load_vec<S, V>(img + (row_hi + e.hi) * C + c, f);
#pragma unroll
              for (int j = 0; j < V; ++j) acc[j] += w_hh * f[j];
            }
          }
        }
      }
      if constexpr (kMax) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = acc[j] == neg_infinity<A>() ? A(0) : acc[j];
      }
      store_vec<S, V>(out + c, acc);
    }
  }
}

constexpr int kFwdThreads = 256;

template <typename S, int V, bool kMax>
struct AlignForwardKernel {
  static constexpr int kMaxThreads = kFwdThreads;
  template <typename Block>
  ROI_HD static void run(const Block& blk, const AlignFwdArgs<S>& args) {
    blk.each_thread([&](const Thread& t) { AlignForwardThread<S, V, kMax>(t, args); });
  }
};

// Launch geometry (the CUDA launch and the host runner both use it): block x over channel
// vectors, y over bins, 256 threads.
struct AlignFwdPlan {
  int vec;  // channels per thread: VecWidth<S>() when C is a multiple of it, else 1
  LaunchGeom geom;
};

template <typename S>
AlignFwdPlan PlanForward(const AlignAttrs& at) {
  AlignFwdPlan p{};
  p.vec = at.channels % VecWidth<S>() == 0 ? VecWidth<S>() : 1;
  const int64_t CV = at.channels / p.vec;
  const int64_t bins = at.oh * at.ow;
  const int bx = CV >= kFwdThreads ? kFwdThreads : RoundUp32(CV);
  int by = kFwdThreads / bx;
  if (by > bins) by = static_cast<int>(bins);
  if (by < 1) by = 1;
  const int64_t groups = (bins + by - 1) / by;
  p.geom = LaunchGeom{Dim3{GridFor(at.num_rois * groups), 1, 1},
                      Dim3{static_cast<unsigned>(bx), static_cast<unsigned>(by), 1}, 0};
  return p;
}

template <typename S, typename Exec>
void LaunchForward(Exec& exec, const AlignFwdArgs<S>& args, bool use_max) {
  constexpr int kV = VecWidth<S>();
  const AlignFwdPlan p = PlanForward<S>(args.at);
  const bool vec = p.vec == kV;
  if (use_max && vec) {
    exec.template launch<AlignForwardKernel<S, kV, true>>(p.geom, args);
  } else if (use_max) {
    exec.template launch<AlignForwardKernel<S, 1, true>>(p.geom, args);
  } else if (vec) {
    exec.template launch<AlignForwardKernel<S, kV, false>>(p.geom, args);
  } else {
    exec.template launch<AlignForwardKernel<S, 1, false>>(p.geom, args);
  }
}

ffi::Error RoiAlignForwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer rois, ffi::AnyBuffer level,
                                   ffi::RemainingArgs feats, ffi::Result<ffi::AnyBuffer> out,
                                   ffi::Span<const double> scales, int64_t sampling_ratio, int64_t aligned,
                                   int64_t reduction, int64_t quantize) {
  const char* op = "jax_roi roi_align forward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  AlignAttrs at{};
  Levels lv{};
  ffi::DataType dtype;
  if (auto err = DecodeAlign(op, rois, level, feats, scales, sampling_ratio, aligned, reduction, quantize, &dtype,
                             &at, &lv);
      err.failure()) {
    return err;
  }
  auto od = out->dimensions();
  if (od.size() != 4 || od[0] != at.num_rois || od[1] < 1 || od[2] < 1 || od[3] != at.channels) {
    return Invalid(std::string(op) + ": output: expected shape [K=" + std::to_string(at.num_rois) +
                   ", oh >= 1, ow >= 1, C=" + std::to_string(at.channels) + "], got " + ShapeString(od));
  }
  if (out->element_type() != dtype) {
    return Invalid(std::string(op) + ": output: expected dtype " + DtypeName(dtype) + ", got " +
                   DtypeName(out->element_type()));
  }
  at.oh = od[1];
  at.ow = od[2];
  if (at.num_rois == 0 || at.channels == 0) return ffi::Error::Success();
  // Every output element is written by the kernel (zeros for dead rois).
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    AlignFwdArgs<S> args;
    args.rois = static_cast<const typename AccOf<S>::type*>(rois.untyped_data());
    args.level = static_cast<const int32_t*>(level.untyped_data());
    args.out = static_cast<S*>(out->untyped_data());
    args.at = at;
    args.lv = lv;
    LaunchForward<S>(exec, args, reduction == 1);
  });
  return exec.status(op);
}

// =======================================================================================
// Backward
// =======================================================================================

template <typename S>
struct AlignBwdArgs {
  const typename AccOf<S>::type* rois;
  const int32_t* level;
  const S* cot;                        // [K, oh, ow, C]
  typename AccOf<S>::type* d_rois;     // [K, 5]
  AlignAttrs at;
  Levels lv;                           // grad[l]: d_features [out_batch, H_l, W_l, C] in A
  int do_features, do_rois;
};

// ---------------------------------------------------------------------------------------
// Scatter (atomic) kernel; also the box gradient of both modes.
// ---------------------------------------------------------------------------------------

constexpr int kBwdThreads = 256;

// One thread's share of block-iteration `blk` of the grid-stride loop: its feature
// scatter, and its partial box gradient s = {x1, y1, x2, y2}.
template <typename S, int V, bool kMax>
ROI_HD void AlignBackwardThread(const Thread& th, const AlignBwdArgs<S>& args, int64_t blk, double (&s)[4]) {
  using A = typename AccOf<S>::type;
  const AlignAttrs& at = args.at;
  const Levels& lv = args.lv;
  const int64_t oh = at.oh, ow = at.ow, bins = oh * ow;
  const int64_t C = at.channels, CV = C / V;
  const bool do_features = args.do_features != 0, do_rois = args.do_rois != 0;
  // With the box gradient, one block per roi (the reduction stays in the block).
  const int64_t groups = do_rois ? 1 : (bins + th.block.y - 1) / th.block.y;
  {  // the body of one iteration of the grid-stride loop
    const int64_t k = blk / groups;
    const int64_t g0 = (blk % groups) * th.block.y;
    const int64_t bin_end = do_rois ? bins : (g0 + th.block.y < bins ? g0 + th.block.y : bins);
    double s_x1 = 0, s_y1 = 0, s_x2 = 0, s_y2 = 0;
    const AlignRoi<A> r = resolve_align<A>(lv, at, args.rois, args.level, k, lv.out_batch, !kMax);
    if (r.live) {
      const int64_t H = r.H, W = r.W;
      const S* __restrict__ img = static_cast<const S*>(lv.data[r.l]) + (r.b % lv.batch) * H * W * C;
      A* dimg = static_cast<A*>(lv.grad[r.l]) + r.b * H * W * C;
      for (int64_t bin = g0 + th.idx.y; bin < bin_end; bin += th.block.y) {
        const int64_t ph = bin / ow, pw = bin % ow;
        const A y0 = window_start(r.gy, ph), x0 = window_start(r.gx, pw);  // first visited samples
        const S* __restrict__ gk = args.cot + (k * bins + bin) * C;
        for (int64_t cv = th.idx.x; cv < CV; cv += th.block.x) {
          const int64_t c = cv * V;
          A g[V];
          load_vec<S, V>(gk + c, g);
          if constexpr (!kMax) {
            for (int iy = 0; iy < r.cy; ++iy) {
              const Tap<A> a = bilinear_tap(sample_position(r.gy, ph, y0, iy), H, true, r.ny);
              if (a.w_lo == A(0) && a.w_hi == A(0)) continue;  // invalid sample: no value, no gradient
              const int64_t row_lo = static_cast<int64_t>(a.lo) * W, row_hi = static_cast<int64_t>(a.hi) * W;
              for (int ix = 0; ix < r.cx; ++ix) {
                const Tap<A> e = bilinear_tap(sample_position(r.gx, pw, x0, ix), W, true, r.nx);
                if (e.w_lo == A(0) && e.w_hi == A(0)) continue;
                const int64_t o_ll = (row_lo + e.lo) * C + c, o_lh = (row_lo + e.hi) * C + c;
                const int64_t o_hl = (row_hi + e.lo) * C + c, o_hh = (row_hi + e.hi) * C + c;
                if (do_features) {
                  // d += (wy*wx) * g for each tap of non-zero weight (CPU: ScatterAxpy).
                  const A w4[4] = {a.w_lo * e.w_lo, a.w_lo * e.w_hi, a.w_hi * e.w_lo, a.w_hi * e.w_hi};
                  const int64_t o4[4] = {o_ll, o_lh, o_hl, o_hh};
#pragma unroll
                  for (int t = 0; t < 4; ++t) {
                    if (w4[t] == A(0)) continue;
                    A v[V];
#pragma unroll
                    for (int j = 0; j < V; ++j) v[j] = w4[t] * g[j];
                    atomic_add_vec<V>(dimg + o4[t], v);
                  }
                }
                if (do_rois && !(a.dw == A(0) && e.dw == A(0))) {
                  A f_ll[V], f_lh[V], f_hl[V], f_hh[V];
                  load_vec<S, V>(img + o_ll, f_ll);
                  load_vec<S, V>(img + o_lh, f_lh);
                  load_vec<S, V>(img + o_hl, f_hl);
                  load_vec<S, V>(img + o_hh, f_hh);
                  A d_ll = A(0), d_lh = A(0), d_hl = A(0), d_hh = A(0);  // <g, f_tap> over my channels
#pragma unroll
                  for (int j = 0; j < V; ++j) {
                    d_ll += g[j] * f_ll[j];
                    d_lh += g[j] * f_lh[j];
                    d_hl += g[j] * f_hl[j];
                    d_hh += g[j] * f_hh[j];
                  }
                  A sy, sx;
                  bilinear_position_grad(a, e, A(1), d_ll, d_lh, d_hl, d_hh, &sy, &sx);
                  A y1, y2, x1, x2;
                  sample_position_grad(r.gy, ph, y0, iy, oh, &y1, &y2);
                  sample_position_grad(r.gx, pw, x0, ix, ow, &x1, &x2);
                  s_y1 += static_cast<double>(sy) * static_cast<double>(y1);
                  s_y2 += static_cast<double>(sy) * static_cast<double>(y2);
                  s_x1 += static_cast<double>(sx) * static_cast<double>(x1);
                  s_x2 += static_cast<double>(sx) * static_cast<double>(x2);
                }
              }
            }
          } else {
            // The winning sample of each channel (first in (iy, ix) order: strict >), as
            // the forward computes it (CPU: SampleMaxArg).
            A best[V];
            int arg[V];
#pragma unroll
            for (int j = 0; j < V; ++j) {
              best[j] = neg_infinity<A>();
              arg[j] = -1;
            }
            for (int iy = 0; iy < r.cy; ++iy) {
              const Tap<A> a = bilinear_tap(sample_position(r.gy, ph, y0, iy), H, true, r.ny);
              const int64_t row_lo = static_cast<int64_t>(a.lo) * W, row_hi = static_cast<int64_t>(a.hi) * W;
              for (int ix = 0; ix < r.cx; ++ix) {
                const Tap<A> e = bilinear_tap(sample_position(r.gx, pw, x0, ix), W, true, r.nx);
                const A w_ll = a.w_lo * e.w_lo, w_lh = a.w_lo * e.w_hi;
                const A w_hl = a.w_hi * e.w_lo, w_hh = a.w_hi * e.w_hi;
                A f_ll[V], f_lh[V], f_hl[V], f_hh[V];
                load_vec<S, V>(img + (row_lo + e.lo) * C + c, f_ll);
                load_vec<S, V>(img + (row_lo + e.hi) * C + c, f_lh);
                load_vec<S, V>(img + (row_hi + e.lo) * C + c, f_hl);
                load_vec<S, V>(img + (row_hi + e.hi) * C + c, f_hh);
                const int sample = iy * r.cx + ix;
#pragma unroll
                for (int j = 0; j < V; ++j) {
                  A v = w_ll * f_ll[j];
                  v = v + w_lh * f_lh[j];
                  v = v + w_hl * f_hl[j];
                  v = v + w_hh * f_hh[j];
                  if (v > best[j]) {
                    best[j] = v;
                    arg[j] = sample;
                  }
                }
              }
            }
#pragma unroll
            for (int j = 0; j < V; ++j) {
              if (arg[j] < 0) continue;
              const int iy = arg[j] / r.cx, ix = arg[j] % r.cx;
              const Tap<A> a = bilinear_tap(sample_position(r.gy, ph, y0, iy), H, true, r.ny);
              const Tap<A> e = bilinear_tap(sample_position(r.gx, pw, x0, ix), W, true, r.nx);
              const A gc = g[j];
              const int64_t o_ll = (static_cast<int64_t>(a.lo) * W + e.lo) * C + c + j;
              const int64_t o_lh = (static_cast<int64_t>(a.lo) * W + e.hi) * C + c + j;
              const int64_t o_hl = (static_cast<int64_t>(a.hi) * W + e.lo) * C + c + j;
              const int64_t o_hh = (static_cast<int64_t>(a.hi) * W + e.hi) * C + c + j;
              if (do_features) {  // all four taps, as the CPU kernel
                atomic_add(dimg + o_ll, gc * (a.w_lo * e.w_lo));
                atomic_add(dimg + o_lh, gc * (a.w_lo * e.w_hi));
                atomic_add(dimg + o_hl, gc * (a.w_hi * e.w_lo));
                atomic_add(dimg + o_hh, gc * (a.w_hi * e.w_hi));
              }
              if (do_rois) {
                const A f_ll = to_acc(img[o_ll]), f_lh = to_acc(img[o_lh]);
                const A f_hl = to_acc(img[o_hl]), f_hh = to_acc(img[o_hh]);
                A sy, sx;
                bilinear_position_grad(a, e, gc, f_ll, f_lh, f_hl, f_hh, &sy, &sx);
                A y1, y2, x1, x2;
                sample_position_grad(r.gy, ph, y0, iy, oh, &y1, &y2);
                sample_position_grad(r.gx, pw, x0, ix, ow, &x1, &x2);
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
}

template <typename S, int V, bool kMax>
struct AlignBackwardKernel {
  static constexpr int kMaxThreads = kBwdThreads;
  // Shared memory: the box gradient's per-warp partial sums, [4][warps].
  ROI_HD static size_t shared_bytes(int threads, bool do_rois) {
    return do_rois ? box_gradient_shared_bytes(threads) : 0;
  }
  template <typename Block>
  ROI_HD static void run(const Block& blk, const AlignBwdArgs<S>& args) {
    const Dim3 bd = blk.block_dim();
    const int64_t bins = args.at.oh * args.at.ow;
    const bool do_rois = args.do_rois != 0;
    const int64_t groups = do_rois ? 1 : (bins + bd.y - 1) / bd.y;
    const int64_t work = args.at.num_rois * groups;
    double* red = reinterpret_cast<double*>(blk.shared());  // [4][warps]
    PerThread<Block, double> v[4];
    for (int64_t bi = blk.block_index().x; bi < work; bi += blk.grid_dim().x) {  // uniform over the block
      blk.each_thread([&](const Thread& t) {
        double s[4];
        AlignBackwardThread<S, V, kMax>(t, args, bi, s);
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q][t] = s[q];
      });
      if (!do_rois) continue;
      block_box_gradient(blk, v, red, args.d_rois + 5 * (bi / groups));
    }
  }
};

// ---------------------------------------------------------------------------------------
// Deterministic gather kernel (one level per launch).
// ---------------------------------------------------------------------------------------

// A y (or x) sample whose taps touch the tile: its bin, its two taps relative to the tile
// (-1 when outside it, or of weight 0) and their weights.
template <typename A>
struct TileSample {
  int bin, lo, hi;
  A w_lo, w_hi;
};

template <typename A>
ROI_HDI bool tile_sample(const AxisGeom<A>& g, int count, int64_t s, int64_t size, A norm,
                                            int t0, int t1, TileSample<A>* out) {
  const int64_t p = s / count;
  const int i = static_cast<int>(s % count);
  const Tap<A> a = bilinear_tap(sample_position(g, p, window_start(g, p), i), size, true, norm);
  const bool lo_in = a.w_lo != A(0) && a.lo >= t0 && a.lo < t1;
  const bool hi_in = a.w_hi != A(0) && a.hi >= t0 && a.hi < t1;
  out->bin = static_cast<int>(p);
  out->lo = lo_in ? a.lo - t0 : -1;
  out->hi = hi_in ? a.hi - t0 : -1;
  out->w_lo = a.w_lo;
  out->w_hi = a.w_hi;
  return lo_in || hi_in;
}

// Whether any tap of any sample of bin p lies in [t0, t1) (any weight: the max gradient
// goes to all four taps of the winner, as the CPU kernel).
template <typename A>
ROI_HDI bool bin_touches(const AxisGeom<A>& g, int count, int64_t p, int64_t size, A norm, int t0,
                                            int t1) {
  const A i0 = window_start(g, p);
  for (int i = 0; i < count; ++i) {
    const Tap<A> a = bilinear_tap(sample_position(g, p, i0, i), size, true, norm);
    if ((a.lo >= t0 && a.lo < t1) || (a.hi >= t0 && a.hi < t1)) return true;
  }
  return false;
}

// The deterministic gather's tiling of one level (PlanGather).
struct GatherTiles {
  int l, tile;
  int64_t tiles_y, tiles_x, chunks;
};

// One block per (image, tile, channel chunk) of level l; a thread owns one channel. Phases
// separated by the block's barriers (cuda/device_ops.h). Shared memory: the tile's
// accumulators [tile*tile][nt], the y and x sample lists [nt] each, the roi list [nt], one
// int per warp for block_compact.
template <typename S, bool kMax>
struct AlignGatherKernel {
  static constexpr int kMaxThreads = 128;
  using A = typename AccOf<S>::type;
  ROI_HD static size_t shared_bytes(int tile, int nt) {
    return sizeof(A) * tile * tile * nt + 2 * sizeof(TileSample<A>) * nt + sizeof(int) * nt +
           sizeof(int) * (nt / kWarpSize);
  }
  template <typename Block>
  ROI_HD static void run(const Block& blk, const AlignBwdArgs<S>& args, const GatherTiles& gt) {
    const int l = gt.l, tile = gt.tile;
    const int nt = static_cast<int>(blk.block_dim().x);
    A* acc = reinterpret_cast<A*>(blk.shared());                                     // [tile*tile][nt]
    TileSample<A>* ylist = reinterpret_cast<TileSample<A>*>(acc + tile * tile * nt);  // [nt]
    TileSample<A>* xlist = ylist + nt;                                               // [nt]
    int* rlist = reinterpret_cast<int*>(xlist + nt);                                 // [nt]
    int* warp_sums = rlist + nt;                                                     // [nt / 32]

    const AlignAttrs& at = args.at;
    const Levels& lv = args.lv;
    const int64_t K = at.num_rois, C = at.channels, oh = at.oh, ow = at.ow, bins = oh * ow;
    const int64_t H = lv.height[l], W = lv.width[l];
    const int64_t work = lv.out_batch * gt.tiles_y * gt.tiles_x * gt.chunks;
    A* grad = static_cast<A*>(lv.grad[l]);
    PerThread<Block, int> flag, pos;
    PerThread<Block, TileSample<A>> sample;
    for (int64_t bi = blk.block_index().x; bi < work; bi += blk.grid_dim().x) {  // uniform over the block
      int64_t q = bi;
      const int64_t chunk = q % gt.chunks;
      q /= gt.chunks;
      const int64_t tx = q % gt.tiles_x;
      q /= gt.tiles_x;
      const int64_t ty = q % gt.tiles_y;
      const int64_t b = q / gt.tiles_y;
      const int r0 = static_cast<int>(ty * tile), r1 = static_cast<int>(ty * tile + tile < H ? ty * tile + tile : H);
      const int c0 = static_cast<int>(tx * tile), c1 = static_cast<int>(tx * tile + tile < W ? tx * tile + tile : W);
      const S* __restrict__ img = static_cast<const S*>(lv.data[l]) + (b % lv.batch) * H * W * C;
      blk.each_thread([&](const Thread& t) {
        const int tid = t.linear();
        for (int e = 0; e < tile * tile; ++e) acc[e * nt + tid] = A(0);
      });

      for (int64_t k0 = 0; k0 < K; k0 += nt) {
        // The rois of this image and level whose samples can touch the tile, in roi order.
        blk.each_thread([&](const Thread& t) {
          flag[t] = 0;
          const int64_t k = k0 + t.linear();
          if (k >= K) return;
          const AlignRoi<A> r = resolve_align<A>(lv, at, args.rois, args.level, k, lv.out_batch, !kMax);
          if (r.live && r.l == l && r.b == b) {
            int ylo, yhi, xlo, xhi;
            flag[t] = axis_footprint(r.gy, r.cy, oh, H, &ylo, &yhi) && axis_footprint(r.gx, r.cx, ow, W, &xlo, &xhi) &&
                      ylo < r1 && yhi >= r0 && xlo < c1 && xhi >= c0;
          }
        });
        const int n = block_compact(blk, flag, pos, warp_sums);
        blk.each_thread([&](const Thread& t) {
          if (flag[t]) rlist[pos[t]] = static_cast<int>(k0 + t.linear());
        });
        blk.sync();
        for (int i = 0; i < n; ++i) {
          const int64_t kk = rlist[i];
          const AlignRoi<A> r = resolve_align<A>(lv, at, args.rois, args.level, kk, lv.out_batch, !kMax);
          if constexpr (!kMax) {
            // The roi's y samples touching the tile, then its x samples, compacted in order;
            // every pair adds g * (wy * wx) to the taps inside the tile.
            const int64_t ny = oh * r.cy, nx = ow * r.cx;
            for (int64_t ys = 0; ys < ny; ys += nt) {
              blk.each_thread([&](const Thread& t) {
                const int64_t y = ys + t.linear();
                flag[t] = y < ny && tile_sample(r.gy, r.cy, y, H, r.ny, r0, r1, &sample[t]);
              });
              const int nyc = block_compact(blk, flag, pos, warp_sums);
              blk.each_thread([&](const Thread& t) {
                if (flag[t]) ylist[pos[t]] = sample[t];
              });
              blk.sync();
              if (nyc > 0) {
                for (int64_t xs = 0; xs < nx; xs += nt) {
                  blk.each_thread([&](const Thread& t) {
                    const int64_t x = xs + t.linear();
                    flag[t] = x < nx && tile_sample(r.gx, r.cx, x, W, r.nx, c0, c1, &sample[t]);
                  });
                  const int nxc = block_compact(blk, flag, pos, warp_sums);
                  blk.each_thread([&](const Thread& t) {
                    if (flag[t]) xlist[pos[t]] = sample[t];
                  });
                  blk.sync();
                  blk.each_thread([&](const Thread& t) {
                    const int tid = t.linear();
                    const int64_t c = chunk * nt + tid;
                    const bool cok = c < C;
                    const S* __restrict__ gk = args.cot + kk * bins * C + c;
                    if (cok) {
                      for (int yi = 0; yi < nyc; ++yi) {
                        const TileSample<A> sy = ylist[yi];
                        for (int xi = 0; xi < nxc; ++xi) {
                          const TileSample<A> sx = xlist[xi];
                          const A gv = to_acc(gk[(static_cast<int64_t>(sy.bin) * ow + sx.bin) * C]);
                          if (sy.lo >= 0) {
                            if (sx.lo >= 0) acc[(sy.lo * tile + sx.lo) * nt + tid] += (sy.w_lo * sx.w_lo) * gv;
                            if (sx.hi >= 0) acc[(sy.lo * tile + sx.hi) * nt + tid] += (sy.w_lo * sx.w_hi) * gv;
                          }
                          if (sy.hi >= 0) {
                            if (sx.lo >= 0) acc[(sy.hi * tile + sx.lo) * nt + tid] += (sy.w_hi * sx.w_lo) * gv;
                            if (sx.hi >= 0) acc[(sy.hi * tile + sx.hi) * nt + tid] += (sy.w_hi * sx.w_hi) * gv;
                          }
                        }
                      }
                    }
                  });
                  blk.sync();  // xlist and warp_sums are rewritten next
                }
              }
              blk.sync();  // ylist and warp_sums are rewritten next
            }
          } else {
            // Max: for each bin with a tap in the tile, the winning sample of my channel, and
            // its taps inside the tile. No shared lists: no barriers in here.
            blk.each_thread([&](const Thread& t) {
              const int tid = t.linear();
              const int64_t c = chunk * nt + tid;
              const bool cok = c < C;
              const S* __restrict__ gk = args.cot + kk * bins * C + c;
            if (cok) {
              const int64_t Hh = r.H, Ww = r.W;
              for (int64_t ph = 0; ph < oh; ++ph) {
                if (!bin_touches(r.gy, r.cy, ph, Hh, r.ny, r0, r1)) continue;
                const A y0 = window_start(r.gy, ph);
                for (int64_t pw = 0; pw < ow; ++pw) {
                  if (!bin_touches(r.gx, r.cx, pw, Ww, r.nx, c0, c1)) continue;
                  const A x0 = window_start(r.gx, pw);
                  A best = neg_infinity<A>();
                  int arg = -1;
                  for (int iy = 0; iy < r.cy; ++iy) {
                    const Tap<A> a = bilinear_tap(sample_position(r.gy, ph, y0, iy), Hh, true, r.ny);
                    for (int ix = 0; ix < r.cx; ++ix) {
                      const Tap<A> e = bilinear_tap(sample_position(r.gx, pw, x0, ix), Ww, true, r.nx);
                      A v = (a.w_lo * e.w_lo) * to_acc(img[(static_cast<int64_t>(a.lo) * Ww + e.lo) * C + c]);
                      v = v + (a.w_lo * e.w_hi) * to_acc(img[(static_cast<int64_t>(a.lo) * Ww + e.hi) * C + c]);
                      v = v + (a.w_hi * e.w_lo) * to_acc(img[(static_cast<int64_t>(a.hi) * Ww + e.lo) * C + c]);
                      v = v + (a.w_hi * e.w_hi) * to_acc(img[(static_cast<int64_t>(a.hi) * Ww + e.hi) * C + c]);
                      if (v > best) {
                        best = v;
                        arg = iy * r.cx + ix;
                      }
                    }
                  }
                  if (arg < 0) continue;
                  const Tap<A> a = bilinear_tap(sample_position(r.gy, ph, y0, arg / r.cx), Hh, true, r.ny);
                  const Tap<A> e = bilinear_tap(sample_position(r.gx, pw, x0, arg % r.cx), Ww, true, r.nx);
                  const A gc = to_acc(gk[(ph * ow + pw) * C]);
                  const int rows[2] = {a.lo, a.hi}, cols[2] = {e.lo, e.hi};
                  const A wy[2] = {a.w_lo, a.w_hi}, wx[2] = {e.w_lo, e.w_hi};
#pragma unroll
                  for (int u = 0; u < 2; ++u) {
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                      if (rows[u] >= r0 && rows[u] < r1 && cols[q] >= c0 && cols[q] < c1) {
                        acc[((rows[u] - r0) * tile + (cols[q] - c0)) * nt + tid] += gc * (wy[u] * wx[q]);
                      }
                    }
                  }
                }
              }
            }
            });
          }
        }
        blk.sync();  // rlist and warp_sums are rewritten next
      }
      blk.each_thread([&](const Thread& t) {
        const int tid = t.linear();
        const int64_t c = chunk * nt + tid;
        if (c >= C) return;
        for (int y = r0; y < r1; ++y) {
          for (int x = c0; x < c1; ++x) {
            grad[((b * H + y) * W + x) * C + c] = acc[((y - r0) * tile + (x - c0)) * nt + tid];
          }
        }
      });
      // acc columns are per thread; the next tile's barriers order the shared lists.
    }
  }
};

// ---------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------

// Launch geometry of the scatter kernel and of level l's gather kernel (the CUDA launch
// and the host runner both use it).
struct ScatterPlan {
  int vec;  // channels per thread: VecWidth<S>() when C is a multiple of it, else 1
  LaunchGeom geom;
};

template <typename S>
ScatterPlan PlanScatter(const AlignBwdArgs<S>& args) {
  ScatterPlan p{};
  p.vec = args.at.channels % VecWidth<S>() == 0 ? VecWidth<S>() : 1;
  const int64_t CV = args.at.channels / p.vec;
  const int64_t bins = args.at.oh * args.at.ow;
  const int bx = CV >= kBwdThreads ? kBwdThreads : RoundUp32(CV);
  int by = kBwdThreads / bx;
  if (by > bins) by = static_cast<int>(bins);
  if (by < 1) by = 1;
  const int64_t groups = args.do_rois ? 1 : (bins + by - 1) / by;
  p.geom = LaunchGeom{Dim3{GridFor(args.at.num_rois * groups), 1, 1},
                      Dim3{static_cast<unsigned>(bx), static_cast<unsigned>(by), 1},
                      AlignBackwardKernel<S, 1, false>::shared_bytes(bx * by, args.do_rois != 0)};
  return p;
}

struct GatherPlan {
  bool skip;  // an empty level or no images: nothing to write
  LaunchGeom geom;
  GatherTiles tiles;
};

template <typename S>
GatherPlan PlanGather(const AlignBwdArgs<S>& args, int l) {
  using A = typename AccOf<S>::type;
  GatherPlan p{};
  const int64_t C = args.at.channels;
  const int cap = sizeof(A) == 8 ? 64 : 128;
  const int nt = C >= cap ? cap : RoundUp32(C);
  const int64_t chunks = (C + nt - 1) / nt;
  const int64_t H = args.lv.height[l], W = args.lv.width[l];
  p.skip = H <= 0 || W <= 0 || args.lv.out_batch <= 0;
  if (p.skip) return p;
  // 8 x 8 tiles when there are enough of them to fill the GPU, else 4 x 4.
  const int64_t blocks8 = args.lv.out_batch * ((H + 7) / 8) * ((W + 7) / 8) * chunks;
  const int tile = blocks8 >= 1024 ? 8 : 4;
  const int64_t tiles_y = (H + tile - 1) / tile, tiles_x = (W + tile - 1) / tile;
  p.tiles = GatherTiles{l, tile, tiles_y, tiles_x, chunks};
  p.geom = LaunchGeom{Dim3{GridFor(args.lv.out_batch * tiles_y * tiles_x * chunks), 1, 1},
                      Dim3{static_cast<unsigned>(nt), 1, 1}, AlignGatherKernel<S, false>::shared_bytes(tile, nt)};
  return p;
}

template <typename S, bool kMax, typename Exec>
void LaunchScatter(Exec& exec, const AlignBwdArgs<S>& args) {
  constexpr int kV = VecWidth<S>();
  const ScatterPlan p = PlanScatter(args);
  if (p.vec == kV) {
    exec.template launch<AlignBackwardKernel<S, kV, kMax>>(p.geom, args);
  } else {
    exec.template launch<AlignBackwardKernel<S, 1, kMax>>(p.geom, args);
  }
}

template <typename S, bool kMax, typename Exec>
void LaunchGather(Exec& exec, const AlignBwdArgs<S>& args) {
  for (int l = 0; l < args.lv.num; ++l) {
    const GatherPlan p = PlanGather(args, l);
    if (!p.skip) exec.template launch<AlignGatherKernel<S, kMax>>(p.geom, args, p.tiles);
  }
}

ffi::Error RoiAlignBackwardImpl(JAX_ROI_EXEC_PARAMS ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                    ffi::AnyBuffer level, ffi::RemainingArgs feats,
                                    ffi::Result<ffi::AnyBuffer> d_rois, ffi::RemainingRets d_feats,
                                    ffi::Span<const double> scales, int64_t sampling_ratio, int64_t aligned,
                                    int64_t reduction, int64_t quantize, int64_t rois_grad, int64_t deterministic) {
  const char* op = "jax_roi roi_align backward (CUDA)";
  auto exec = JAX_ROI_MAKE_EXEC();
  AlignAttrs at{};
  Levels lv{};
  ffi::DataType dtype;
  if (auto err = DecodeAlign(op, rois, level, feats, scales, sampling_ratio, aligned, reduction, quantize, &dtype,
                             &at, &lv);
      err.failure()) {
    return err;
  }
  const int64_t K = at.num_rois, C = at.channels;
  auto cd = cot.dimensions();
  if (auto err = CheckCotangent(op, cot, K, C, dtype); err.failure()) return err;
  at.oh = cd[1];
  at.ow = cd[2];
  const ffi::DataType ctype = CoordType(dtype);
  if (auto err = CheckShape(*d_rois, {K, 5}, ctype, std::string(op) + ": d_rois"); err.failure()) return err;
  if (d_feats.size() != static_cast<size_t>(lv.num)) {
    return Invalid(std::string(op) + ": expected one d_features result per level (" + std::to_string(lv.num) +
                   "), got " + std::to_string(d_feats.size()));
  }
  // d_features in the accumulation dtype; [B_out, H, W, C] with B_out a multiple of B (vmap
  // folds a mapped axis into the batch: roi batch b reads image b % B).
  int64_t out_batch = -1;
  std::vector<size_t> grad_bytes(lv.num);
  for (int l = 0; l < lv.num; ++l) {
    auto res = d_feats.get<ffi::AnyBuffer>(l);
    if (res.has_error()) return res.error();
    const ffi::AnyBuffer& d = **res;
    auto dd = d.dimensions();
    if (l == 0 && dd.size() == 4) out_batch = dd[0];
    const bool batch_ok = lv.batch == 0 ? out_batch == 0 : (out_batch >= 0 && out_batch % lv.batch == 0);
    if (dd.size() != 4 || dd[0] != out_batch || dd[1] != lv.height[l] || dd[2] != lv.width[l] || dd[3] != C ||
        !batch_ok) {
      return Invalid(std::string(op) + ": d_features level " + std::to_string(l) + ": expected shape [n*" +
                     std::to_string(lv.batch) + ", " + std::to_string(lv.height[l]) + ", " +
                     std::to_string(lv.width[l]) + ", " + std::to_string(C) + "], got " + ShapeString(dd));
    }
    if (d.element_type() != ctype) {
      return Invalid(std::string(op) + ": d_features level " + std::to_string(l) + ": expected dtype " +
                     DtypeName(ctype) + ", got " + DtypeName(d.element_type()));
    }
    lv.grad[l] = d.untyped_data();
    grad_bytes[l] = d.size_bytes();
  }
  lv.out_batch = out_batch;
  const bool det = deterministic != 0;
  if (det && K > kMaxDeterministicRois) {
    return Invalid(std::string(op) + ": deterministic: supports at most " + std::to_string(kMaxDeterministicRois) +
                   " rois, got " + std::to_string(K));
  }
  const bool want_rois = rois_grad != 0;
  const bool trivial = K == 0 || C == 0 || lv.batch == 0;
  // Outputs initialised on the stream: d_rois always (rows of dead rois stay zero unless the
  // box-gradient kernel writes them); d_features unless the gather kernel writes them all.
  if (auto err = exec.zero(op, d_rois->untyped_data(), d_rois->size_bytes()); err.failure()) return err;
  if (!det || trivial) {
    for (int l = 0; l < lv.num; ++l) {
      if (auto err = exec.zero(op, lv.grad[l], grad_bytes[l]); err.failure()) return err;
    }
  }
  if (trivial) return ffi::Error::Success();
  const bool use_max = reduction == 1;
  DispatchFloat(dtype, [&](auto tag) {
    using S = decltype(tag);
    AlignBwdArgs<S> args;
    args.rois = static_cast<const typename AccOf<S>::type*>(rois.untyped_data());
    args.level = static_cast<const int32_t*>(level.untyped_data());
    args.cot = static_cast<const S*>(cot.untyped_data());
    args.d_rois = static_cast<typename AccOf<S>::type*>(d_rois->untyped_data());
    args.at = at;
    args.lv = lv;
    args.do_features = det ? 0 : 1;
    args.do_rois = want_rois ? 1 : 0;
    if (args.do_features || args.do_rois) {
      use_max ? LaunchScatter<S, true>(exec, args) : LaunchScatter<S, false>(exec, args);
    }
    if (det) {
      use_max ? LaunchGather<S, true>(exec, args) : LaunchGather<S, false>(exec, args);
    }
  });
  return exec.status(op);
}

}  // namespace
}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiAlignForward), jax_roi::JAX_ROI_CUDA_NS::RoiAlignForwardImpl,
                              JAX_ROI_BIND()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // level [K] int32
                                  .RemainingArgs()        // features, one [B, H_l, W_l, C] per level
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C]
                                  .Attr<ffi::Span<const double>>("spatial_scales")
                                  .Attr<int64_t>("sampling_ratio")
                                  .Attr<int64_t>("aligned")
                                  .Attr<int64_t>("reduction")
                                  .Attr<int64_t>("quantize"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JAX_ROI_HANDLER_NAME(JaxRoiAlignBackward), jax_roi::JAX_ROI_CUDA_NS::RoiAlignBackwardImpl,
                              JAX_ROI_BIND()
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
                                  .Attr<int64_t>("rois_grad")
                                  .Attr<int64_t>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});
