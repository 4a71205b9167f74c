// Shared plumbing of the CUDA kernels: 16-byte vector loads and stores of the element types,
// vector atomics, a block-wide ordered compaction, the feature-level table passed to the
// kernels by value, the operand decoding into it (on the checks of common/checks.h, which
// the CPU handlers use too), and the two executors of a launch: CudaExec (nvcc:
// a kernel launch on the stream) and HostExec (host compiler: every block and thread run
// on the calling thread, for the emulated targets).
//
// The per-sample arithmetic is common/roi_math.h's (ROI_HD functions), shared with the CPU path;
// device-only operations come from cuda/device_ops.h. Build with --fmad=false and IEEE
// division (no -use_fast_math), and the host twin with -ffp-contract=off: every coordinate
// operation is rounded on its own, as on the CPU and in torchvision.
#ifndef JAX_ROI_XLA_FFI_CUDA_COMMON_CUH_
#define JAX_ROI_XLA_FFI_CUDA_COMMON_CUH_

#include <stdint.h>
#include <string.h>

#include <initializer_list>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/element_types.h"
#include "common/roi_limits.h"
#include "common/roi_math.h"
#include "cuda/device_ops.h"
#include "xla/ffi/api/ffi.h"

// Inline in both builds; forced inline on the device, as the kernels were tuned with it.
#ifdef __CUDACC__
#define ROI_HDI __host__ __device__ __forceinline__
#else
#define ROI_HDI inline
#endif

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {

namespace ffi = xla::ffi;

// ---------------------------------------------------------------------------------------
// Vectors of the element types (bf16, f16, AccOf, to_acc, Store: common/element_types.h)
// ---------------------------------------------------------------------------------------

// Channels per 16-byte vector.
template <typename S>
constexpr int VecWidth() {
  return static_cast<int>(16 / sizeof(S));
}

// a[j] = p[j], j < V, as one 16-byte load when V elements fill 16 bytes (p then 16-byte
// aligned: the caller uses V > 1 only when C % V == 0, and XLA buffers are aligned).
template <typename S, int V>
ROI_HDI void load_vec(const S* __restrict__ p, typename AccOf<S>::type (&a)[V]) {
  if constexpr (V * sizeof(S) == 16) {
    const Raw16 raw = load16_readonly(p);
    S s[V];
    memcpy(s, &raw, 16);
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = to_acc(s[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = to_acc(p[j]);
  }
}

template <typename S, int V>
ROI_HDI void store_vec(S* __restrict__ p, const typename AccOf<S>::type (&a)[V]) {
  S s[V];
#pragma unroll
  for (int j = 0; j < V; ++j) s[j] = Store<S>::from(a[j]);
  if constexpr (V * sizeof(S) == 16) {
    Raw16 raw;
    memcpy(&raw, s, 16);
    store16(p, raw);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = s[j];
  }
}

// d[j] += v[j], j < V. Float4 atomics on sm_90 (16-byte aligned: see load_vec).
template <int V>
ROI_HDI void atomic_add_vec(float* d, const float (&v)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 4) atomic_add4(d + j, v[j], v[j + 1], v[j + 2], v[j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) atomic_add(d + j, v[j]);
  }
}

template <int V>
ROI_HDI void atomic_add_vec(double* d, const double (&v)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) atomic_add(d + j, v[j]);
}

template <typename T>
ROI_HDI T neg_infinity();
template <>
ROI_HDI float neg_infinity<float>() {
  return roi_bits_float(0xff800000u);
}
template <>
ROI_HDI double neg_infinity<double>() {
  const uint64_t bits = 0xfff0000000000000ull;
  double d;
  memcpy(&d, &bits, sizeof(d));
  return d;
}

// ---------------------------------------------------------------------------------------
// Block-wide ordered compaction. Called block-uniformly (blockDim.x * blockDim.y a multiple
// of 32); returns the number of threads with a non-zero flag and sets pos[t] to the rank of
// thread t among them (thread order). `warp_sums`: shared memory of one int per warp. The
// caller must sync() between using the result and the next call (which rewrites
// warp_sums).
// ---------------------------------------------------------------------------------------
template <typename Block>
ROI_HDI int block_compact(const Block& blk, const PerThread<Block, int>& flag, PerThread<Block, int>& pos,
                          int* warp_sums) {
  PerThread<Block, unsigned> ballot;
  blk.ballot(flag, ballot);
  blk.each_thread([&](const Thread& t) {
    if (t.lane() == 0) warp_sums[t.warp()] = popc(ballot[t]);
  });
  blk.sync();
  int total = 0;
  blk.each_thread([&](const Thread& t) {
    const int lane = t.lane(), warp = t.warp(), warps = t.block_threads() / kWarpSize;
    int before = 0, all = 0;
    for (int w = 0; w < warps; ++w) {
      const int s = warp_sums[w];
      before += (w < warp) ? s : 0;
      all += s;
    }
    pos[t] = before + popc(ballot[t] & ((1u << lane) - 1u));
    total = all;  // the same in every thread
  });
  return total;
}

// ---------------------------------------------------------------------------------------
// The box gradient of one roi, reduced over a block. Called block-uniformly: sums v[q]
// (q < N: the box's numbers after the batch index; x1, y1, x2, y2 for a box) over the
// block's threads in a fixed order (shuffles within each warp, then the warps in order:
// deterministic) and writes the totals to d_roi[1 + q] (d_roi[0], the batch index, gets
// 0). `red`: shared memory of N doubles per warp (box_gradient_shared_bytes).
// ---------------------------------------------------------------------------------------
ROI_HDI size_t box_gradient_shared_bytes(int threads, int numbers = 4) {
  return numbers * sizeof(double) * static_cast<size_t>(threads / kWarpSize);
}

template <int N, typename Block, typename A>
ROI_HDI void block_box_gradient(const Block& blk, PerThread<Block, double> (&v)[N], double* red, A* d_roi) {
  const Dim3 bd = blk.block_dim();
  const int warps = static_cast<int>(bd.x * bd.y) / kWarpSize;
  PerThread<Block, double> shifted;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int q = 0; q < N; ++q) {
      blk.shfl_down(v[q], shifted, off);
      blk.each_thread([&](const Thread& t) { v[q][t] += shifted[t]; });
    }
  }
  blk.each_thread([&](const Thread& t) {
    if (t.lane() != 0) return;
#pragma unroll
    for (int q = 0; q < N; ++q) red[q * warps + t.warp()] = v[q][t];
  });
  blk.sync();
  blk.each_thread([&](const Thread& t) {
    if (t.linear() != 0) return;
    double tot[N];
#pragma unroll
    for (int q = 0; q < N; ++q) tot[q] = 0;
    for (int w = 0; w < warps; ++w) {
#pragma unroll
      for (int q = 0; q < N; ++q) tot[q] += red[q * warps + w];
    }
    d_roi[0] = A(0);
#pragma unroll
    for (int q = 0; q < N; ++q) d_roi[1 + q] = static_cast<A>(tot[q]);
  });
  blk.sync();  // red is reused by the next roi
}

