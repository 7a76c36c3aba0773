// A CPU emulation of the small part of CUDA that kernels/cuda/attention_cuda.cu uses, so that
// its kernels (index math, pipeline stages, shuffles, barriers) can be checked against the CPU
// reference on a machine without a GPU. Test-only; include before the .cu file, with
// HELIX_CUDA_EMULATION defined. Each thread block runs as blockDim.x host threads with real
// barriers (on a pool of host threads kept between launches); cp.async copies synchronously.
// One grid at a time (not thread-safe).
#ifndef HELIX_TESTS_GPU_CUDA_EMU_H_
#define HELIX_TESTS_GPU_CUDA_EMU_H_

#ifndef HELIX_CUDA_EMULATION
#error "define HELIX_CUDA_EMULATION before including cuda_emu.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

namespace helix_emu {

struct Block {
  std::unique_ptr<std::barrier<>> cta;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<unsigned char> dynamic_smem, static_smem;
  std::vector<uint64_t> exchange;  // one slot per thread for shuffles
};

inline thread_local uint3 t_thread_idx, t_block_idx;
inline thread_local Block* t_block = nullptr;
inline dim3 g_block_dim, g_grid_dim;

inline thread_local size_t t_static_off = 0;

inline unsigned char* DynamicSmem() { return t_block->dynamic_smem.data(); }
// Every thread declares a kernel's shared variables in the same order, so a per-thread bump
// offset gives each variable the same storage in all threads of the block.
inline void* StaticSmem(size_t bytes) {
  const size_t off = (t_static_off + 15) / 16 * 16;
  t_static_off = off + bytes;
  return t_block->static_smem.data() + off;
}
inline void SyncThreads() { t_block->cta->arrive_and_wait(); }
inline void SyncWarp() { t_block->warp[t_thread_idx.x / 32]->arrive_and_wait(); }

template <typename T>
T Exchange(T v, int src_lane_of_warp) {
  static_assert(sizeof(T) <= 8);
  const int tid = static_cast<int>(t_thread_idx.x);
  const int warp = tid / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  t_block->exchange[tid] = bits;
  t_block->warp[warp]->arrive_and_wait();
  T out;
  const uint64_t got = t_block->exchange[warp * 32 + src_lane_of_warp];
  std::memcpy(&out, &got, sizeof(T));
  t_block->warp[warp]->arrive_and_wait();
  return out;
}

// Host threads that play the threads of one block at a time, kept between launches (creating
// a thread per CUDA thread per block made launches cost milliseconds). Workers are detached and
// wait on a condition variable; a forked child (tests fork Helix ranks) cannot use its parent's
// workers, so the pool belongs to a pid and a child starts its own (the old one is leaked).
class ThreadPool {
 public:
  // Runs body(t) on `threads` workers, t = 0..threads-1, and returns when all are done.
  void Run(int threads, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> lock(mu_);
    while (static_cast<int>(started_) < threads) {
      const int id = static_cast<int>(started_++);
      std::thread([this, id] { Work(id); }).detach();
    }
    body_ = &body;
    active_ = threads;
    remaining_ = threads;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }
  static ThreadPool& ForThisProcess() {
    static std::atomic<ThreadPool*> pool{nullptr};
    static std::atomic<pid_t> owner{0};
    ThreadPool* p = pool.load();
    if (p == nullptr || owner.load() != getpid()) {
      p = new ThreadPool();  // a parent's pool, if any, is leaked: its workers are not here
      pool.store(p);
      owner.store(getpid());
    }
    return *p;
  }

 private:
  void Work(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      const std::function<void(int)>* body = body_;
      lock.unlock();
      (*body)(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* body_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, remaining_ = 0;
  size_t started_ = 0;
};

// Runs kernel(args...) over the grid; dynamic shared memory of `smem` bytes per block.
template <typename... P, typename... A>
void Launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  g_block_dim = block;
  g_grid_dim = grid;
  const int threads = static_cast<int>(block.x);
  ThreadPool& pool = ThreadPool::ForThisProcess();
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b;
      b.cta = std::make_unique<std::barrier<>>(threads);
      for (int w = 0; w < (threads + 31) / 32; ++w) {
        b.warp.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
      }
      b.dynamic_smem.assign(smem + 16, 0xcd);  // garbage, as on the device
      b.static_smem.assign(64 * 1024, 0xcd);
      b.exchange.assign(threads, 0);
      const std::function<void(int)> body = [&](int t) {
        t_thread_idx = {static_cast<unsigned>(t), 0, 0};
        t_block_idx = {bx, by, 0};
        t_block = &b;
        t_static_off = 0;
        kernel(args...);
      };
      pool.Run(threads, body);
    }
  }
}

}  // namespace helix_emu

#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::helix_emu::t_thread_idx)
#define blockIdx (::helix_emu::t_block_idx)
#define blockDim (::helix_emu::g_block_dim)
#define gridDim (::helix_emu::g_grid_dim)
#define __syncthreads() ::helix_emu::SyncThreads()
inline void __syncwarp(unsigned = 0xffffffffu) { ::helix_emu::SyncWarp(); }
#define HELIX_DYNAMIC_SMEM(name) unsigned char* name = ::helix_emu::DynamicSmem()
#define HELIX_STATIC_SMEM(T, name) T& name = *static_cast<T*>(::helix_emu::StaticSmem(sizeof(T)))

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return ::helix_emu::Exchange(v, static_cast<int>(threadIdx.x % 32) ^ mask);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return ::helix_emu::Exchange(v, src & 31);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int delta) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const T other = ::helix_emu::Exchange(v, lane >= delta ? lane - delta : lane);
  return other;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
using std::isnan;
using std::max;
using std::min;

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

template <typename T>
T atomicAdd(T* addr, T v) {
  return std::atomic_ref<T>(*addr).fetch_add(v);
}

inline void CpAsync16(void* smem, const void* gmem, bool valid) {
  if (valid) {
    std::memcpy(smem, gmem, 16);
  } else {
    std::memset(smem, 0, 16);
  }
}
inline void BulkPrefetchL2(const void*, unsigned) {}
inline void CpAsyncCommit() {}
template <int N>
inline void CpAsyncWait() {}

#endif  // HELIX_TESTS_GPU_CUDA_EMU_H_
