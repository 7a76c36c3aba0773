// The device's memory bandwidth as the decode roofline uses it: a device-to-device cudaMemcpy
// (GB/s counting bytes read and written) and a pure-read kernel (bench_kernels.h), each the
// best of 20 timed repetitions over a buffer far larger than L2. One line of key=value pairs.
//   copy_bench [--mib 2048]
// Exits 0 with a note when no GPU is visible.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "tests/gpu/bench_kernels.h"

namespace {

bool Ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "copy_bench: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  size_t mib = 2048;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--mib") == 0) mib = std::strtoull(argv[i + 1], nullptr, 10);
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("copy_bench: no CUDA device visible\n");
    return 0;
  }
  const size_t bytes = mib << 20;
  void *a = nullptr, *b = nullptr;
  unsigned* sink = nullptr;
  cudaStream_t s = nullptr;
  cudaEvent_t e0, e1;
  if (!Ok(cudaMalloc(&a, bytes), "cudaMalloc") || !Ok(cudaMalloc(&b, bytes), "cudaMalloc") ||
      !Ok(cudaMalloc(&sink, sizeof(unsigned)), "cudaMalloc") ||
      !Ok(cudaStreamCreate(&s), "stream") || !Ok(cudaEventCreate(&e0), "event") ||
      !Ok(cudaEventCreate(&e1), "event") || !Ok(cudaMemset(a, 1, bytes), "memset")) {
    return 1;
  }
  float best_copy = 1e30f, best_read = 1e30f;
  for (int rep = 0; rep < 22; ++rep) {
    float ms = 0;
    cudaEventRecord(e0, s);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s);
    cudaEventRecord(e1, s);
    if (!Ok(cudaEventSynchronize(e1), "copy")) return 1;
    cudaEventElapsedTime(&ms, e0, e1);
    if (rep >= 2) best_copy = std::min(best_copy, ms);
    cudaEventRecord(e0, s);
    if (!Ok(helix::gpu_testing::LaunchReadReduce(a, bytes, sink, s), "read kernel")) return 1;
    cudaEventRecord(e1, s);
    if (!Ok(cudaEventSynchronize(e1), "read")) return 1;
    cudaEventElapsedTime(&ms, e0, e1);
    if (rep >= 2) best_read = std::min(best_read, ms);
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device=\"%s\" bytes=%zu d2d_gb_s=%.1f read_gb_s=%.1f\n", prop.name, bytes,
              2.0 * bytes / (best_copy * 1e6), bytes / (best_read * 1e6));
  return 0;
}