// ---------------------------------------------------------------------------------------
// Feature levels, passed to the kernels by value (at most kMaxLevels, roi_limits.h).
// ---------------------------------------------------------------------------------------
struct Levels {
  int num;
  int64_t batch;      // images in the features (B)
  int64_t out_batch;  // images in d_features (backward: a multiple of B; B otherwise)
  int64_t channels;
  const void* data[kMaxLevels];
  void* grad[kMaxLevels];
  int64_t height[kMaxLevels], width[kMaxLevels];
  double scale[kMaxLevels];
};

// ---------------------------------------------------------------------------------------
// RoIAlign: one roi's level, image and per-axis geometry (CPU: ResolveRoi + AxisTable).
// ---------------------------------------------------------------------------------------
struct AlignAttrs {
  int64_t num_rois, channels, oh, ow, sampling_ratio;
  bool aligned, quantize;
};

template <typename T>
struct AlignRoi {
  bool live;        // a live roi with samples on both axes
  int l;            // level
  int64_t b;        // image index (against the images it was resolved for)
  int64_t H, W;
  AxisGeom<T> gy, gx;
  int cy, cx;       // samples visited per bin along y and x (> 0 when live)
  T ny, nx;         // per-axis normalisation: 1/count for an average, 1 for a maximum
};

