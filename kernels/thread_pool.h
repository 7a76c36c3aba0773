// ThreadPool: the CPU "stream" every CPU kernel takes. Persistent workers plus the calling
// thread run ParallelFor over contiguous chunks of an index range.
// Thread-safety: ParallelFor may be called by one thread at a time per pool (the engine
// thread); concurrent callers must use separate pools. Construction/destruction are not
// concurrent with ParallelFor.
#ifndef HELIX_KERNELS_THREAD_POOL_H_
#define HELIX_KERNELS_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace helix::kernels {

class ThreadPool {
 public:
  // num_threads counts the calling thread: a pool of size N starts N - 1 workers.
  // 0 means std::thread::hardware_concurrency() (at least 1).
  explicit ThreadPool(int num_threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return size_; }

  // Splits [0, n) into at most size() contiguous, non-empty chunks of near-equal length and
  // runs fn(begin, end) on each, the calling thread taking a share; returns when all are
  // done. n <= 0 does nothing; n == 1 or size() == 1 runs fn(0, n) inline.
  // REQUIRES: fn does not throw and does not call ParallelFor on this pool.
  void ParallelFor(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

 private:
  void WorkerLoop();
  void RunChunks();

  const int size_;
  std::vector<std::thread> workers_;

  std::mutex mu_;
  std::condition_variable work_cv_;  // workers wait for a new generation_ or stop_
  std::condition_variable done_cv_;  // the caller waits for pending_ == 0
  // Bumped (under mu_, release) to publish a job; workers acquire-load it.
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> pending_{0};  // workers that have not finished the current job

  // The current job: written by the caller before generation_ is bumped, read-only until
  // every worker has checked in through pending_.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t num_chunks_ = 0;
  std::atomic<int64_t> next_chunk_{0};
};

// Runs fn over [0, n) on pool with chunks of at least min_chunk items (fewer chunks than
// threads when n is small), inline when pool is null or the range is one chunk.
void ParallelForMin(ThreadPool* pool, int64_t n, int64_t min_chunk,
                    const std::function<void(int64_t begin, int64_t end)>& fn);

// Runs fn(i) for every i in [0, n), handing the items out one at a time to the pool's threads
// (for items of uneven cost); inline when pool is null, has one thread, or n is 1.
void ParallelForEachItem(ThreadPool* pool, int64_t n, const std::function<void(int64_t i)>& fn);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_THREAD_POOL_H_
