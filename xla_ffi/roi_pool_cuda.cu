// RoIPool (Fast R-CNN; binning "caffe" or "floor") on CUDA: XLA FFI handlers.
//
// NHWC: features [B, H, W, C], rois [K, 5], output [K, oh, ow, C]. Each bin takes the
// maximum over whole cells (roi_math.h's pool_bin_range, as the CPU kernels); a thread owns
// V neighbouring channels of one bin (16-byte loads when C % V == 0), so every cell read is
// coalesced. Backward: the first maximal cell (row-major, strict >) of each channel gets
// the cotangent, by atomicAdd, or (deterministic != 0) by a gather over feature tiles as in
// roi_align_bwd_cuda.cu: bitwise reproducible.
//
// The same operands and attributes as roi_pool_cpu.cc, plus `deterministic` on the backward.
#include <string>

#include "cuda_common.cuh"

namespace jax_roi {
namespace cuda {
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
__device__ __forceinline__ void pool_bin(const A* roi, A scale, int64_t ph, int64_t pw, int64_t oh, int64_t ow,
                                         int64_t H, int64_t W, int64_t binning, int* y0, int* hy, int* x0, int* hx) {
  pool_bin_range<A>(roi[2], roi[4], scale, ph, oh, H, binning, y0, hy);
  pool_bin_range<A>(roi[1], roi[3], scale, pw, ow, W, binning, x0, hx);
}

template <typename S, int V>
__global__ void __launch_bounds__(kPoolThreads) PoolForwardKernel(const PoolArgs<S> args) {
  using A = typename AccOf<S>::type;
  const int64_t bins = args.oh * args.ow, C = args.channels, CV = C / V;
  const int64_t H = args.height, W = args.width;
  const int64_t groups = (bins + blockDim.y - 1) / blockDim.y;
  const int64_t work = args.num_rois * groups;
  const A scale = static_cast<A>(args.scale);
  for (int64_t blk = blockIdx.x; blk < work; blk += gridDim.x) {
    const int64_t k = blk / groups;
    const int64_t bin = (blk % groups) * blockDim.y + threadIdx.y;
    if (bin >= bins) continue;
    const int64_t ph = bin / args.ow, pw = bin % args.ow;
    S* out = args.out + (k * bins + bin) * C;
    const A* roi = args.rois + 5 * k;
    const int64_t b = (H > 0 && W > 0) ? roi_batch_index(roi, args.batch) : -1;
    int y0 = 0, hy = 0, x0 = 0, hx = 0;
    if (b >= 0) pool_bin(roi, scale, ph, pw, args.oh, args.ow, H, W, args.binning, &y0, &hy, &x0, &hx);
    const S* __restrict__ img = args.feats + (b >= 0 ? b : 0) * H * W * C;
    for (int64_t cv = threadIdx.x; cv < CV; cv += blockDim.x) {
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

template <typename S, int V>
__global__ void __launch_bounds__(kPoolThreads) PoolBackwardKernel(const PoolArgs<S> args) {
  using A = typename AccOf<S>::type;
  const int64_t bins = args.oh * args.ow, C = args.channels, CV = C / V;
  const int64_t H = args.height, W = args.width;
  const int64_t groups = (bins + blockDim.y - 1) / blockDim.y;
  const int64_t work = args.num_rois * groups;
  const A scale = static_cast<A>(args.scale);
  for (int64_t blk = blockIdx.x; blk < work; blk += gridDim.x) {
    const int64_t k = blk / groups;
    const int64_t bin = (blk % groups) * blockDim.y + threadIdx.y;
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
    for (int64_t cv = threadIdx.x; cv < CV; cv += blockDim.x) {
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
        if (arg[j] >= 0) atomicAdd(dimg + arg[j] * C + c + j, g[j]);
      }
    }
  }
}

// Deterministic: one block per (image, tile, channel chunk); rois listed in order; each
// thread (one channel) adds the cotangent of every bin whose first maximal cell lies in the
// tile, in (roi, ph, pw) order, then writes the tile once.
template <typename S>
__global__ void __launch_bounds__(128) PoolGatherKernel(const PoolArgs<S> args, int tile, int64_t tiles_y,
                                                        int64_t tiles_x, int64_t chunks) {
  using A = typename AccOf<S>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int warp_sums[32];
  const int nt = blockDim.x, tid = threadIdx.x;
  A* acc = reinterpret_cast<A*>(smem);                      // [tile*tile][nt]
  int* rlist = reinterpret_cast<int*>(acc + tile * tile * nt);  // [nt]
  const int64_t K = args.num_rois, C = args.channels, oh = args.oh, ow = args.ow, bins = oh * ow;
  const int64_t H = args.height, W = args.width;
  const A scale = static_cast<A>(args.scale);
  const int64_t work = args.out_batch * tiles_y * tiles_x * chunks;
  for (int64_t blk = blockIdx.x; blk < work; blk += gridDim.x) {  // uniform over the block
    int64_t t = blk;
    const int64_t chunk = t % chunks;
    t /= chunks;
    const int64_t tx = t % tiles_x;
    t /= tiles_x;
    const int64_t ty = t % tiles_y;
    const int64_t b = t / tiles_y;
    const int r0 = static_cast<int>(ty * tile), r1 = static_cast<int>(ty * tile + tile < H ? ty * tile + tile : H);
    const int c0 = static_cast<int>(tx * tile), c1 = static_cast<int>(tx * tile + tile < W ? tx * tile + tile : W);
    const int64_t c = chunk * nt + tid;
    const bool cok = c < C;
    for (int q = 0; q < tile * tile; ++q) acc[q * nt + tid] = A(0);
    const S* __restrict__ img = args.feats + (b % args.batch) * H * W * C;
    for (int64_t k0 = 0; k0 < K; k0 += nt) {
      bool hit = false;
      const int64_t k = k0 + tid;
      if (k < K) {
        const A* roi = args.rois + 5 * k;
        if (roi_batch_index(roi, args.out_batch) == b) {
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
          hit = ytouch && xtouch;
        }
      }
      int pos;
      const int n = block_compact(hit, warp_sums, &pos);
      if (hit) rlist[pos] = static_cast<int>(k);
      __syncthreads();
      if (cok) {
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
      }
      __syncthreads();  // rlist and warp_sums are rewritten next
    }
    if (cok) {
      for (int y = r0; y < r1; ++y) {
        for (int x = c0; x < c1; ++x) {
          args.grad[((b * H + y) * W + x) * C + c] = acc[((y - r0) * tile + (x - c0)) * nt + tid];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------

template <typename S, int V, bool kBackward>
void LaunchPool(const PoolArgs<S>& args, cudaStream_t stream) {
  const int64_t CV = args.channels / V;
  const int64_t bins = args.oh * args.ow;
  const int bx = CV >= kPoolThreads ? kPoolThreads : RoundUp32(CV);
  int by = kPoolThreads / bx;
  if (by > bins) by = static_cast<int>(bins);
  if (by < 1) by = 1;
  const unsigned grid = GridFor(args.num_rois * ((bins + by - 1) / by));
  if (kBackward) {
    PoolBackwardKernel<S, V><<<grid, dim3(bx, by), 0, stream>>>(args);
  } else {
    PoolForwardKernel<S, V><<<grid, dim3(bx, by), 0, stream>>>(args);
  }
}

template <typename S, bool kBackward>
void LaunchPoolV(const PoolArgs<S>& args, cudaStream_t stream) {
  constexpr int kV = VecWidth<S>();
  if (args.channels % kV == 0) {
    LaunchPool<S, kV, kBackward>(args, stream);
  } else {
    LaunchPool<S, 1, kBackward>(args, stream);
  }
}

template <typename S>
void LaunchPoolGather(const PoolArgs<S>& args, cudaStream_t stream) {
  using A = typename AccOf<S>::type;
  const int64_t C = args.channels, H = args.height, W = args.width;
  const int cap = sizeof(A) == 8 ? 64 : 128;
  const int nt = C >= cap ? cap : RoundUp32(C);
  const int64_t chunks = (C + nt - 1) / nt;
  const int64_t blocks8 = args.out_batch * ((H + 7) / 8) * ((W + 7) / 8) * chunks;
  const int tile = blocks8 >= 1024 ? 8 : 4;
  const int64_t tiles_y = (H + tile - 1) / tile, tiles_x = (W + tile - 1) / tile;
  const size_t smem = sizeof(A) * tile * tile * nt + sizeof(int) * nt;
  PoolGatherKernel<S><<<GridFor(args.out_batch * tiles_y * tiles_x * chunks), nt, smem, stream>>>(
      args, tile, tiles_y, tiles_x, chunks);
}

ffi::Error DecodePool(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& features, double scale,
                      int64_t binning, ffi::DataType* dtype, int64_t* num_rois) {
  auto fd = features.dimensions();
  if (fd.size() != 4) {
    return Invalid(std::string(op) + ": features: expected rank 4 [B, H, W, C], got shape " + ShapeString(fd));
  }
  *dtype = features.element_type();
  if (!DispatchFloat(*dtype, [](auto) {})) {
    return Invalid(std::string(op) + ": features: expected float32, float64, bfloat16 or float16, got " +
                   DtypeName(*dtype));
  }
  if (!(scale > 0) || !roi_finite(scale)) {
    return Invalid(std::string(op) + ": spatial_scale: expected a finite number > 0, got " + std::to_string(scale));
  }
  if (binning != kPoolCaffe && binning != kPoolFloor) {
    return Invalid(std::string(op) + ": binning: expected 0 (caffe) or 1 (floor), got " + std::to_string(binning));
  }
  return CheckRois(rois, *dtype, op, num_rois);
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

ffi::Error RoiPoolForwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer rois, ffi::AnyBuffer features,
                                  ffi::Result<ffi::AnyBuffer> out, double spatial_scale, int64_t binning) {
  const char* op = "jax_roi roi_pool forward (CUDA)";
  ffi::DataType dtype;
  int64_t K;
  if (auto err = DecodePool(op, rois, features, spatial_scale, binning, &dtype, &K); err.failure()) return err;
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
    LaunchPoolV<S, false>(args, stream);
  });
  return LaunchStatus(op);
}

ffi::Error RoiPoolBackwardCudaImpl(cudaStream_t stream, ffi::AnyBuffer cot, ffi::AnyBuffer rois,
                                   ffi::AnyBuffer features, ffi::Result<ffi::AnyBuffer> d_features,
                                   double spatial_scale, int64_t binning, int64_t deterministic) {
  const char* op = "jax_roi roi_pool backward (CUDA)";
  ffi::DataType dtype;
  int64_t K;
  if (auto err = DecodePool(op, rois, features, spatial_scale, binning, &dtype, &K); err.failure()) return err;
  auto fd = features.dimensions();
  const int64_t B = fd[0], H = fd[1], W = fd[2], C = fd[3];
  auto cd = cot.dimensions();
  if (cd.size() != 4 || cd[0] != K || cd[1] < 1 || cd[2] < 1 || cd[3] != C || cot.element_type() != dtype) {
    return Invalid(std::string(op) + ": cotangent: expected " + DtypeName(dtype) + " [K=" + std::to_string(K) +
                   ", oh, ow, C=" + std::to_string(C) + "], got " + DtypeName(cot.element_type()) + " " +
                   ShapeString(cd));
  }
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
    if (auto err = MemsetAsync(op, d_features->untyped_data(), d_features->size_bytes(), stream); err.failure()) {
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
      LaunchPoolGather<S>(args, stream);
    } else {
      LaunchPoolV<S, true>(args, stream);
    }
  });
  return LaunchStatus(op);
}

}  // namespace
}  // namespace cuda
}  // namespace jax_roi

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPoolForwardCuda, jax_roi::cuda::RoiPoolForwardCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // [K, oh, ow, C]
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("binning"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxRoiPoolBackwardCuda, jax_roi::cuda::RoiPoolBackwardCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // cotangent [K, oh, ow, C]
                                  .Arg<ffi::AnyBuffer>()  // rois [K, 5]
                                  .Arg<ffi::AnyBuffer>()  // features [B, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // d_features [n*B, H, W, C], float32 or float64
                                  .Attr<double>("spatial_scale")
                                  .Attr<int64_t>("binning")
                                  .Attr<int64_t>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});