// Resolves roi k against `num_images` images. `live` is false for a dead roi (level out of
// range, empty level, non-finite box, batch index outside [0, num_images)) and for a roi
// with no samples on an axis (empty or inverted box in adaptive mode): both give a zero
// output row and no gradient.
template <typename T>
ROI_HDI AlignRoi<T> resolve_align(const Levels& lv, const AlignAttrs& at, const T* __restrict__ rois,
                                                     const int32_t* __restrict__ level, int64_t k, int64_t num_images,
                                                     bool normalize) {
  AlignRoi<T> r;
  r.live = false;
  r.cy = r.cx = 0;
  const int64_t l = level[k];
  if (l < 0 || l >= lv.num) return r;
  r.l = static_cast<int>(l);
  r.H = lv.height[l];
  r.W = lv.width[l];
  if (r.H <= 0 || r.W <= 0) return r;
  const T* roi = rois + 5 * k;
  r.b = roi_batch_index(roi, num_images);
  if (r.b < 0) return r;
  const T scale = static_cast<T>(lv.scale[l]);
  r.gy = axis_geometry<T>(roi[2], roi[4], scale, at.oh, r.H, at.sampling_ratio, at.aligned, at.quantize);
  r.gx = axis_geometry<T>(roi[1], roi[3], scale, at.ow, r.W, at.sampling_ratio, at.aligned, at.quantize);
  r.cy = r.gy.count > 0 ? r.gy.count : 0;
  r.cx = r.gx.count > 0 ? r.gx.count : 0;
  r.ny = normalize ? T(1) / r.gy.count_f : T(1);
  r.nx = normalize ? T(1) / r.gx.count_f : T(1);
  r.live = r.cy > 0 && r.cx > 0;
  return r;
}

// ---------------------------------------------------------------------------------------
// Host: the operand checks (common/checks.h, shared with the CPU handlers) into the CUDA
// level table.
// ---------------------------------------------------------------------------------------

// Checks the remaining args from `first` as `count` feature levels [B, H_l, W_l, C] of one
// dtype and one B and C, and records them in lv.
inline ffi::Error DecodeLevels(const ffi::RemainingArgs& args, size_t first, size_t count, ffi::DataType* dtype,
                               Levels* lv, const char* op) {
  auto err = CheckLevels(args, first, count, op, dtype, &lv->batch, &lv->channels,
                         [&](size_t l, const ffi::AnyBuffer& f) {
                           auto d = f.dimensions();
                           lv->data[l] = f.untyped_data();
                           lv->grad[l] = nullptr;
                           lv->height[l] = d[1];
                           lv->width[l] = d[2];
                           lv->scale[l] = 1.0;
                         });
  lv->num = static_cast<int>(count);
  lv->out_batch = lv->batch;
  return err;
}

// Checks the roi_align operands and attributes (as cpu/roi_align.cc's DecodeAlign).
inline ffi::Error DecodeAlign(const char* op, const ffi::AnyBuffer& rois, const ffi::AnyBuffer& level,
                              const ffi::RemainingArgs& feats, ffi::Span<const double> scales, int64_t sampling_ratio,
                              int64_t aligned, int64_t reduction, int64_t quantize, ffi::DataType* dtype,
                              AlignAttrs* at, Levels* lv) {
  const size_t L = feats.size();
  if (auto err = CheckAlignAttrs(op, L, scales, sampling_ratio, reduction); err.failure()) return err;
  if (auto err = DecodeLevels(feats, 0, L, dtype, lv, op); err.failure()) return err;
  if (auto err = CheckAlignScales(op, scales); err.failure()) return err;
  for (size_t l = 0; l < L; ++l) lv->scale[l] = scales[l];
  if (auto err = CheckFeatureDtype(op, *dtype); err.failure()) return err;
  if (auto err = CheckRois(rois, *dtype, op, &at->num_rois); err.failure()) return err;
  if (auto err = CheckShape(level, {at->num_rois}, ffi::DataType::S32, std::string(op) + ": level"); err.failure()) {
    return err;
  }
  at->channels = lv->channels;
  at->sampling_ratio = sampling_ratio;
  at->quantize = quantize != 0;
  at->aligned = aligned != 0 && !at->quantize;
  return ffi::Error::Success();
}

// Grid size for a grid-stride loop over `work` blocks.
inline unsigned GridFor(int64_t work) {
  const int64_t kMaxGrid = 0x7fffffff;
  return static_cast<unsigned>(work < 1 ? 1 : (work < kMaxGrid ? work : kMaxGrid));
}

