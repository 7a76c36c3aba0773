#include "engine/backend/cuda/cuda_backend.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/common/log.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/gemv_cuda.h"
#include "kernels/cuda/mla_attention_cuda.h"
#include "kernels/cuda/ops_cuda.h"
#ifdef HELIX_CUDA_EMULATION
#include "kernels/gemm.h"

static_assert(helix::Backend::kNoToken == helix::kernels::cuda::kArgmaxNoToken);
#else
#include <cublas_v2.h>

#include "kernels/cuda/gemm_cuda.h"
#endif

// With HELIX_CUDA_EMULATION (tests only: the kernels compiled as C++ and run on the host by
// tests/gpu/cuda_emu.h) "device" memory is host memory and copies are memcpy, while the
// backend still reports host_memory() == false, so the model takes the device path (weights
// uploaded, batch indices copied, collectives staged). A graph there is the list of the ops
// recorded as closures, replayed in order: like a CUDA graph it keeps the kernel arguments of
// the capture and reads the buffers when it runs. cuBLAS cannot be emulated: GEMMs run GemmCpu
// there; cuda_ops_test checks GemmCuda against it on a GPU.

namespace helix {
namespace {

namespace kc = kernels::cuda;

#ifndef HELIX_CUDA_EMULATION
constexpr size_t kCublasWorkspace = 32u << 20;  // cuBLAS's own, so that graphs allocate nothing
#endif
// The chunked greedy argmax's workspace (CudaBackendOptions::split_argmax), allocated once:
// 8 bytes per (row, chunk), at most 32 chunks a row, so 4096 rows of any vocabulary; larger
// calls take the one-block-per-row kernel.
constexpr size_t kArgmaxWorkspace = 1u << 20;

void* HostAlignedAlloc(size_t bytes) {
  return std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& o) : options_(o) {}

  Status Init() {
#ifdef HELIX_CUDA_EMULATION
    if (options_.split_argmax) argmax_ws_ = std::malloc(kArgmaxWorkspace);
#else
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
    RETURN_IF_ERROR(Check(cudaStreamCreateWithFlags(&upload_stream_, cudaStreamNonBlocking),
                          "cudaStreamCreate (uploads)"));
    if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) {
      return FailedPrecondition("backend cuda: cublasCreate failed on device " +
                                std::to_string(device_));
    }
    // The stream first: setting it drops a workspace given before.
    RETURN_IF_ERROR(Check(cudaMalloc(&cublas_ws_, kCublasWorkspace), "cuBLAS workspace"));
    if (cublasSetStream(cublas_, stream_) != CUBLAS_STATUS_SUCCESS ||
        cublasSetWorkspace(cublas_, cublas_ws_, kCublasWorkspace) != CUBLAS_STATUS_SUCCESS) {
      return FailedPrecondition("backend cuda: cannot give cuBLAS its stream and workspace");
    }
    if (options_.split_argmax) {
      RETURN_IF_ERROR(Check(cudaMalloc(&argmax_ws_, kArgmaxWorkspace), "argmax workspace"));
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
    BindDevice();
    DropGraphs();
#ifndef HELIX_CUDA_EMULATION
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    if (upload_stream_ != nullptr) cudaStreamSynchronize(upload_stream_);
    for (const auto& [mark, event] : upload_events_) cudaEventDestroy(event);
    if (upload_stream_ != nullptr) cudaStreamDestroy(upload_stream_);
    if (gemm_ws_ != nullptr) cudaFree(gemm_ws_);
    if (argmax_ws_ != nullptr) cudaFree(argmax_ws_);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (cublas_ws_ != nullptr) cudaFree(cublas_ws_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
#else
    std::free(gemm_ws_);
    std::free(argmax_ws_);
#endif
  }

  const char* name() const override { return "cuda"; }
  bool host_memory() const override { return false; }
#ifdef HELIX_CUDA_EMULATION
  bool host_addressable() const override { return true; }  // emulated device memory
#endif

  Status Activate() override {
#ifndef HELIX_CUDA_EMULATION
    RETURN_IF_ERROR(Check(cudaSetDevice(device_), "cudaSetDevice"));
#endif
    return error_;
  }

  std::string DeviceId() override {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    std::string id = std::string(host) + "/";
#ifdef HELIX_CUDA_EMULATION
    id += "emulated-0";  // one emulated device per host
#else
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device_) == cudaSuccess) {
      static const char* kHex = "0123456789abcdef";
      for (unsigned char c : prop.uuid.bytes) {
        id += kHex[c >> 4];
        id += kHex[c & 15];
      }
    } else {
      id += "device-" + std::to_string(device_);
    }
#endif
    return id;
  }

