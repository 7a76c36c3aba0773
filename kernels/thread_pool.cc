#include "kernels/thread_pool.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace helix::kernels {
namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Short spin before sleeping: decode issues many small kernels back to back, and a futex
// wake costs tens of microseconds. Kept short so an idle pool does not burn cores.
constexpr int kSpinIterations = 2000;

}  // namespace

ThreadPool::ThreadPool(int num_threads)
    : size_(num_threads > 0 ? num_threads
                            : std::max(1, static_cast<int>(std::thread::hardware_concurrency()))) {
  workers_.reserve(size_ - 1);
  for (int i = 1; i < size_; ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) {
    t.join();
  }
}

void ThreadPool::RunChunks() {
  const int64_t base = n_ / num_chunks_;
  const int64_t extra = n_ % num_chunks_;
  for (;;) {
    const int64_t c = next_chunk_.fetch_add(1, std::memory_order_relaxed);
    if (c >= num_chunks_) {
      return;
    }
    // The first `extra` chunks get one more item.
    const int64_t begin = c * base + std::min(c, extra);
    const int64_t end = begin + base + (c < extra ? 1 : 0);
    (*fn_)(begin, end);
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  for (;;) {
    for (int i = 0; i < kSpinIterations && generation_.load(std::memory_order_acquire) == seen;
         ++i) {
      CpuRelax();
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load(std::memory_order_acquire)) {
      return;
    }
    RunChunks();
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_one();
    }
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn) {
  if (n <= 0) {
    return;
  }
  if (size_ == 1 || n == 1) {
    fn(0, n);
    return;
  }
  fn_ = &fn;
  n_ = n;
  num_chunks_ = std::min<int64_t>(n, size_);
  next_chunk_.store(0, std::memory_order_relaxed);
  pending_.store(size_ - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  work_cv_.notify_all();
  RunChunks();
  for (int i = 0; i < kSpinIterations && pending_.load(std::memory_order_acquire) != 0; ++i) {
    CpuRelax();
  }
  if (pending_.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  }
  fn_ = nullptr;
}

void ParallelForMin(ThreadPool* pool, int64_t n, int64_t min_chunk,
                    const std::function<void(int64_t begin, int64_t end)>& fn) {
  if (n <= 0) {
    return;
  }
  min_chunk = std::max<int64_t>(1, min_chunk);
  const int64_t max_chunks = std::max<int64_t>(1, n / min_chunk);
  if (pool == nullptr || pool->size() == 1 || max_chunks <= 1) {
    fn(0, n);
    return;
  }
  if (max_chunks >= pool->size()) {
    pool->ParallelFor(n, fn);
    return;
  }
  // Fewer chunks than threads: split into max_chunks pieces, the surplus threads get none.
  pool->ParallelFor(max_chunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t begin = c * n / max_chunks;
      const int64_t end = (c + 1) * n / max_chunks;
      if (begin < end) {
        fn(begin, end);
      }
    }
  });
}

void ParallelForEachItem(ThreadPool* pool, int64_t n, const std::function<void(int64_t i)>& fn) {
  if (n <= 0) {
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(i);
    }
  };
  if (pool == nullptr || pool->size() == 1 || n == 1) {
    worker(0, 0);
  } else {
    pool->ParallelFor(std::min<int64_t>(n, pool->size()), worker);
  }
}

}  // namespace helix::kernels
