#include "engine/backend/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "engine/common/log.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/mla_attention_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#ifdef HELIX_CUDA_EMULATION
#include "kernels/gemm.h"
#else
#include <cublas_v2.h>

#include "kernels/cuda/gemm_cuda.h"
#endif

// With HELIX_CUDA_EMULATION (tests only: the kernels compiled as C++ and run on host threads by
// tests/gpu/cuda_emu.h) "device" memory is host memory and copies are memcpy, while the
// backend still reports host_memory() == false, so the model takes the device path (weights
// uploaded, batch indices copied, collectives staged). cuBLAS cannot be emulated: GEMMs run
// GemmCpu there; cuda_ops_test checks GemmCuda against it on a GPU.

namespace helix {
namespace {

namespace kc = kernels::cuda;

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& o) : options_(o) {}

  Status Init() {
#ifndef HELIX_CUDA_EMULATION
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      return FailedPrecondition(std::string("backend cuda: no CUDA device is visible (") +
                                (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + ")");
    }
    device_ = options_.device % count;
    if (device_ < 0) device_ += count;
    RETURN_IF_ERROR(Check(cudaSetDevice(device_), "cudaSetDevice"));
    RETURN_IF_ERROR(
        Check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) {
      return FailedPrecondition("backend cuda: cublasCreate failed on device " +
                                std::to_string(device_));
    }
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device_) == cudaSuccess) {
      HELIX_LOG(kInfo) << "backend cuda: device " << device_ << " of " << count << " (" << prop.name
                       << ", " << (prop.totalGlobalMem >> 20) << " MiB)";
    }
#endif
    return Status::Ok();
  }

  ~CudaBackend() override {
#ifndef HELIX_CUDA_EMULATION
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    if (gemm_ws_ != nullptr) cudaFree(gemm_ws_);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
#else
    std::free(gemm_ws_);
#endif
  }

  const char* name() const override { return "cuda"; }
  bool host_memory() const override { return false; }

  Status Activate() override {
#ifndef HELIX_CUDA_EMULATION
    RETURN_IF_ERROR(Check(cudaSetDevice(device_), "cudaSetDevice"));
#endif
    return error_;
  }

  void* Alloc(size_t bytes) override {
#ifdef HELIX_CUDA_EMULATION
    return std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
#else
    void* p = nullptr;
    // cudaMalloc: 256-byte aligned; it may wait for the device, which is fine outside the step.
    if (cudaMalloc(&p, std::max<size_t>(bytes, 1)) != cudaSuccess) {
      cudaGetLastError();  // out of memory is not sticky: clear it
      return nullptr;
    }
    return p;
#endif
  }
  void Free(void* p) override {
    if (p == nullptr) return;
#ifdef HELIX_CUDA_EMULATION
    std::free(p);
#else
    Note(cudaStreamSynchronize(stream_), "stream synchronize");  // queued ops are done with p
    Note(cudaFree(p), "cudaFree");
#endif
  }
  void* AllocHost(size_t bytes) override {
#ifdef HELIX_CUDA_EMULATION
    return std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
#else
    void* p = nullptr;
    if (cudaMallocHost(&p, std::max<size_t>(bytes, 1)) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return p;
#endif
  }
  void FreeHost(void* p) override {
    if (p == nullptr) return;
#ifdef HELIX_CUDA_EMULATION
    std::free(p);
#else
    Note(cudaStreamSynchronize(stream_), "stream synchronize");
    Note(cudaFreeHost(p), "cudaFreeHost");
#endif
  }

  void CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
#ifdef HELIX_CUDA_EMULATION
    std::memcpy(dst, src, bytes);
#else
    Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "copy to device");
#endif
  }
  Status CopyToHost(void* dst, const void* src, size_t bytes) override {
#ifdef HELIX_CUDA_EMULATION
    if (bytes > 0) std::memcpy(dst, src, bytes);
#else
    if (bytes > 0) {
      Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
    }
    Note(cudaStreamSynchronize(stream_), "stream synchronize");
#endif
    return error_;
  }
  void CopyDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
#ifdef HELIX_CUDA_EMULATION
    std::memmove(dst, src, bytes);
#else
    Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "device copy");
#endif
  }
  void CopyDevice2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                    size_t rows) override {
    if (width == 0 || rows == 0) return;
#ifdef HELIX_CUDA_EMULATION
    for (size_t r = 0; r < rows; ++r) {
      std::memmove(static_cast<char*>(dst) + r * dst_pitch,
                   static_cast<const char*>(src) + r * src_pitch, width);
    }
#else
    Note(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDeviceToDevice,
                           stream_),
         "2D device copy");
