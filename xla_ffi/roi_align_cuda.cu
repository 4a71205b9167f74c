// RoIAlign (avg / max), RoIWarp and multi-level RoIAlign on CUDA: the forward handler.
//
// NHWC: features [B, H_l, W_l, C] per level, rois [K, 5], output [K, oh, ow, C]. A thread
// owns V neighbouring channels (one 16-byte vector when C % V == 0, else one channel) of one
// output bin, so the lanes of a warp read neighbouring channels of the same tap: each tap is
// one coalesced load. Block: x over channel vectors, y over the bins of one roi. The
// per-sample geometry is roi_math.h's, the same functions the CPU kernels call.
//
// The kernel body is a ROI_HD function of its thread's indices (cuda/device_ops.h);
// PlanForward computes the launch geometry. The host compiler builds this file too
// (cuda/emulated_roi_align.cc) and runs the same body for the emulated target.
//
// The same FFI signature and attributes as the CPU handler (roi_align_cpu.cc).
#include <string>

#include "cuda_common.cuh"

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {
namespace {

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
