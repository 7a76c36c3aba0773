// A CPU emulation of the small part of CUDA that kernels/cuda/attention_cuda.cu uses, so that
// its kernels (index math, pipeline stages, shuffles, barriers) can be checked against the CPU
// reference on a machine without a GPU. Test-only; include before the .cu file, with
// HELIX_CUDA_EMULATION defined. Each thread block runs as blockDim.x fibers on the launching
// host thread, switching at barriers; a cp.async copy fills its destination with NaN bytes when
// issued and lands only at the wait that covers it (see CopyMode). One grid at a time per host
// thread.
#ifndef HELIX_TESTS_GPU_CUDA_EMU_H_
#define HELIX_TESTS_GPU_CUDA_EMU_H_

#ifndef HELIX_CUDA_EMULATION
#error "define HELIX_CUDA_EMULATION before including cuda_emu.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

// Switching fibers. glibc's swapcontext saves and restores the signal mask, a system call each
// way, which made the switch most of an emulated kernel's time. On x86-64 the switch is a few
// instructions instead: it saves the registers a call must preserve (rbx, rbp, r12-r15, the SSE
// and x87 control words) on the current stack, stores the stack pointer, loads the other one and
// pops its registers (helix_emu_switch below). Under a sanitizer (which must be told about stack
// switches; its swapcontext interceptor is) and elsewhere: ucontext.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define HELIX_EMU_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define HELIX_EMU_SANITIZED 1
#endif
#if defined(__x86_64__) && !defined(HELIX_EMU_SANITIZED)
#define HELIX_EMU_STACK_SWITCH 1
// helix_emu_switch(&from_sp, to_sp): see above. Weak, as every file that includes this header
// defines it (the linker keeps one).
extern "C" void helix_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .weak helix_emu_switch
  .type helix_emu_switch, @function
helix_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size helix_emu_switch, .-helix_emu_switch
  .popsection
)");
#endif

namespace helix_emu {

// A fiber's saved execution state (or the scheduler's, while a fiber runs).
struct Context {
#ifdef HELIX_EMU_STACK_SWITCH
  void* sp = nullptr;  // its stack pointer, its saved registers on top
#else
  ucontext_t uc;
#endif
};

// Saves the running context into *from and resumes *to.
inline void SwitchContext(Context* from, Context* to) {
#ifdef HELIX_EMU_STACK_SWITCH
  helix_emu_switch(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
}

// Makes *c start entry() on the stack [stack, stack + size) when first switched to; entry never
// returns (it switches away for good when done).
inline void StartContext(Context* c, char* stack, size_t size, void (*entry)()) {
#ifdef HELIX_EMU_STACK_SWITCH
  // What helix_emu_switch pops, from the lowest address: the two control words (the current
  // ones), six registers (zero), then the address `ret` goes to. The return address sits
  // 16-byte aligned, so that entry starts with the stack as a call leaves it (rsp = 8 mod 16).
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);
  slot[0] = reinterpret_cast<uint64_t>(entry);
  slot[1] = 0;
  uint64_t* p = slot - 6;
  for (int i = 0; i < 6; ++i) p[i] = 0;
  p -= 2;  // [0]: x87 control word, [1]: MXCSR
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  p[0] = fpucw;
  p[1] = mxcsr;
  c->sp = p;
#else
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
#endif
}

// Each CUDA thread of a block is a fiber on the launching host thread: fibers run one at a time
// and switch only at barriers (__syncthreads, __syncwarp, the shuffles), which keeps the
// barriers' semantics and costs a context switch instead of a host thread wake-up.
// A cp.async copy issued and not yet landed (deferred mode): its 16 bytes, read when issued.
struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  unsigned tid = 0;
  size_t static_off = 0;
  int wait = 0;  // 0: runnable; 1: at the block barrier; 2: at its warp's barrier
  uint64_t wait_gen = 0;
  bool done = false;
  bool pdl_waited = false;                       // reached PdlEnter (counted only with a PdlHook)
  std::vector<PendingCopy> open_copies;          // issued, not committed to a group yet
  std::vector<std::vector<PendingCopy>> groups;  // committed and pending, oldest first
};

