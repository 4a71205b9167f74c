// Shared plumbing of the CPU kernels: a deadlock-free parallel-for on XLA's intra-op thread
// pool, the roi orders and backward work split, and the CPU level table. (Element types and
// the operand checks every device shares: common/.)
#ifndef JAX_ROI_XLA_FFI_CPU_COMMON_H_
#define JAX_ROI_XLA_FFI_CPU_COMMON_H_

#include <algorithm>
#include <cmath>
#include <tuple>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/checks.h"
#include "common/roi_math.h"
#include "cpu/simd.h"
#include "xla/ffi/api/ffi.h"

namespace jax_roi {
namespace cpu {

namespace ffi = xla::ffi;

// Dtype dispatch, names and the operand checks: common/checks.h.

// ---------------------------------------------------------------------------------------
// Parallel for. Work is split into `chunks` items claimed from an atomic counter by the
// calling thread and by up to (threads - 1) helper tasks on XLA's intra-op pool. The caller
// always works too and only waits for chunks that a helper has already claimed, so the
// loop finishes even when no helper ever runs (a busy or absent pool). Helpers that start
// late find no work and touch only the shared state they co-own.
// ---------------------------------------------------------------------------------------

class ParallelState {
 public:
  explicit ParallelState(int64_t chunks) : chunks_(chunks) {}
  // Runs chunks until none is left.
  void Work(const std::function<void(int64_t)>* fn) {
    for (;;) {
      const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks_) return;
      (*fn)(c);
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks_) {
        std::lock_guard<std::mutex> lock(mu_);
        cv_.notify_all();
      }
    }
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_.load(std::memory_order_acquire) >= chunks_; });
  }

 private:
  const int64_t chunks_;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

// Runs fn(chunk) for chunk in [0, chunks), on the pool's threads and the caller's.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const std::function<void(int64_t)>& fn) {
  if (chunks <= 0) return;
  int64_t threads = pool.num_threads();
  int64_t helpers = std::min<int64_t>(std::max<int64_t>(threads, 1), chunks) - 1;
  if (helpers <= 0) {
    for (int64_t c = 0; c < chunks; ++c) fn(c);
    return;
  }
  auto state = std::make_shared<ParallelState>(chunks);
  const std::function<void(int64_t)>* fn_ptr = &fn;
  for (int64_t h = 0; h < helpers; ++h) {
    // A helper dereferences fn_ptr only after claiming a chunk, and every chunk is claimed
    // and finished before the caller returns from Wait(), so fn outlives its uses.
    pool.Schedule([state, fn_ptr]() { state->Work(fn_ptr); });
  }
  state->Work(fn_ptr);
  state->Wait();
}

// Large outputs are fresh pages from the allocator: every 4 KiB page faults on first touch,
// which on some machines costs more than the kernel itself. Ask for transparent huge pages
// on the 2 MiB-aligned interior of a large output before writing it (advisory only; no
// effect where THP is off).
inline void AdviseHugePages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// An order of the rois in which neighbours on the map come one after another (each thread
// takes a run of it), so that the features a roi reads are often still in cache from the
// previous one (about a quarter less time on the box-head benchmark). key(k) -> (map index
// or -1 for a dead roi, centre y, centre x in feature pixels); each map is cut in bands of
// rows, walked by x. Output positions do not change.
template <typename F>
std::vector<int64_t> LocalityOrder(int64_t num_rois, F&& key) {
  constexpr double kBand = 16.0;  // feature rows per band (measured: 8 to 32 do equally well)
  struct Entry {
    int64_t map;
    double band, x;
    int64_t k;
  };
  std::vector<Entry> e(num_rois);
  for (int64_t k = 0; k < num_rois; ++k) {
    auto [map, y, x] = key(k);
    e[k] = Entry{map, map < 0 || !roi_finite(y) ? 0.0 : std::floor(y / kBand), roi_finite(x) ? x : 0.0, k};
  }
  std::stable_sort(e.begin(), e.end(), [](const Entry& a, const Entry& b) {
    if (a.map != b.map) return a.map < b.map;
    if (a.band != b.band) return a.band < b.band;
    return a.x < b.x;
  });
  std::vector<int64_t> order(num_rois);
  for (int64_t i = 0; i < num_rois; ++i) order[i] = e[i].k;
  return order;
}

// Rois grouped by the image (of d_features) they write: order[start[b], start[b+1]) lists
// the live rois of image b, in LocalityOrder. key(k) -> (image or -1 for a dead roi, level,
// centre y, centre x in feature pixels).
struct ImageBuckets {
  std::vector<int64_t> start, order;
  template <typename F>
  void Build(int64_t num_rois, int64_t num_images, int64_t num_levels, F&& key) {
    std::vector<int64_t> image(num_rois);
    std::vector<int64_t> sorted = LocalityOrder(num_rois, [&](int64_t k) {
      auto [b, l, y, x] = key(k);
      image[k] = b;
      return std::make_tuple(b < 0 ? int64_t{-1} : b * num_levels + l, y, x);
    });
    start.assign(num_images + 1, 0);
    for (int64_t k = 0; k < num_rois; ++k) {
      if (image[k] >= 0) ++start[image[k] + 1];
    }
    for (int64_t b = 0; b < num_images; ++b) start[b + 1] += start[b];
    // Dead rois sort first (map -1); the live ones follow grouped by image.
    const int64_t dead = num_rois - start[num_images];
    order.assign(sorted.begin() + dead, sorted.end());
  }
};

// How the backward splits its work: items (image b, channel block j), each owning one
// channel block of one image of d_features (race-free, no atomics). Full-width channel
// blocks keep each pixel's channels contiguous (cache-friendly scatter); blocks are split
// only as far as needed to give every thread work.
struct BackwardSplit {
  int64_t blocks = 1, width = 0;
  BackwardSplit(int64_t channels, int64_t images, int64_t threads) {
    const int64_t want = images > 0 ? (threads + images - 1) / images : 1;  // an item per thread
    const int64_t max_blocks = std::max<int64_t>(1, channels / 32);  // blocks of >= 32 channels
    blocks = std::max<int64_t>(1, std::min(want, max_blocks));
    width = (channels + blocks - 1) / blocks;
    width = (width + 15) / 16 * 16;  // whole vectors
    blocks = width > 0 ? (channels + width - 1) / width : 1;
  }
};

inline int64_t PoolThreads(ffi::ThreadPool& pool) { return std::max<int64_t>(pool.num_threads(), 1); }

// ---------------------------------------------------------------------------------------
// Feature levels
// ---------------------------------------------------------------------------------------

struct Level {
  const void* data;
  int64_t batch, height, width;
  double scale;
};

// Checks the remaining args as L feature levels [B, H_l, W_l, C] of one dtype, B and C
// (common/checks.h) and records them.
inline ffi::Error DecodeLevels(const ffi::RemainingArgs& args, size_t first, size_t count,
                               ffi::DataType* dtype, int64_t* channels, Level* levels,
                               const char* op) {
  int64_t batch = 0;
  return CheckLevels(args, first, count, op, dtype, &batch, channels, [&](size_t l, const ffi::AnyBuffer& f) {
    auto d = f.dimensions();
    levels[l] = Level{f.untyped_data(), d[0], d[1], d[2], 1.0};
  });
}

}  // namespace cpu
}  // namespace jax_roi

#endif  // JAX_ROI_XLA_FFI_CPU_COMMON_H_
