#include "kernels/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace helix::kernels {
namespace {

// Runs ParallelFor and checks every index in [0, n) is covered exactly once by at most
// pool.size() contiguous non-empty chunks; returns the sum of the indices.
int64_t CheckedSum(ThreadPool& pool, int64_t n) {
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> chunks;
  std::vector<std::atomic<int>> hits(static_cast<size_t>(std::max<int64_t>(n, 0)));
  std::atomic<int64_t> sum{0};
  pool.ParallelFor(n, [&](int64_t b, int64_t e) {
    int64_t local = 0;
    for (int64_t i = b; i < e; ++i) {
      hits[i].fetch_add(1);
      local += i;
    }
    sum.fetch_add(local);
    std::lock_guard<std::mutex> lock(mu);
    chunks.emplace_back(b, e);
  });
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(hits[i].load(), 1) << "index " << i;
  }
  EXPECT_LE(static_cast<int64_t>(chunks.size()), pool.size());
  for (const auto& [b, e] : chunks) {
    EXPECT_LT(b, e);
  }
  if (n > 0) {
    EXPECT_GE(chunks.size(), 1u);
  } else {
    EXPECT_TRUE(chunks.empty());
  }
  return sum.load();
}

TEST(ThreadPoolTest, SumsOverRanges) {
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (int64_t n : {0, 1, 2, 3, 5, 1000, 100003}) {
      EXPECT_EQ(CheckedSum(pool, n), n * (n - 1) / 2) << "threads " << threads << " n " << n;
    }
  }
}

TEST(ThreadPoolTest, NSmallerThanThreads) {
  ThreadPool pool(4);
  for (int64_t n : {1, 2, 3}) {
    EXPECT_EQ(CheckedSum(pool, n), n * (n - 1) / 2);
  }
}

TEST(ThreadPoolTest, ManyBackToBackCalls) {
  ThreadPool pool(4);
  for (int rep = 0; rep < 2000; ++rep) {
    std::atomic<int64_t> sum{0};
    pool.ParallelFor(rep % 9, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        sum.fetch_add(i + 1);
      }
    });
    const int64_t n = rep % 9;
    ASSERT_EQ(sum.load(), n * (n + 1) / 2) << "rep " << rep;
  }
}

TEST(ThreadPoolTest, ChunksRunConcurrently) {
  // Every chunk waits until all have started: this can only finish if the pool runs them on
  // distinct threads at the same time.
  constexpr int kThreads = 4;
  ThreadPool pool(kThreads);
  std::atomic<int> started{0};
  std::atomic<bool> timed_out{false};
  std::mutex mu;
  std::vector<std::thread::id> ids;
  pool.ParallelFor(kThreads, [&](int64_t, int64_t) {
    started.fetch_add(1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (started.load() < kThreads) {
      if (std::chrono::steady_clock::now() > deadline) {
        timed_out = true;
        break;
      }
      std::this_thread::yield();
    }
    std::lock_guard<std::mutex> lock(mu);
    ids.push_back(std::this_thread::get_id());
  });
  EXPECT_FALSE(timed_out.load());
  ASSERT_EQ(ids.size(), static_cast<size_t>(kThreads));
  for (int i = 0; i < kThreads; ++i) {
    for (int j = i + 1; j < kThreads; ++j) {
      EXPECT_NE(ids[i], ids[j]);
    }
  }
}

TEST(ThreadPoolTest, SizeOfOneRunsInline) {
  ThreadPool pool(1);
  std::thread::id id;
  pool.ParallelFor(100, [&](int64_t b, int64_t e) {
    EXPECT_EQ(b, 0);
    EXPECT_EQ(e, 100);
    id = std::this_thread::get_id();
  });
  EXPECT_EQ(id, std::this_thread::get_id());
}

TEST(ThreadPoolTest, ZeroMeansHardwareConcurrency) {
  ThreadPool pool(0);
  EXPECT_EQ(pool.size(), std::max(1, static_cast<int>(std::thread::hardware_concurrency())));
  EXPECT_EQ(CheckedSum(pool, 777), 777 * 776 / 2);
}

TEST(ThreadPoolTest, ParallelForMinRespectsMinimumChunk) {
  ThreadPool pool(4);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    for (int64_t n : {0, 1, 5, 10, 15, 25, 40, 1001}) {
      std::mutex mu;
      std::vector<std::pair<int64_t, int64_t>> chunks;
      std::atomic<int64_t> sum{0};
      ParallelForMin(p, n, 10, [&](int64_t b, int64_t e) {
        int64_t local = 0;
        for (int64_t i = b; i < e; ++i) {
          local += i;
        }
        sum.fetch_add(local);
        std::lock_guard<std::mutex> lock(mu);
        chunks.emplace_back(b, e);
      });
      EXPECT_EQ(sum.load(), n * (n - 1) / 2);
      for (const auto& [b, e] : chunks) {
        EXPECT_LT(b, e);
        if (n >= 10) {
          EXPECT_GE(e - b, 10) << "n " << n;
        }
      }
    }
  }
}

}  // namespace
}  // namespace helix::kernels
