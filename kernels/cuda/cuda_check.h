// Error checks for CUDA runtime calls and kernel launches in kernels/cuda (and its tests).
// Stateless macros; thread-safe.
#ifndef HELIX_KERNELS_CUDA_CUDA_CHECK_H_
#define HELIX_KERNELS_CUDA_CUDA_CHECK_H_

#include <cuda_runtime.h>

#include <cstdio>

namespace helix::kernels::cuda {

// Prints a failed call with its file and line (the launchers return the error; this is the
// record of where it happened).
inline cudaError_t ReportCudaError(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "CUDA error %s (%s) in %s at %s:%d\n", cudaGetErrorName(err),
                 cudaGetErrorString(err), what, file, line);
  }
  return err;
}

// After a launch: the launch error always (cheap, no synchronisation); in debug builds also
// the stream is synchronised so that a fault is reported at the launch that caused it (not
// while the stream is being captured into a CUDA graph, where synchronising is illegal).
inline cudaError_t CheckLaunch(cudaStream_t stream, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
#ifndef NDEBUG
  if (err == cudaSuccess) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess &&
        capture == cudaStreamCaptureStatusNone) {
      err = cudaStreamSynchronize(stream);
    }
  }
#else
  (void)stream;
#endif
  return ReportCudaError(err, "kernel launch", file, line);
}

}  // namespace helix::kernels::cuda

// Returns the cudaError_t of `call` from the enclosing function when it fails.
#define HELIX_CUDA_RETURN_IF_ERROR(call)                                                          \
  do {                                                                                            \
    const cudaError_t helix_cuda_err_ = (call);                                                   \
    if (helix_cuda_err_ != cudaSuccess) {                                                         \
      return ::helix::kernels::cuda::ReportCudaError(helix_cuda_err_, #call, __FILE__, __LINE__); \
    }                                                                                             \
  } while (0)

// Placed right after every <<<...>>> launch in a launcher that returns cudaError_t.
#ifdef HELIX_CUDA_EMULATION
#define HELIX_CUDA_CHECK_LAUNCH(stream) (void)(stream)
#else
#define HELIX_CUDA_CHECK_LAUNCH(stream)                                    \
  do {                                                                     \
    const cudaError_t helix_cuda_err_ =                                    \
        ::helix::kernels::cuda::CheckLaunch((stream), __FILE__, __LINE__); \
    if (helix_cuda_err_ != cudaSuccess) return helix_cuda_err_;            \
  } while (0)
#endif

// A kernel launch; the CPU emulation of tests/gpu runs the grid on host threads instead.
#ifdef HELIX_CUDA_EMULATION
#define HELIX_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::helix_emu::Launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define HELIX_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#endif  // HELIX_KERNELS_CUDA_CUDA_CHECK_H_
