// Helpers for the GPU tests and benchmarks (test-only): device detection for skipping, a
// move-only device buffer, and host <-> device copies. Not thread-safe.
#ifndef HELIX_TESTS_GPU_GPU_TEST_UTIL_H_
#define HELIX_TESTS_GPU_GPU_TEST_UTIL_H_

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace helix::gpu_testing {

// Built with HELIX_CUDA_EMULATION (the CPU emulation of tests/gpu/cuda_emu.h), "device"
// memory is host memory and there is always a "device".
#ifdef HELIX_CUDA_EMULATION
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

// Empty when a CUDA device is usable; else why not (the skip reason).
inline std::string NoGpuReason() {
  if (kEmulated) {
    return "";
  }
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    return std::string("no CUDA device visible (cudaGetDeviceCount: ") + cudaGetErrorName(err) +
           ")";
  }
  if (n == 0) {
    return "no CUDA device visible (cudaGetDeviceCount returned 0)";
  }
  return "";
}

// Aborts with file and line on a failed CUDA call (tests and benchmarks only).
#define HELIX_CUDA_OK(call)                                                     \
  do {                                                                          \
    const cudaError_t helix_err_ = (call);                                      \
    if (helix_err_ != cudaSuccess) {                                            \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, \
                   cudaGetErrorString(helix_err_));                             \
      std::abort();                                                             \
    }                                                                           \
  } while (0)

// Owned device memory of n elements of T (move-only).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n > 0) {
      if (kEmulated) {
        ptr_ = static_cast<T*>(std::malloc(n * sizeof(T)));
      } else {
        HELIX_CUDA_OK(cudaMalloc(&ptr_, n * sizeof(T)));
      }
    }
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { Upload(host); }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) {
      if (kEmulated) {
        std::free(ptr_);
      } else {
        cudaFree(ptr_);
      }
    }
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(n_, o.n_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  void Upload(const std::vector<T>& host) {
    if (host.empty()) {
      return;
    }
    if (kEmulated) {
      std::memcpy(ptr_, host.data(), host.size() * sizeof(T));
    } else {
      HELIX_CUDA_OK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  std::vector<T> Download() const {
    std::vector<T> host(n_);
    if (n_ == 0) {
      return host;
    }
    if (kEmulated) {
      std::memcpy(host.data(), ptr_, n_ * sizeof(T));
    } else {
      HELIX_CUDA_OK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    }
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// A created stream (nullptr under emulation), synchronised and destroyed with the object.
class Stream {
 public:
  Stream() {
    if (!kEmulated) {
      HELIX_CUDA_OK(cudaStreamCreate(&s_));
    }
  }
  ~Stream() {
    if (s_ != nullptr) {
      cudaStreamDestroy(s_);
    }
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void Sync() const {
    if (s_ != nullptr) {
      HELIX_CUDA_OK(cudaStreamSynchronize(s_));
    }
  }

 private:
  cudaStream_t s_ = nullptr;
};

}  // namespace helix::gpu_testing

#endif  // HELIX_TESTS_GPU_GPU_TEST_UTIL_H_