// When an asynchronous copy (cp.async, and cp.async.bulk onto an mbarrier) writes shared
// memory. kDeferred (the default): the copy reads its source when issued, fills its destination
// with 0xff bytes (NaN in f32, f16 and bf16: "in flight", neither the old nor the new value) and
// writes the data only when it is waited for: a cp.async when the issuing thread's
// cp.async.wait_group takes its group, a bulk copy when a thread first polls its mbarrier. So a
// read before the wait that covers the copy (a wait on too few groups, a thread reading another's
// copy without that thread's wait and a barrier between, a wait on the wrong mbarrier) and a
// buffer refilled while a thread still reads it both read NaN. A thread that ends with cp.async
// copies pending, or a block that ends with bulk copies nobody waited for, aborts.
// kImmediate (HELIX_EMU_CP_ASYNC=immediate): a copy lands as it is issued, as before.
enum class CopyMode { kImmediate, kDeferred };
inline CopyMode CopyModeFromEnv() {
  const char* v = std::getenv("HELIX_EMU_CP_ASYNC");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "deferred") == 0) return CopyMode::kDeferred;
  if (std::strcmp(v, "immediate") == 0) return CopyMode::kImmediate;
  std::fprintf(stderr, "cuda_emu: HELIX_EMU_CP_ASYNC=%s is not immediate or deferred\n", v);
  std::abort();
}
inline const CopyMode g_copy_mode = CopyModeFromEnv();
inline bool DeferCopies() { return g_copy_mode == CopyMode::kDeferred; }
constexpr unsigned char kInFlight = 0xff;
// Bulk copies issued and not yet delivered (kDeferred), per mbarrier: destination and data.
struct PendingBulk {
  void* dst;
  std::vector<unsigned char> bytes;
};
inline std::map<const uint64_t*, std::vector<PendingBulk>>& PendingBulkCopies() {
  static thread_local std::map<const uint64_t*, std::vector<PendingBulk>> pending;
  return pending;
}