  int64_t FreeMemoryBytes() override {
#ifdef HELIX_CUDA_EMULATION
    return -1;
#else
    size_t free_bytes = 0, total = 0;
    BindDevice();
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return static_cast<int64_t>(free_bytes);
#endif
  }

  void* Alloc(size_t bytes) override {
    if (capturing_) return Refuse("Alloc");
#ifdef HELIX_CUDA_EMULATION
    return HostAlignedAlloc(bytes);
#else
    BindDevice();  // memory calls may come from another thread than the ops
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
    if (capturing_) {  // freeing (and the wait before it) would break the capture: later
      Refuse("Free");
      deferred_frees_.emplace_back(p, false);
      return;
    }
#ifdef HELIX_CUDA_EMULATION
    std::free(p);
#else
    BindDevice();
    Note(cudaStreamSynchronize(stream_), "stream synchronize");  // queued ops are done with p
    Note(cudaFree(p), "cudaFree");
#endif
  }
  void* AllocHost(size_t bytes) override {
    if (capturing_) return Refuse("AllocHost");
#ifdef HELIX_CUDA_EMULATION
    return HostAlignedAlloc(bytes);
#else
    BindDevice();
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
    if (capturing_) {
      Refuse("FreeHost");
      deferred_frees_.emplace_back(p, true);
      return;
    }
#ifdef HELIX_CUDA_EMULATION
    std::free(p);
#else
    BindDevice();
    Note(cudaStreamSynchronize(stream_), "stream synchronize");
    Note(cudaStreamSynchronize(upload_stream_), "upload stream synchronize");  // staging
    Note(cudaFreeHost(p), "cudaFreeHost");
#endif
  }

  void CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    Op("copy to device", [=, this] { return Memcpy(dst, src, bytes, cudaMemcpyHostToDevice); });
  }
  void Upload(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    if (capturing_) {
      Refuse("Upload");
      return;
    }
#ifdef HELIX_CUDA_EMULATION
    std::memmove(dst, src, bytes);
#else
    BindDevice();  // the uploads' stream, not the ops': they run beside the step
    Note(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, upload_stream_), "upload");
#endif
  }
  uint64_t FenceUploads() override { return RecordUploads(/*ops_wait=*/true); }
  uint64_t MarkUploads() override { return RecordUploads(/*ops_wait=*/false); }
  bool UploadsDone(uint64_t mark, bool wait) override {
#ifndef HELIX_CUDA_EMULATION
    BindDevice();
    // One stream: the marks finish in order.
    while (!upload_events_.empty() && upload_events_.front().first <= mark) {
      cudaEvent_t event = upload_events_.front().second;
      const cudaError_t r = wait ? cudaEventSynchronize(event) : cudaEventQuery(event);
      if (r == cudaErrorNotReady) return false;
      Note(r, "upload");  // a failed upload has ended too; its error fails the next step
      cudaEventDestroy(event);
      upload_events_.pop_front();
    }
#else
    (void)mark;
    (void)wait;
#endif
    return true;
  }
  void CopyToHostAsync(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    Op("copy to host", [=, this] { return Memcpy(dst, src, bytes, cudaMemcpyDeviceToHost); });
  }
  Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (capturing_) {
      Refuse("CopyToHost");
      return capture_error_;
    }
    CopyToHostAsync(dst, src, bytes);
    return Sync();
  }
  void CopyDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    Op("device copy", [=, this] { return Memcpy(dst, src, bytes, cudaMemcpyDeviceToDevice); });
  }
  void CopyDevice2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                    size_t rows) override {
    if (width == 0 || rows == 0) return;
    Op("2D device copy", [=, this] {
#ifdef HELIX_CUDA_EMULATION
      for (size_t r = 0; r < rows; ++r) {
        std::memmove(static_cast<char*>(dst) + r * dst_pitch,
                     static_cast<const char*>(src) + r * src_pitch, width);
      }
      return cudaSuccess;
#else
      return cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                               cudaMemcpyDeviceToDevice, stream_);
#endif
    });
  }
  void* native_stream() override { return stream_; }
  Status Sync() override {
    if (capturing_) {
      Refuse("Sync");
      return capture_error_;
    }
#ifndef HELIX_CUDA_EMULATION
    Note(cudaStreamSynchronize(stream_), "stream synchronize");
#endif
    return error_;
  }

  bool SupportsGraphs() const override { return true; }
  uint64_t scratch_moves() const override { return scratch_moves_; }
  Status BeginCapture() override {
    if (capturing_) return FailedPrecondition("backend cuda: already capturing a graph");
    RETURN_IF_ERROR(error_);
    capture_error_ = Status::Ok();
#ifdef HELIX_CUDA_EMULATION
    emu_graphs_.emplace_back();
#else
    RETURN_IF_ERROR(Check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                          "cudaStreamBeginCapture"));
