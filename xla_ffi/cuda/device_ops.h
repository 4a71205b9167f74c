// The device-only operations of the CUDA kernels, each with a host twin, so that the same
// kernel bodies compile with nvcc for the GPU and with the host compiler for the emulated
// targets (JAX_ROI_EMULATE_CUDA=1). Nothing else in a kernel body may touch CUDA intrinsics.
//
// A kernel body is a ROI_HD template over a Block:
//   * DeviceBlock (nvcc): each_thread(f) calls f once with this thread's indices, sync() is
//     __syncthreads(), the warp operations are the intrinsics.
//   * HostBlock (host compiler): each_thread(f) calls f for every thread of the block in
//     order, sync() does nothing (a phase has already run for all threads), shared memory is
//     a host array, and warp operations are loops over the 32 lanes.
// So a kernel with barriers is written as phases: code between two sync() calls is an
// each_thread(...) call; code outside each_thread is block-uniform (computed by every thread
// on the GPU, once on the host) and may only read shared memory and uniform values. Values a
// thread keeps across phases live in a PerThread<T> (one register on the GPU, one slot per
// thread on the host).
//
// JAX_ROI_CUDA_NS names the namespace: "cuda" for the nvcc build, "cuda_emulated" for the
// host build, so that both can be linked into one extension without sharing symbols.
#ifndef JAX_ROI_XLA_FFI_CUDA_DEVICE_OPS_H_
#define JAX_ROI_XLA_FFI_CUDA_DEVICE_OPS_H_

#include <stdint.h>
#include <string.h>

#include "common/roi_math.h"

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define JAX_ROI_CUDA_NS cuda
#else
#include <vector>
#define JAX_ROI_CUDA_NS cuda_emulated
#endif

namespace jax_roi {
namespace JAX_ROI_CUDA_NS {

constexpr int kWarpSize = 32;

struct Dim3 {
  unsigned x, y, z;
};

// The indices a thread of a launch sees (gridDim, blockDim, blockIdx, threadIdx).
struct Thread {
  Dim3 grid, block, block_idx, idx;
  // Linear index in the block (blocks here are 1-D or 2-D).
  ROI_HD int linear() const { return static_cast<int>(idx.y * block.x + idx.x); }
  ROI_HD int lane() const { return linear() & (kWarpSize - 1); }
  ROI_HD int warp() const { return linear() / kWarpSize; }
  ROI_HD int block_threads() const { return static_cast<int>(block.x * block.y * block.z); }
};

// ---------------------------------------------------------------------------------------
// Memory operations
// ---------------------------------------------------------------------------------------

// 16 raw bytes: one vector load or store.
#ifdef __CUDACC__
using Raw16 = uint4;
#else
struct alignas(16) Raw16 {
  uint32_t x, y, z, w;
};
#endif

// Set by the host twins when the GPU would have faulted (a misaligned vector access); the
// emulated handler turns it into an error, as a CUDA launch would. (Host code only; nvcc's
// host pass compiles it too, unused.)
inline thread_local bool host_fault = false;
inline void host_check_aligned(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) host_fault = true;
}

// A read through the read-only data cache.
template <typename T>
ROI_HD inline T load_readonly(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// A 16-byte read-only load; p must be 16-byte aligned.
ROI_HD inline Raw16 load16_readonly(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  host_check_aligned(p);
  Raw16 r;
  memcpy(&r, p, 16);
  return r;
#endif
}

// A 16-byte store; p must be 16-byte aligned.
ROI_HD inline void store16(void* p, const Raw16& v) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint4*>(p) = v;
#else
  host_check_aligned(p);
  memcpy(p, &v, 16);
#endif
}

// *p += v, atomically. The host runner executes one thread at a time: a plain add.
ROI_HD inline void atomic_add(float* p, float v) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, v);
#else
  *p += v;
#endif
}
ROI_HD inline void atomic_add(double* p, double v) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// p[0..3] += v[0..3]: one float4 atomic on sm_90+ (p 16-byte aligned), else four.
ROI_HD inline void atomic_add4(float* p, float v0, float v1, float v2, float v3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v0, v1, v2, v3));
#elif defined(__CUDA_ARCH__)
  atomicAdd(p, v0);
  atomicAdd(p + 1, v1);
  atomicAdd(p + 2, v2);
  atomicAdd(p + 3, v3);
#else
  host_check_aligned(p);  // the sm_90 path needs it
  p[0] += v0;
  p[1] += v1;
  p[2] += v2;
  p[3] += v3;
#endif
}