inline void LandCopies(const std::vector<PendingCopy>& copies) {
  for (const PendingCopy& c : copies) std::memcpy(c.dst, c.bytes, 16);
}
// Lands the calling thread's committed groups but the newest `keep`.
inline void LandGroups(Fiber& f, size_t keep) {
  while (f.groups.size() > keep) {
    LandCopies(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

constexpr int kWords = 8;

struct Block {
  std::vector<unsigned char> dynamic_smem, static_smem;
  std::vector<uint64_t> exchange;  // one slot per thread for shuffles
  std::vector<uint32_t> words;     // kWords per thread: operands of the warp-collective mma
  int threads = 0;
  int cta_count = 0;
  uint64_t cta_gen = 0;
  std::vector<int> warp_count, warp_size;
  std::vector<uint64_t> warp_gen;
};

inline thread_local uint3 t_thread_idx, t_block_idx;
inline thread_local Block* t_block = nullptr;
inline thread_local Fiber* t_fiber = nullptr;
inline thread_local Context* t_scheduler = nullptr;
inline thread_local const std::function<void()>* t_body = nullptr;
inline thread_local dim3 g_block_dim, g_grid_dim;

inline unsigned char* DynamicSmem() { return t_block->dynamic_smem.data(); }
// Every thread declares a kernel's shared variables in the same order, so a per-thread bump
// offset gives each variable the same storage in all threads of the block.
inline void* StaticSmem(size_t bytes) {
  const size_t off = (t_fiber->static_off + 15) / 16 * 16;
  t_fiber->static_off = off + bytes;
  return t_block->static_smem.data() + off;
}
inline void Yield() { SwitchContext(&t_fiber->ctx, t_scheduler); }
inline void SyncThreads() {
  Block& b = *t_block;
  if (++b.cta_count == b.threads) {  // the last to arrive releases the others
    b.cta_count = 0;
    ++b.cta_gen;
    return;
  }
  t_fiber->wait = 1;
  t_fiber->wait_gen = b.cta_gen;
  Yield();
}
// Programmatic dependent launch, for tests. With a hook set (g_pdl_hook, process-wide),
// hook->copies counts the cp.async copies each thread issues before it reaches PdlEnter
// (griddepcontrol.wait). With its functions set too (one launching host thread only), PdlEnter
// is a barrier of the block's threads (every thread must reach it) where the kernel before is
// taken to end: hook->before_block() runs before each block of a launch (e.g. poisons what that
// kernel writes) and hook->at_wait() when the block's last thread reaches PdlEnter (e.g. writes
// it), so that anything a block reads before its PdlEnter is read "while the kernel before
// still runs". Without a hook PdlEnter does nothing.
struct PdlHook {
  std::function<void()> before_block, at_wait;
  std::atomic<int64_t> copies{0};  // cp.async issued before PdlEnter, over the threads
};
inline std::atomic<PdlHook*> g_pdl_hook{nullptr};
inline void PdlWait() {
  PdlHook* h = g_pdl_hook.load();
  if (h == nullptr) return;
  t_fiber->pdl_waited = true;
  if (!h->before_block && !h->at_wait) return;
  if (t_block->cta_count + 1 == t_block->threads) {  // the last to arrive: the kernel before ends
    if (h->at_wait) h->at_wait();
  }
  SyncThreads();
}

inline void SyncWarp() {
  Block& b = *t_block;
  const int w = static_cast<int>(t_thread_idx.x / 32);
  if (++b.warp_count[w] == b.warp_size[w]) {
    b.warp_count[w] = 0;
    ++b.warp_gen[w];
    return;
  }
  t_fiber->wait = 2;
  t_fiber->wait_gen = b.warp_gen[w];
  Yield();
}

template <typename T>
T Exchange(T v, int src_lane_of_warp) {
  static_assert(sizeof(T) <= 8);
  const int tid = static_cast<int>(t_thread_idx.x);
  const int warp = tid / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  t_block->exchange[tid] = bits;
  SyncWarp();
  T out;
  const uint64_t got = t_block->exchange[warp * 32 + src_lane_of_warp];
  std::memcpy(&out, &got, sizeof(T));
  SyncWarp();
  return out;
}

// Lane i of the calling thread's warp: its slot of the warp-collective operand words.
inline uint32_t* LaneWords(int lane) {
  const int warp = static_cast<int>(t_thread_idx.x) / 32;
  return &t_block->words[static_cast<size_t>(warp * 32 + lane) * kWords];
}

template <typename T>
float HalfBits(uint32_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    uint32_t u = bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    __half_raw r;
    r.x = static_cast<unsigned short>(bits);
    return __half2float(__half(r));
  }
}

// The 16-bit element `half` (0: low, 1: high) of word `reg` of lane `lane`'s operand words.
template <typename T>
float Elem(int lane, int reg, int half) {
  return HalfBits<T>(LaneWords(lane)[reg] >> (16 * half));
}

[[noreturn]] inline void FiberMain() {
  (*t_body)();
  if (!t_fiber->groups.empty() || !t_fiber->open_copies.empty()) {
    std::fprintf(stderr, "cuda_emu: thread %u ended with cp.async copies not waited for\n",
                 t_fiber->tid);
    std::abort();
  }
  t_fiber->done = true;
  SwitchContext(&t_fiber->ctx, t_scheduler);  // never resumed
  std::abort();
}

// Fiber stacks, kept between launches on this host thread.
constexpr size_t kStack = 128 * 1024;
inline char* FiberStack(size_t i) {
  static thread_local std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= i) stacks.emplace_back(new char[kStack]);
  return stacks[i].get();
}

// Runs kernel(args...) over the grid; dynamic shared memory of `smem` bytes per block.
// (GCC treats swapcontext like setjmp and warns that locals "might be clobbered"; each switch
// back here restores the scheduler's saved context, registers included, so they are not.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
template <typename... P, typename... A>
void Launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  g_block_dim = block;
  g_grid_dim = grid;
  const int threads = static_cast<int>(block.x);
  const std::function<void()> body = [&] { kernel(args...); };
  std::vector<Fiber> fibers(threads);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b;
      b.threads = threads;
      for (int w = 0; w < (threads + 31) / 32; ++w) {
        b.warp_size.push_back(std::min(32, threads - 32 * w));
      }
      b.warp_count.assign(b.warp_size.size(), 0);
      b.warp_gen.assign(b.warp_size.size(), 0);
      b.dynamic_smem.assign(smem + 16, 0xcd);  // garbage, as on the device
      b.static_smem.assign(64 * 1024, 0xcd);
      b.exchange.assign(threads, 0);
      b.words.assign(static_cast<size_t>(threads) * kWords, 0);
      Context scheduler;
      for (int t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        f = Fiber{};
        f.tid = static_cast<unsigned>(t);
        f.stack = FiberStack(t);
        StartContext(&f.ctx, f.stack, kStack, FiberMain);
      }
      if (PdlHook* h = g_pdl_hook.load(); h != nullptr && h->before_block) {
        h->before_block();
      }
      t_block = &b;
      t_block_idx = {bx, by, 0};
      t_scheduler = &scheduler;
      t_body = &body;
      // Even blocks run their threads in turn, one barrier interval each. Odd blocks run one warp
      // at a time, last warp first and its lanes last to first, until all of its threads wait at
      // __syncthreads or have ended: a warp gets ahead of the others by any number of warp-level
      // steps. Code relying on an order between barriers (a missing __syncthreads, a buffer
      // refilled while another warp may still read it) sees both orders.
      const bool greedy = ((bx + by) & 1) != 0;
      const int warps = (threads + 31) / 32;
      int left = threads;
      const auto runnable = [&](const Fiber& f) {
        return !f.done && !(f.wait == 1 && b.cta_gen == f.wait_gen) &&
               !(f.wait == 2 && b.warp_gen[f.tid / 32] == f.wait_gen);
      };
      const auto run = [&](Fiber& f) {
        f.wait = 0;
        t_fiber = &f;
        t_thread_idx = {f.tid, 0, 0};
        SwitchContext(&scheduler, &f.ctx);
        if (f.done) --left;
      };
      while (left > 0) {
        bool ran = false;
        if (!greedy) {
          for (int k = 0; k < threads; ++k) {
            if (runnable(fibers[k])) {
              run(fibers[k]);
              ran = true;
            }
          }
        } else {
          for (int w = warps - 1; w >= 0; --w) {
            for (bool progressed = true; progressed;) {
              progressed = false;
              for (int k = std::min(threads, 32 * w + 32) - 1; k >= 32 * w; --k) {
                if (runnable(fibers[k])) {
                  run(fibers[k]);
                  ran = progressed = true;
                }
              }
            }
          }
        }
        if (!ran) {
          std::fprintf(stderr, "cuda_emu: deadlock in block (%u, %u): no thread can proceed\n", bx,
                       by);
          std::abort();
        }
      }
      if (!PendingBulkCopies().empty()) {
        std::fprintf(stderr, "cuda_emu: block (%u, %u) ended with bulk copies nobody waited for\n",
                     bx, by);
        std::abort();
      }
    }
  }
}