#endif
    capturing_ = true;
    converted_ = {};  // a captured GEMM never reuses a conversion made outside the graph
    return Status::Ok();
  }
  StatusOr<int> EndCapture() override {
    if (!capturing_) return FailedPrecondition("backend cuda: EndCapture without BeginCapture");
    StatusOr<int> graph = FinishCapture();
    capturing_ = false;
    converted_ = {};
    // What the capture wanted freed (which failed it: Free is refused while capturing).
    for (const auto& [p, host] : std::exchange(deferred_frees_, {})) {
      host ? FreeHost(p) : Free(p);
    }
    return graph;
  }
  Status Replay(int graph) override {
#ifdef HELIX_CUDA_EMULATION
    if (graph < 0 || graph >= static_cast<int>(emu_graphs_.size())) {
      return InvalidArgument("backend cuda: no graph " + std::to_string(graph));
    }
    for (const std::function<void()>& op : emu_graphs_[graph]) op();
#else
    if (graph < 0 || graph >= static_cast<int>(graphs_.size()) || graphs_[graph] == nullptr) {
      return InvalidArgument("backend cuda: no graph " + std::to_string(graph));
    }
    Note(cudaGraphLaunch(graphs_[graph], stream_), "cudaGraphLaunch");
    converted_ = {};  // the graph's GEMMs rewrote the workspace
#endif
    return error_;
  }
  void DropGraphs() override {
#ifdef HELIX_CUDA_EMULATION
    emu_graphs_.clear();
#else
    if (!graphs_.empty() && stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (cudaGraphExec_t g : graphs_) {
      if (g != nullptr) cudaGraphExecDestroy(g);
    }
    graphs_.clear();
#endif
  }

  int64_t ops_queued(const std::string& op) const override {
    int64_t n = 0;
    for (const auto& [name, count] : ops_queued_) {
      if (op == name) n += count;
    }
    return n;
  }

  bool GemmSiluMul(const kernels::GemmParams& p, const kernels::SiluMulParams& act,
                   const kernels::GemmFusion& f) override {
    if (!TakesFusion(p, f, true) || !kc::GemvSiluMulApplies(p, act)) return false;
    Op(GemvOpName(f, true), [=, this] { return kc::GemvSiluMulCuda(p, act, stream_, f); });
#ifndef HELIX_CUDA_EMULATION
    converted_ = {};  // as after GemvCuda (Gemm below)
#endif
    return true;
  }
  bool TakesFusion(const kernels::GemmParams& p, const kernels::GemmFusion& f,
                   bool silu_mul) const override {
    if (silu_mul && p.n % 2 != 0) return false;
    const bool sums = f.norm_sums_in != nullptr || f.norm_sums_out != nullptr;
    if (sums && !(options_.norm_sums && options_.fold_norms)) return false;
    // A norm from the partials costs the GEMV little on any shape; summing x itself pays only
    // where GemvNormPreferred says so.
    return TakesGemv(p) && kc::GemvFusionApplies(p, f, silu_mul) &&
           (f.norm_weight == nullptr || f.norm_sums_in != nullptr ||
            (options_.fold_norms && kc::GemvNormPreferred(p, silu_mul)));
  }
  int64_t NormSumParts(const kernels::GemmParams& p) const override {
    return options_.norm_sums && options_.fold_norms && TakesGemv(p) ? kc::GemvNormSumParts(p) : 0;
  }
  bool GemmRopeWriteKv(const kernels::GemmParams& p, const kernels::GemmFusion& f,
                       const kernels::RopeWriteKvParams& rk) override {
    if (!options_.gemv_rope_kv || !TakesFusion(p, f, false) || !kc::GemvRopeKvApplies(p, f, rk)) {
      return false;
    }
    Op(GemvOpName(f, false, true), [=, this] { return kc::GemvRopeKvCuda(p, rk, stream_, f); });
#ifndef HELIX_CUDA_EMULATION
    converted_ = {};  // as after GemvCuda
#endif
    return true;
  }
  bool GemmFused(const kernels::GemmParams& p, const kernels::GemmFusion& f) override {
    if (!TakesFusion(p, f, false)) return false;
    Op(GemvOpName(f, false), [=, this] { return kc::GemvCuda(p, stream_, f); });
#ifndef HELIX_CUDA_EMULATION
    converted_ = {};  // the workspace is as it was, but x may be a rewritten buffer
#endif
    return true;
  }
  bool GemmReadsLowpX(int64_t rows, int64_t k, kernels::DType w) const override {
    // A one-row GEMM of a shape the GEMV takes goes to GemvCuda, which reads the fp32 x
    // (TakesGemv; the shape alone decides: the model's buffers are aligned). With more rows the
    // copy is kept: cuBLAS takes the large matrices.
    kernels::GemmParams shape{};
    shape.m = rows;
    shape.n = 1;
    shape.k = k;
    shape.w_dtype = w;
    return w != kernels::DType::kF32 && !(rows == 1 && TakesGemv(shape));
  }

  void Gemm(const kernels::GemmParams& p) override {
    if (GemmFused(p, {})) return;  // the GEMV, where it takes p
#ifdef HELIX_CUDA_EMULATION
    Op("GemmCpu", [=] {
      // GemmCuda's numerics: with 16-bit weights cuBLAS multiplies x rounded to their type,
      // which is x_lowp where the caller gives it (so a wrong or stale copy shows here too).
      if (p.w_dtype == kernels::DType::kF32 || p.m <= 0 || p.k <= 0) {
        kernels::GemmCpu(p, nullptr);
        return cudaSuccess;
      }
      const size_t n = static_cast<size_t>(p.m * p.k);
      std::vector<uint16_t> rounded_x;
      const uint16_t* h = static_cast<const uint16_t*>(p.x_lowp);
      if (h == nullptr) {
        rounded_x.resize(n);
        kernels::StoreLowp(p.x, static_cast<int64_t>(n), p.w_dtype, rounded_x.data());
        h = rounded_x.data();
      }
      std::vector<float> xr(n);
      const bool bf16 = p.w_dtype == kernels::DType::kBF16;
      for (size_t i = 0; i < n; ++i) {
        xr[i] = bf16 ? kernels::Bf16ToFloat(h[i]) : kernels::HalfToFloat(h[i]);
      }
      kernels::GemmParams rounded = p;
      rounded.x = xr.data();
      kernels::GemmCpu(rounded, nullptr);
      return cudaSuccess;
    });
#else
    const uint64_t moves = scratch_moves_;
    if (!GrowGemmWorkspace(kc::GemmCudaWorkspaceBytes(p))) return;
    // The previous Gemm's conversion of the same x is reused when the model says x is unchanged
    // (and the workspace did not move and no batched GEMM wrote it since).
    const bool reuse = p.same_x && p.w_dtype != kernels::DType::kF32 && converted_.x == p.x &&
                       converted_.m == p.m && converted_.k == p.k &&
                       converted_.dtype == p.w_dtype && moves == scratch_moves_;
    const bool ok = Note(kc::GemmCuda(cublas_, p, gemm_ws_, stream_, reuse), "GemmCuda");
    // What gemm_ws_ now holds: x converted, where a conversion ran (16-bit weights without
    // x_lowp and a non-empty product; GemmCuda returns early otherwise) or was reused. After a
    // GEMM that read x_lowp nothing is reused: its x may be a rewritten buffer of an older
    // conversion.
    const bool converts =
        p.w_dtype != kernels::DType::kF32 && p.x_lowp == nullptr && p.m > 0 && p.n > 0 && p.k > 0;
    converted_ = ok && converts ? Converted{p.x, p.m, p.k, p.w_dtype} : Converted{};
#endif
  }
  void GemmBatched(const kernels::GemmBatchedParams& p) override {
#ifdef HELIX_CUDA_EMULATION
    Op("GemmBatchedCpu", [=] {
      kernels::GemmBatchedCpu(p, nullptr);
      return cudaSuccess;
    });
#else
    if (!GrowGemmWorkspace(kc::GemmBatchedCudaWorkspaceBytes(p))) return;
    converted_ = {};  // the workspace now holds the batched GEMM's rows
    Note(kc::GemmBatchedCuda(cublas_, p, gemm_ws_, stream_), "GemmBatchedCuda");
#endif
  }
  void RmsNorm(const kernels::RmsNormParams& p) override {
    Op("RmsNormCuda", [=, this] { return kc::RmsNormCuda(p, stream_); });
  }
  void Rope(const kernels::RopeParams& p) override {
    Op("RopeCuda", [=, this] { return kc::RopeCuda(p, stream_); });
  }
  void SiluMul(const kernels::SiluMulParams& p) override {
    Op("SiluMulCuda", [=, this] { return kc::SiluMulCuda(p, stream_); });
  }
  void Add(float* x, const float* y, int64_t n) override {
    Op("AddCuda", [=, this] { return kc::AddCuda({x, y, n}, stream_); });
  }
  void ScatterAddRows(const float* y, const int32_t* rows, const float* w, int64_t n, int64_t dim,
                      float* out) override {
    Op("ScatterAddRowsCuda", [=, this] {
      return kc::ScatterAddRowsCuda({y, rows, w, n, dim, out}, stream_);
    });
  }
  void Zero(void* p, size_t bytes) override {
    if (bytes == 0) return;
    Op("memset", [=, this] {
#ifdef HELIX_CUDA_EMULATION
      std::memset(p, 0, bytes);
      return cudaSuccess;
#else
      return cudaMemsetAsync(p, 0, bytes, stream_);
#endif
    });
  }
  void GatherRows(const float* in, int64_t stride, const int32_t* rows, int64_t num_rows, int64_t n,
                  float* out) override {
    Op("GatherRowsCuda", [=, this] {
      return kc::GatherRowsCuda({in, stride, rows, num_rows, n, out}, stream_);
    });
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
    Op("WriteKvBatchCuda", [=, this] { return kc::WriteKvBatchCuda(p, stream_); });
  }
  bool HasRopeWriteKv() const override { return true; }
  bool RopeWriteKv(const kernels::RopeWriteKvParams& p) override {
    Op("RopeWriteKvCuda", [=, this] { return kc::RopeWriteKvCuda(p, stream_); });
    return true;
  }
  size_t PagedAttentionWorkspaceBytes(const kernels::PagedAttentionParams& p) override {
    return kc::PagedAttentionCudaWorkspaceBytes(WithSplit(p));
  }
  void PagedAttention(const kernels::PagedAttentionParams& p, void* workspace) override {
    const kernels::PagedAttentionParams q = WithPrefetch(WithSplit(p));
    // Counted apart when its math runs on the tensor cores (attention_tensor_cores), for decode
    // and for steps with several query tokens of a sequence.
    const std::string_view kernel = kc::PagedAttentionCudaKernelName(q);
    Op(kernel == "mma"           ? "PagedAttentionCudaMma"
       : kernel == "mma_prefill" ? "PagedAttentionCudaMmaPrefill"
                                 : "PagedAttentionCuda",
       [=, this] { return kc::PagedAttentionCuda(q, workspace, stream_); });
  }
  void MergeStates(const kernels::MergeStatesParams& p) override {
    Op("MergeStatesCuda", [=, this] { return kc::MergeStatesCuda(p, stream_); });
  }
  void PackCombine(const float* att, const float* lse, int64_t tokens, int64_t peers, int64_t hp,
                   int64_t dim, float* send) override {
    Op("PackCombineCuda", [=, this] {
      return kc::PackCombineCuda({att, lse, send, tokens, peers, hp, dim}, stream_);
    });
  }
  void UnpackCombine(const float* recv, int64_t peers, int64_t rows, int64_t dim, float* parts_o,
                     float* parts_lse) override {
    Op("UnpackCombineCuda", [=, this] {
      return kc::UnpackCombineCuda({recv, parts_o, parts_lse, peers, rows, dim}, stream_);
    });
  }
  size_t MlaAttentionWorkspaceBytes(const kernels::MlaAttentionParams& p) override {
    return kc::MlaAttentionCudaWorkspaceBytes(WithMlaSplit(p));
  }
  void MlaAttention(const kernels::MlaAttentionParams& p, void* workspace) override {
    const kernels::MlaAttentionParams q = WithMlaSplit(p);
    Op("MlaAttentionCuda", [=, this] { return kc::MlaAttentionCuda(q, workspace, stream_); });
  }
  bool SampleTokens(const float* logits, int64_t rows, int64_t vocab, const float* temperature,
                    const int32_t* top_k, const float* top_p, const float* min_p, const double* u,
                    int32_t* greedy, int32_t* sampled) override {
    if (greedy != nullptr) {
      kc::ArgmaxParams ap{logits, greedy, rows, vocab};
      // Chunked over several thread blocks per row where the workspace suffices.
      if (argmax_ws_ != nullptr && kc::ArgmaxCudaWorkspaceBytes(ap) <= kArgmaxWorkspace) {
        ap.workspace = argmax_ws_;
      }
      Op(ap.workspace != nullptr ? "ArgmaxChunkedCuda" : "ArgmaxCuda",
         [=, this] { return kc::ArgmaxCuda(ap, stream_); });
    }
    if (sampled != nullptr) {
      Op("SampleCuda", [=, this] {
        return kc::SampleCuda({logits, temperature, top_k, top_p, min_p, u, sampled, rows, vocab},
                              stream_);
      });
    }
    return true;
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
    Op("EmbeddingCuda", [=, this] { return kc::EmbeddingCuda(p, stream_); });
  }

 private:
  // Ops queued per kernel name (a string literal: counted by its address, summed by name).
  std::unordered_map<const char*, int64_t> ops_queued_;
  // The op name ops_queued counts a GEMV with fusion f under: Gemv, then SumsNorm (the norm from
  // partials) or Norm, Add (the residual add), Sums (partials written), SiluMul or RopeKv (the
  // RoPE and K/V write), then Cuda; e.g. GemvNormSiluMulCuda, GemvAddSumsCuda,
  // GemvSumsNormRopeKvCuda.
  static const char* GemvOpName(const kernels::GemmFusion& f, bool silu_mul, bool rope = false) {
    static const std::vector<std::string> names = [] {
      std::vector<std::string> n;
      for (int i = 0; i < 64; ++i) {
        std::string s = "Gemv";
        if (i & 1) s += (i & 2) ? "SumsNorm" : "Norm";
        if (i & 4) s += "Add";
        if (i & 8) s += "Sums";
        if (i & 16) s += "SiluMul";
        if (i & 32) s += "RopeKv";
        n.push_back(s + "Cuda");
      }
      return n;
    }();
    const int i = (f.norm_weight != nullptr ? 1 : 0) | (f.norm_sums_in != nullptr ? 2 : 0) |
                  (f.accumulate ? 4 : 0) | (f.norm_sums_out != nullptr ? 8 : 0) |
                  (silu_mul ? 16 : 0) | (rope ? 32 : 0);
    return names[i].c_str();
  }
  // Whether Gemm(p) runs as GemvCuda (decode_gemv, a shape it takes and where it beats cuBLAS).
  bool TakesGemv(const kernels::GemmParams& p) const {
    return options_.decode_gemv && kc::GemvApplies(p) && kc::GemvPreferred(p.m, p.n, p.k);
  }

  // An event after the uploads queued so far (and, with ops_wait, the ops stream waiting for
  // it); its mark.
  uint64_t RecordUploads(bool ops_wait) {
    if (capturing_) {
      Refuse("FenceUploads / MarkUploads");
      return upload_marks_;
    }
    ++upload_marks_;
    (void)ops_wait;  // not read by the emulation build
#ifndef HELIX_CUDA_EMULATION
    BindDevice();
    cudaEvent_t event = nullptr;
    if (!Note(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate") ||
        !Note(cudaEventRecord(event, upload_stream_), "cudaEventRecord (uploads)") ||
        (ops_wait &&
         !Note(cudaStreamWaitEvent(stream_, event, 0), "cudaStreamWaitEvent (uploads)"))) {
      // No fence: wait for the uploads here instead (the error fails the next step).
      if (event != nullptr) cudaEventDestroy(event);
      Note(cudaStreamSynchronize(upload_stream_), "upload stream synchronize");
      return upload_marks_;
    }
    upload_events_.emplace_back(upload_marks_, event);
#endif
    return upload_marks_;
  }
  // Ends the capture begun by BeginCapture: the new graph's id, or why the capture failed.
  StatusOr<int> FinishCapture() {
#ifdef HELIX_CUDA_EMULATION
    if (!capture_error_.ok()) {
      emu_graphs_.pop_back();
      return capture_error_;
    }
    return static_cast<int>(emu_graphs_.size()) - 1;
#else
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    cudaGraphExec_t exec = nullptr;
    cudaError_t inst = cudaErrorUnknown;
    if (end == cudaSuccess && capture_error_.ok()) {
      inst = cudaGraphInstantiate(&exec, graph, 0);
    }
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (end != cudaSuccess || inst != cudaSuccess || !capture_error_.ok()) {
      cudaGetLastError();  // a failed capture leaves no sticky error behind
      if (!capture_error_.ok()) return capture_error_;
      const cudaError_t e = end != cudaSuccess ? end : inst;
      return Internal(std::string("backend cuda: capturing a graph failed: ") +
                      cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
    }
    graphs_.push_back(exec);
    return static_cast<int>(graphs_.size()) - 1;
#endif
  }
#ifndef HELIX_CUDA_EMULATION
  // The GEMMs' activation-conversion workspace, grown to `ws` bytes; false (error noted) when
  // that fails.
  bool GrowGemmWorkspace(size_t ws) {
    if (ws <= gemm_ws_bytes_) return true;
    if (capturing_) {
      Refuse("GEMM workspace growth");
      return false;
    }
    if (gemm_ws_ != nullptr) Free(gemm_ws_);
    gemm_ws_ = nullptr;
    gemm_ws_bytes_ = 0;
    ++scratch_moves_;
    if (cudaMalloc(&gemm_ws_, ws) != cudaSuccess) {
      cudaGetLastError();  // out of memory is not sticky; the step fails with it
      gemm_ws_ = nullptr;
      Note(cudaErrorMemoryAllocation, "GEMM workspace cudaMalloc");
      return false;
    }
    gemm_ws_bytes_ = ws;
    return true;
  }
#endif
  void BindDevice() {
#ifndef HELIX_CUDA_EMULATION
    cudaSetDevice(device_);
#endif
  }
  // Runs one queued op (a CUDA capture records it by itself); the emulation records the closure
  // while capturing.
  template <typename F>
  void Op(const char* what, F&& f) {
    ++ops_queued_[what];
#ifdef HELIX_CUDA_EMULATION
    if (capturing_) {
      emu_graphs_.back().push_back([this, what, f] { Note(f(), what); });
      return;
    }
#endif
    Note(f(), what);
  }
  cudaError_t Memcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
#ifdef HELIX_CUDA_EMULATION
    (void)kind;
    std::memmove(dst, src, bytes);
    return cudaSuccess;
#else
    return cudaMemcpyAsync(dst, src, bytes, kind, stream_);
#endif
  }
  // The split the attention launch and its workspace size both use (same shapes, same split).
  kernels::PagedAttentionParams WithSplit(kernels::PagedAttentionParams p) const {
    if (p.kv_split_tokens == 0) {
      p.kv_split_tokens =
          options_.attention_split_tokens > 0
              ? options_.attention_split_tokens
              : kc::PagedAttentionCudaSplitTokens(p, options_.attention_min_chunk_tokens);
    }
    return p;
  }
  // The caller's L2 prefetch hint cut to CudaBackendOptions::l2_prefetch_bytes (its first range
  // first), each range to whole 16-byte units from its first aligned byte (none when the option
  // is 0); its kv_settled_below_q promise kept only with attention_early_kv.
  kernels::PagedAttentionParams WithPrefetch(kernels::PagedAttentionParams p) const {
    p.kv_settled_below_q = p.kv_settled_below_q && options_.attention_early_kv;
    int64_t left = options_.l2_prefetch_bytes;
    for (int r = 0; r < 2; ++r) {
      const auto at = reinterpret_cast<uintptr_t>(p.l2_prefetch[r]);
      const int64_t skip = static_cast<int64_t>((16 - at % 16) % 16);
      const int64_t n = std::min(left, p.l2_prefetch_bytes[r] - skip) / 16 * 16;
      if (at == 0 || n <= 0) {
        p.l2_prefetch[r] = nullptr;
        p.l2_prefetch_bytes[r] = 0;
        continue;
      }
      p.l2_prefetch[r] = static_cast<const unsigned char*>(p.l2_prefetch[r]) + skip;
      p.l2_prefetch_bytes[r] = n;
      left -= n;
    }
    return p;
  }
  // The caller's MLA split suits the CPU's threads; here one wave of thread blocks over the
  // GPU's SMs decides (or the test option). Shapes only: fixed for a graph's bucket.
  kernels::MlaAttentionParams WithMlaSplit(kernels::MlaAttentionParams p) const {
    p.kv_split_tokens = options_.attention_split_tokens > 0 ? options_.attention_split_tokens
                                                            : kc::MlaAttentionCudaSplitTokens(p);
    return p;
  }
  // Something a capture may not do: the capture fails (EndCapture says what).
  std::nullptr_t Refuse(const char* what) {
    if (capture_error_.ok()) {
      capture_error_ =
          FailedPrecondition(std::string("backend cuda: ") + what + " while capturing a graph");
    }
    return nullptr;
  }
  // Keeps the first error (while capturing: the capture's); false when `err` is one.
  bool Note(cudaError_t err, const char* what) {
    if (err == cudaSuccess) return true;
    Status& slot = capturing_ ? capture_error_ : error_;
    if (slot.ok()) {
      slot = Internal(std::string("backend cuda: ") + what + " failed: " + cudaGetErrorName(err) +
                      " (" + cudaGetErrorString(err) + ")");
      HELIX_LOG(kError) << slot.message();
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
  cudaStream_t upload_stream_ = nullptr;  // Upload's copies, beside the ops
  uint64_t upload_marks_ = 0;
#ifndef HELIX_CUDA_EMULATION
  std::deque<std::pair<uint64_t, cudaEvent_t>> upload_events_;  // (mark, its event), in order
  cublasHandle_t cublas_ = nullptr;
  void* cublas_ws_ = nullptr;
  std::vector<cudaGraphExec_t> graphs_;
#else
  std::vector<std::vector<std::function<void()>>> emu_graphs_;
#endif
  void* gemm_ws_ = nullptr;
  size_t gemm_ws_bytes_ = 0;
  void* argmax_ws_ = nullptr;  // kArgmaxWorkspace bytes with options_.split_argmax
  struct Converted {           // what the last GemmCuda converted into gemm_ws_
    const float* x = nullptr;
    int64_t m = 0, k = 0;
    kernels::DType dtype = kernels::DType::kF32;
  } converted_;
  bool capturing_ = false;
  uint64_t scratch_moves_ = 0;
  std::vector<std::pair<void*, bool>> deferred_frees_;  // (pointer, host) freed after a capture
  Status error_, capture_error_;
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
  kc::SetProgrammaticLaunch(options.programmatic_launch);
  kc::SetPagedAttentionCudaTensorCores(options.attention_tensor_cores);
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace helix