#endif
  }
  void* native_stream() override { return stream_; }
  Status Sync() override {
#ifndef HELIX_CUDA_EMULATION
    Note(cudaStreamSynchronize(stream_), "stream synchronize");
#endif
    return error_;
  }

  void Gemm(const kernels::GemmParams& p) override {
#ifdef HELIX_CUDA_EMULATION
    kernels::GemmCpu(p, nullptr);
#else
    const size_t ws = kc::GemmCudaWorkspaceBytes(p);
    if (ws > gemm_ws_bytes_) {
      if (gemm_ws_ != nullptr) Free(gemm_ws_);
      gemm_ws_ = nullptr;
      gemm_ws_bytes_ = 0;
      if (!Note(cudaMalloc(&gemm_ws_, ws), "GEMM workspace cudaMalloc")) return;
      gemm_ws_bytes_ = ws;
    }
    Note(kc::GemmCuda(cublas_, p, gemm_ws_, stream_), "GemmCuda");
#endif
  }
  void RmsNorm(const kernels::RmsNormParams& p) override {
    Note(kc::RmsNormCuda(p, stream_), "RmsNormCuda");
  }
  void Rope(const kernels::RopeParams& p) override { Note(kc::RopeCuda(p, stream_), "RopeCuda"); }
  void SiluMul(const kernels::SiluMulParams& p) override {
    Note(kc::SiluMulCuda(p, stream_), "SiluMulCuda");
  }
  void Add(float* x, const float* y, int64_t n) override {
    Note(kc::AddCuda({x, y, n}, stream_), "AddCuda");
  }
  void GatherRows(const float* in, int64_t stride, const int32_t* rows, int64_t num_rows, int64_t n,
                  float* out) override {
    Note(kc::GatherRowsCuda({in, stride, rows, num_rows, n, out}, stream_), "GatherRowsCuda");
  }
  void WriteKv(const kernels::KvPoolView& kv, int64_t block, int64_t layer, int64_t slot,
               const float* k, const float* v) override {
    Note(kc::WriteKvCuda(kv, block, layer, slot, k, v, stream_), "WriteKvCuda");
  }
  void WriteKvBatch(const kernels::KvPoolView& kv, int64_t layer, const float* k, const float* v,
                    const int32_t* block, const int32_t* slot, int64_t tokens) override {
    kc::WriteKvBatchParams p{};
    p.kv = kv;
    p.layer = layer;
    p.k = k;
    p.v = v;
    p.block = block;
    p.token_in_block = slot;
    p.tokens = tokens;
    Note(kc::WriteKvBatchCuda(p, stream_), "WriteKvBatchCuda");
  }
  size_t PagedAttentionWorkspaceBytes(const kernels::PagedAttentionParams& p) override {
    return kc::PagedAttentionCudaWorkspaceBytes(WithSplit(p));
  }
  void PagedAttention(const kernels::PagedAttentionParams& p, void* workspace) override {
    Note(kc::PagedAttentionCuda(WithSplit(p), workspace, stream_), "PagedAttentionCuda");
  }
  void MergeStates(const kernels::MergeStatesParams& p) override {
    Note(kc::MergeStatesCuda(p, stream_), "MergeStatesCuda");
  }
  void PackCombine(const float* att, const float* lse, int64_t tokens, int64_t peers, int64_t hp,
                   int64_t dim, float* send) override {
    Note(kc::PackCombineCuda({att, lse, send, tokens, peers, hp, dim}, stream_), "PackCombineCuda");
  }
  void UnpackCombine(const float* recv, int64_t peers, int64_t rows, int64_t dim, float* parts_o,
                     float* parts_lse) override {
    Note(kc::UnpackCombineCuda({recv, parts_o, parts_lse, peers, rows, dim}, stream_),
         "UnpackCombineCuda");
  }
  size_t MlaAttentionWorkspaceBytes(const kernels::MlaAttentionParams& p) override {
    return kc::MlaAttentionCudaWorkspaceBytes(p);
  }
  void MlaAttention(const kernels::MlaAttentionParams& p, void* workspace) override {
    Note(kc::MlaAttentionCuda(p, workspace, stream_), "MlaAttentionCuda");
  }
  void Embedding(const float* table, int64_t vocab, const int32_t* ids, int64_t n, int64_t dim,
                 float* out) override {
    kc::EmbeddingParams p{};
    p.table = table;
    p.dtype = kernels::DType::kF32;
    p.ids = ids;
    p.out = out;
    p.n = n;
    p.dim = dim;
    p.vocab = vocab;
    Note(kc::EmbeddingCuda(p, stream_), "EmbeddingCuda");
  }

 private:
  // The split the attention launch and its workspace size both use (same shapes, same split).
  kernels::PagedAttentionParams WithSplit(kernels::PagedAttentionParams p) const {
    if (p.kv_split_tokens == 0) {
      p.kv_split_tokens = options_.attention_split_tokens > 0
                              ? options_.attention_split_tokens
                              : kc::PagedAttentionCudaSplitTokens(p);
    }
    return p;
  }
  // Keeps the first error; false when `err` is one.
  bool Note(cudaError_t err, const char* what) {
    if (err == cudaSuccess) return true;
    if (error_.ok()) {
      error_ = Internal(std::string("backend cuda: ") + what + " failed: " + cudaGetErrorName(err) +
                        " (" + cudaGetErrorString(err) + ")");
      HELIX_LOG(kError) << error_.message();
    }
    return false;
  }
  Status Check(cudaError_t err, const char* what) {
    if (err == cudaSuccess) return Status::Ok();
    return FailedPrecondition(std::string("backend cuda: ") + what + " failed: " +
                              cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }

  CudaBackendOptions options_;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
#ifndef HELIX_CUDA_EMULATION
  cublasHandle_t cublas_ = nullptr;
#endif
  void* gemm_ws_ = nullptr;
  size_t gemm_ws_bytes_ = 0;
  Status error_;
};

}  // namespace

int CudaDeviceCount() {
#ifdef HELIX_CUDA_EMULATION
  return 1;  // the emulator plays one device
#else
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
#endif
}

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options) {
  auto b = std::make_unique<CudaBackend>(options);
  RETURN_IF_ERROR(b->Init());
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace helix