#pragma GCC diagnostic pop

}  // namespace helix_emu

// The device the kernels' host code asks about: one like the lent H100 (132 SMs, sm_90, 227 KiB
// of opt-in shared memory per block, one thread block per SM), so that the emulated kernels take
// the paths they take there (e.g. the automatic split-KV, which divides the context among the
// SMs). Only these queries: device memory and launches are the test's own.
namespace helix_emu {
inline cudaError_t GetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t DeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = 132;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = 227 * 1024;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}
inline cudaError_t OccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* /*fn*/,
                                                             int /*threads*/, size_t /*smem*/) {
  *blocks = 1;
  return cudaSuccess;
}
}  // namespace helix_emu
#define cudaGetDevice ::helix_emu::GetDevice
#define cudaDeviceGetAttribute ::helix_emu::DeviceGetAttribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor \
  ::helix_emu::OccupancyMaxActiveBlocksPerMultiprocessor

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
  if (helix_emu::PdlHook* h = helix_emu::g_pdl_hook.load();
      h != nullptr && !helix_emu::t_fiber->pdl_waited) {
    ++h->copies;
  }
  helix_emu::PendingCopy c{smem, {}};
  if (valid) std::memcpy(c.bytes, gmem, 16);  // else zeros
  if (helix_emu::DeferCopies()) {
    std::memset(smem, helix_emu::kInFlight, 16);
    helix_emu::t_fiber->open_copies.push_back(c);
  } else {
    std::memcpy(smem, c.bytes, 16);
  }
}
// An L2 prefetch changes nothing here; it aborts on a range cp.async.bulk.prefetch refuses (a
// start not 16-byte aligned, a length not a multiple of 16) and is shown to the test's hook.
namespace helix_emu {
inline std::mutex g_prefetch_mu;
inline std::function<void(const void*, unsigned)> g_prefetch_hook;  // under g_prefetch_mu
}  // namespace helix_emu
inline void BulkPrefetchL2(const void* gmem, unsigned bytes) {
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0 || bytes % 16 != 0) {
    std::fprintf(stderr, "cuda_emu: cp.async.bulk.prefetch.L2 of %u bytes at %p breaks its rules\n",
                 bytes, gmem);
    std::abort();
  }
  std::lock_guard<std::mutex> lock(helix_emu::g_prefetch_mu);
  if (helix_emu::g_prefetch_hook) {
    helix_emu::g_prefetch_hook(gmem, bytes);
  }
}
// mbarriers with bulk copies: a copy lands when it is issued, and a waiter yields to the other
// threads until the barrier's phase has completed, so a thread that reads a slot before its copy
// was issued finds the barrier still pending, as on the device. A phase completes when its
// arrivals are in and the bytes announced by arrive.expect_tx have all been delivered: bytes
// beyond the announced count, and copies that break cp.async.bulk's alignment rules, abort.
namespace helix_emu {
struct Mbar {  // the barrier word's meaning here
  uint16_t arrivals, pending;
  uint32_t phase;  // completed phases
};
static_assert(sizeof(Mbar) == 8);
inline int64_t& MbarTx(const uint64_t* bar) {  // announced bytes not yet delivered
  static thread_local std::map<const uint64_t*, int64_t> tx;
  return tx[bar];
}
inline void MbarFail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::abort();
}
inline void MbarMaybeComplete(uint64_t* bar) {
  Mbar m;
  std::memcpy(&m, bar, 8);
  if (m.pending != 0 || MbarTx(bar) != 0) return;
  m.pending = m.arrivals;
  ++m.phase;
  std::memcpy(bar, &m, 8);
}
// Delivers a bulk copy's bytes to shared memory and counts them on its barrier.
inline void DeliverBulk(void* smem, const void* data, unsigned bytes, uint64_t* bar) {
  std::memcpy(smem, data, bytes);
  int64_t& tx = MbarTx(bar);
  tx -= bytes;
  if (tx < 0) MbarFail("a bulk copy delivered more bytes than its barrier expects");
  MbarMaybeComplete(bar);
}
}  // namespace helix_emu