inline int RoundUp32(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

// ---------------------------------------------------------------------------------------
// Executors: where a handler's launches and memsets go. A kernel K is a struct with
// kMaxThreads (its __launch_bounds__) and a static ROI_HD run(Block&, params...) body.
// ---------------------------------------------------------------------------------------

// The launch configuration of one kernel (PlanX functions of each op compute it, for both
// executors).
struct LaunchGeom {
  Dim3 grid, block;
  size_t shared_bytes;
};

// The largest dynamic shared memory a launch may ask for without an opt-in attribute.
constexpr size_t kMaxSharedBytes = 48 * 1024;

#ifdef __CUDACC__
// The one __global__ function: every kernel body runs through it, on the GPU exactly what
// HostExec runs on the host.
template <typename K, typename... P>
__global__ void __launch_bounds__(K::kMaxThreads) KernelEntry(const P... params) {
  extern __shared__ __align__(16) unsigned char shared[];
  K::run(DeviceBlock(shared), params...);
}

class CudaExec {
 public:
  explicit CudaExec(cudaStream_t stream) : stream_(stream) {}
  template <typename K, typename... P>
  void launch(const LaunchGeom& g, const P&... params) {
    KernelEntry<K, P...><<<dim3(g.grid.x, g.grid.y, g.grid.z), dim3(g.block.x, g.block.y, g.block.z),
                           g.shared_bytes, stream_>>>(params...);
  }
  ffi::Error zero(const char* op, void* ptr, size_t bytes) {
    if (bytes == 0) return ffi::Error::Success();
    const cudaError_t e = cudaMemsetAsync(ptr, 0, bytes, stream_);
    if (e != cudaSuccess) return Error(op, "cudaMemsetAsync failed", e);
    return ffi::Error::Success();
  }
  // The error of the launches made so far (launch configuration, missing kernel image).
  ffi::Error status(const char* op) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return Error(op, "kernel launch failed", e);
    return ffi::Error::Success();
  }

 private:
  static ffi::Error Error(const char* op, const char* what, cudaError_t e) {
    return ffi::Error::Internal(std::string(op) + ": " + what + ": " + cudaGetErrorString(e));
  }
  cudaStream_t stream_;
};
#else
// Runs a launch on the calling thread: blocks in order, each block's phases for all its
// threads in order. Shared memory starts as a 0xA5 pattern (the GPU does not clear it).
// A launch the GPU would reject (block over K::kMaxThreads, too much shared memory, an
// empty grid or block) or a faulting access (host_fault) makes status() fail.
class HostExec {
 public:
  template <typename K, typename... P>
  void launch(const LaunchGeom& g, const P&... params) {
    const uint64_t threads = uint64_t{g.block.x} * g.block.y * g.block.z;
    if (threads == 0 || threads > static_cast<uint64_t>(K::kMaxThreads) ||
        threads > static_cast<uint64_t>(HostBlock::kMaxThreads) || g.grid.x == 0 || g.grid.y == 0 ||
        g.grid.z == 0 || g.shared_bytes > kMaxSharedBytes) {
      bad_launch_ = true;
      return;
    }
    // Exactly shared_bytes (operator new[] aligns to 16), so that AddressSanitizer sees an
    // access past the launch's shared memory.
    std::unique_ptr<unsigned char[]> storage(new unsigned char[g.shared_bytes]);
    unsigned char* shared = storage.get();
    memset(shared, 0xA5, g.shared_bytes);
    for (unsigned z = 0; z < g.grid.z; ++z) {
      for (unsigned y = 0; y < g.grid.y; ++y) {
        for (unsigned x = 0; x < g.grid.x; ++x) {
          K::run(HostBlock(g.grid, g.block, Dim3{x, y, z}, shared), params...);
        }
      }
    }
  }
  ffi::Error zero(const char*, void* ptr, size_t bytes) {
    if (bytes > 0) memset(ptr, 0, bytes);
    return ffi::Error::Success();
  }
  ffi::Error status(const char* op) {
    const bool fault = host_fault;
    host_fault = false;
    if (bad_launch_) return ffi::Error::Internal(std::string(op) + ": kernel launch failed: invalid configuration");
    if (fault) return ffi::Error::Internal(std::string(op) + ": kernel fault: misaligned 16-byte access");
    return ffi::Error::Success();
  }

 private:
  bool bad_launch_ = false;
};
#endif

// What differs between the two builds of a handler: its executor, its context and its name.
// The operands, results and attributes are bound by the same code in both.
#ifdef __CUDACC__
#define JAX_ROI_EXEC_PARAMS cudaStream_t stream,
#define JAX_ROI_MAKE_EXEC() CudaExec(stream)
#define JAX_ROI_BIND() ::xla::ffi::Ffi::Bind().Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()
#define JAX_ROI_HANDLER_NAME(base) base##Cuda
#else
#define JAX_ROI_EXEC_PARAMS
#define JAX_ROI_MAKE_EXEC() HostExec()
#define JAX_ROI_BIND() ::xla::ffi::Ffi::Bind()
#define JAX_ROI_HANDLER_NAME(base) base##CudaEmulated
#endif

}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CUDA_COMMON_CUH_