ROI_HD inline int popc(unsigned v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// ---------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------

#ifdef __CUDACC__
class DeviceBlock {
 public:
  template <typename T>
  class PerThread {
   public:
    __device__ T& operator[](const Thread&) { return v_; }
    __device__ const T& operator[](const Thread&) const { return v_; }

   private:
    T v_;
  };

  __device__ explicit DeviceBlock(unsigned char* shared) : shared_(shared) {}
  __device__ unsigned char* shared() const { return shared_; }
  __device__ Dim3 grid_dim() const { return Dim3{gridDim.x, gridDim.y, gridDim.z}; }
  __device__ Dim3 block_dim() const { return Dim3{blockDim.x, blockDim.y, blockDim.z}; }
  __device__ Dim3 block_index() const { return Dim3{blockIdx.x, blockIdx.y, blockIdx.z}; }
  __device__ Thread thread() const {
    return Thread{Dim3{gridDim.x, gridDim.y, gridDim.z}, Dim3{blockDim.x, blockDim.y, blockDim.z},
                  Dim3{blockIdx.x, blockIdx.y, blockIdx.z}, Dim3{threadIdx.x, threadIdx.y, threadIdx.z}};
  }
  template <typename F>
  __device__ void each_thread(F&& f) const {
    f(thread());
  }
  __device__ void sync() const { __syncthreads(); }
  // out = the ballot of flag over this thread's warp (full warps only).
  __device__ void ballot(const PerThread<int>& flag, PerThread<unsigned>& out) const {
    const Thread t = thread();
    out[t] = __ballot_sync(0xffffffffu, flag[t] != 0);
  }
  // out = v of the lane `offset` above (own v past the warp's end), as __shfl_down_sync.
  __device__ void shfl_down(const PerThread<double>& v, PerThread<double>& out, int offset) const {
    const Thread t = thread();
    out[t] = __shfl_down_sync(0xffffffffu, v[t], offset);
  }

 private:
  unsigned char* shared_;
};
#else
class HostBlock {
 public:
  template <typename T>
  class PerThread {
   public:
    PerThread() : v_(kMaxThreads) {}
    T& operator[](const Thread& t) { return v_[t.linear()]; }
    const T& operator[](const Thread& t) const { return v_[t.linear()]; }

   private:
    std::vector<T> v_;
  };
  static constexpr int kMaxThreads = 1024;

  HostBlock(Dim3 grid, Dim3 block, Dim3 block_idx, unsigned char* shared)
      : grid_(grid), block_(block), block_idx_(block_idx), shared_(shared) {}
  unsigned char* shared() const { return shared_; }
  Dim3 grid_dim() const { return grid_; }
  Dim3 block_dim() const { return block_; }
  Dim3 block_index() const { return block_idx_; }
  template <typename F>
  void each_thread(F&& f) const {
    for (unsigned z = 0; z < block_.z; ++z) {
      for (unsigned y = 0; y < block_.y; ++y) {
        for (unsigned x = 0; x < block_.x; ++x) f(Thread{grid_, block_, block_idx_, Dim3{x, y, z}});
      }
    }
  }
  void sync() const {}
  void ballot(const PerThread<int>& flag, PerThread<unsigned>& out) const {
    const int n = threads();
    for (int w0 = 0; w0 < n; w0 += kWarpSize) {
      unsigned mask = 0;
      for (int lane = 0; lane < kWarpSize && w0 + lane < n; ++lane) {
        if (flag[at(w0 + lane)] != 0) mask |= 1u << lane;
      }
      for (int lane = 0; lane < kWarpSize && w0 + lane < n; ++lane) out[at(w0 + lane)] = mask;
    }
  }
  void shfl_down(const PerThread<double>& v, PerThread<double>& out, int offset) const {
    const int n = threads();
    for (int w0 = 0; w0 < n; w0 += kWarpSize) {
      // Ascending lanes read lanes above them, which this loop has not written yet: the
      // result equals the simultaneous exchange even when out aliases v.
      for (int lane = 0; lane < kWarpSize && w0 + lane < n; ++lane) {
        const int src = lane + offset < kWarpSize ? lane + offset : lane;
        out[at(w0 + lane)] = v[at(w0 + src)];
      }
    }
  }

 private:
  int threads() const { return static_cast<int>(block_.x * block_.y * block_.z); }
  // The Thread of linear index i.
  Thread at(int i) const {
    const unsigned u = static_cast<unsigned>(i);
    return Thread{grid_, block_, block_idx_, Dim3{u % block_.x, (u / block_.x) % block_.y, u / (block_.x * block_.y)}};
  }
  Dim3 grid_, block_, block_idx_;
  unsigned char* shared_;
};
#endif

// A value per thread of a block (see the top of this file).
template <typename Block, typename T>
using PerThread = typename Block::template PerThread<T>;

}  // namespace JAX_ROI_CUDA_NS
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CUDA_DEVICE_OPS_H_