inline void MbarInit(uint64_t* bar, unsigned arrivals) {
  const ::helix_emu::Mbar m{static_cast<uint16_t>(arrivals), static_cast<uint16_t>(arrivals), 0};
  std::memcpy(bar, &m, 8);
  ::helix_emu::MbarTx(bar) = 0;
}
inline void FenceMbarInit() {}
inline void FenceProxyAsync() {}
inline void MbarArriveExpectTx(uint64_t* bar, unsigned bytes) {
  ::helix_emu::Mbar m;
  std::memcpy(&m, bar, 8);
  if (m.pending == 0) ::helix_emu::MbarFail("mbarrier arrive with no arrival pending");
  --m.pending;
  std::memcpy(bar, &m, 8);
  ::helix_emu::MbarTx(bar) += bytes;
  ::helix_emu::MbarMaybeComplete(bar);
}
inline void BulkCopyG2S(void* smem, const void* gmem, unsigned bytes, uint64_t* bar) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0 ||
      bytes % 16 != 0 || bytes == 0) {
    ::helix_emu::MbarFail("cp.async.bulk needs 16-byte aligned addresses and a size of 16k > 0");
  }
  if (!::helix_emu::DeferCopies()) {
    ::helix_emu::DeliverBulk(smem, gmem, bytes, bar);
    return;
  }
  const auto* src = static_cast<const unsigned char*>(gmem);
  ::helix_emu::PendingBulkCopies()[bar].push_back(
      {smem, std::vector<unsigned char>(src, src + bytes)});
  std::memset(smem, ::helix_emu::kInFlight, bytes);
}
// Returns once the phase of parity `parity` has completed. (kDeferred: the bulk copies issued on
// the barrier are delivered at a thread's first poll of it.)
inline void MbarWait(uint64_t* bar, unsigned parity) {
  for (int64_t spins = 0;; ++spins) {
    auto& pending = ::helix_emu::PendingBulkCopies();
    if (auto it = pending.find(bar); it != pending.end()) {
      std::vector<::helix_emu::PendingBulk> copies = std::move(it->second);
      pending.erase(it);
      for (auto& c : copies) {
        ::helix_emu::DeliverBulk(c.dst, c.bytes.data(), static_cast<unsigned>(c.bytes.size()), bar);
      }
    }
    ::helix_emu::Mbar m;
    std::memcpy(&m, bar, 8);
    if ((m.phase & 1u) != parity) return;
    if (spins > (int64_t{1} << 24)) ::helix_emu::MbarFail("an mbarrier phase never completed");
    ::helix_emu::Yield();
  }
}
// Warp-collective tensor-core pieces with the register layouts of ldmatrix and mma.sync (see
// kernels/cuda/cuda_util.cuh): every lane publishes its operands (ldmatrix: its row's 16 bytes,
// read at its own call), the warp synchronises, each lane computes its own results from the
// others', and the warp synchronises again before the slots are reused. ldmatrix's rows must be
// 16-byte aligned, as on the device. Like the device's .sync.aligned instructions they keep the
// warp together, so a __syncwarp placed only after them changes nothing here.
template <bool kTrans>
inline void LdMatrixX4(uint32_t (&r)[4], const void* row) {
  namespace e = ::helix_emu;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    e::MbarFail("ldmatrix row address not 16-byte aligned");
  const int lane = static_cast<int>(threadIdx.x % 32);
  // Each lane reads its row when it calls (not after the warp has met): a lane whose row another
  // lane copied must have synchronised with it before, as on the device.
  static_assert(e::kWords * 4 >= 16);
  std::memcpy(e::LaneWords(lane), row, 16);
  e::SyncWarp();
  auto row_of = [](int m, int i) {
    return reinterpret_cast<const uint16_t*>(e::LaneWords(8 * m + i));
  };
  for (int m = 0; m < 4; ++m) {
    uint32_t lo, hi;
    if (kTrans) {
      lo = row_of(m, 2 * (lane % 4))[lane / 4];
      hi = row_of(m, 2 * (lane % 4) + 1)[lane / 4];
    } else {
      lo = row_of(m, lane / 4)[2 * (lane % 4)];
      hi = row_of(m, lane / 4)[2 * (lane % 4) + 1];
    }
    r[m] = lo | (hi << 16);
  }
  e::SyncWarp();
}

