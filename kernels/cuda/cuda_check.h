// Error checks for CUDA runtime calls and kernel launches in kernels/cuda (and its tests), and
// the programmatic dependent launch. Thread-safe.
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

// Whether HELIX_LAUNCH_PDL asks for programmatic dependent launch (ops_cuda.h
// SetProgrammaticLaunch; on by default, and only where the kernels were built for sm_90+).
bool ProgrammaticLaunch();

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch (Hopper and
// later): its thread blocks may be launched while the previous kernel in the stream is still
// running, and wait at PdlEnter (cuda_util.cuh) for it to finish before touching memory another
// kernel writes (a kernel may read its weights first). Only
// on a created stream (not the legacy or per-thread default streams) and while
// ProgrammaticLaunch(); a driver or device without it gets an ordinary launch.
#ifndef HELIX_CUDA_EMULATION
template <typename... KArgs, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = ProgrammaticLaunch() && stream != nullptr && stream != cudaStreamLegacy &&
                         stream != cudaStreamPerThread
                     ? 1
                     : 0;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (err != cudaSuccess && cfg.numAttrs > 0) {
    (void)cudaGetLastError();
    cfg.numAttrs = 0;
    err = cudaLaunchKernelEx(&cfg, kernel, args...);
  }
  return err;
}
#endif

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

// A programmatic dependent launch (LaunchPdl) in a launcher that returns cudaError_t. Every path
// through the kernel must call PdlEnter() before it touches global memory that another kernel of
// the stream writes, or writes anything (weights, which no kernel writes, may be read before).
#ifdef HELIX_CUDA_EMULATION
#define HELIX_LAUNCH_PDL(kernel, grid, block, smem, stream, ...) \
  ::helix_emu::Launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define HELIX_LAUNCH_PDL(kernel, grid, block, smem, stream, ...) \
  HELIX_CUDA_RETURN_IF_ERROR(                                    \
      ::helix::kernels::cuda::LaunchPdl(kernel, grid, block, smem, stream, __VA_ARGS__))
#endif

#endif  // HELIX_KERNELS_CUDA_CUDA_CHECK_H_