namespace helix_emu {
// c += A B for m16n8kK (K = 16 or 8) from the warp's published operand words: A's words at 0..3
// (K = 8: 0..1), B's at 4..5 (K = 8: 4). Lane (row % 8) * 4 + (k % 8) / 2 holds A[row][k] in word
// (row >= 8) + 2 (k >= 8), and lane n * 4 + (k % 8) / 2 holds B[k][n] in word 4 + (k >= 8); lane
// l's c is C[l / 4 (+ 8)][2 (l % 4) (+ 1)].
template <typename T, int K>
void Mma(float (&c)[4], const uint32_t* a, const uint32_t* b) {
  const int lane = static_cast<int>(t_thread_idx.x % 32);
  uint32_t* w = LaneWords(lane);
  for (int i = 0; i < K / 4; ++i) w[i] = a[i];
  for (int i = 0; i < K / 8; ++i) w[4 + i] = b[i];
  SyncWarp();
  const int g = lane / 4, t = lane % 4;
  for (int ci = 0; ci < 4; ++ci) {
    const int row = g + (ci >= 2 ? 8 : 0), col = 2 * t + (ci & 1);
    float s = c[ci];
    for (int k = 0; k < K; ++k) {
      const float av =
          Elem<T>((row % 8) * 4 + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k % 2);
      const float bv = Elem<T>(col * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k % 2);
      s = std::fma(av, bv, s);
    }
    c[ci] = s;
  }
  SyncWarp();
}
}  // namespace helix_emu

template <typename T>
inline void MmaK16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  ::helix_emu::Mma<T, 16>(c, a, b);
}

template <typename T>
inline void MmaK8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b) {
  const uint32_t a[2] = {a0, a1};
  ::helix_emu::Mma<T, 8>(c, a, &b);
}

inline bool __any_sync(unsigned, bool p) {
  namespace e = ::helix_emu;
  const int lane = static_cast<int>(threadIdx.x % 32);
  e::LaneWords(lane)[0] = p ? 1u : 0u;
  e::SyncWarp();
  bool any = false;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  for (int i = 0; i < e::t_block->warp_size[warp]; ++i) any = any || e::LaneWords(i)[0] != 0;
  e::SyncWarp();
  return any;
}

inline void CpAsyncCommit() {
  helix_emu::Fiber& f = *helix_emu::t_fiber;
  f.groups.push_back(std::move(f.open_copies));  // an empty group too, as on the device
  f.open_copies.clear();
}
template <int N>
inline void CpAsyncWait() {
  helix_emu::LandGroups(*helix_emu::t_fiber, N);
}

#endif  // HELIX_TESTS_GPU_CUDA_EMU_H_
