// The ops a model's forward pass needs, behind one interface so the CPU backend (the
// reference) and the CUDA backend are interchangeable. Pointers are in the backend's memory
// space ("device" memory: host memory for the CPU backend) unless a comment says host. Ops are
// queued in order on the backend's one stream; CopyToHost and Sync wait for them. One Backend
// per rank; calls come from one thread at a time (the rank's engine thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/common/status.h"
#include "kernels/attention.h"
#include "kernels/gemm.h"
#include "kernels/merge.h"
#include "kernels/mla_attention.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/silu_mul.h"

namespace helix {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // True when backend memory is host memory that the caller may read and write directly (the
  // CPU backend); then the copies below are plain memcpy and callers may skip them.
  virtual bool host_memory() const = 0;
  // True when the host may read and write backend memory through its pointers: host_memory(),
  // or a device backend on the CPU emulation of CUDA (tests).
  virtual bool host_addressable() const { return host_memory(); }

  // Binds the calling thread to the backend's device (CUDA: the current device is per thread).
  // Call it on the thread that runs the ops before the first op of a step.
  virtual Status Activate() { return Status::Ok(); }

  // Which device this backend computes on, unique across hosts (CUDA: host name and GPU UUID);
  // "" for the CPU backend. Ranks compare them to tell whether each has its own GPU.
  virtual std::string DeviceId() { return ""; }
  // Free backend memory in bytes (CUDA: cudaMemGetInfo), or -1 when backend memory is host
  // memory (then /proc/meminfo says).
  virtual int64_t FreeMemoryBytes() { return -1; }
  // Backend memory, at least 256-byte aligned; nullptr when out of memory. Free is ordered
  // after the ops already queued (the memory may still be in use by them). Free(nullptr) is
  // a no-op.
  virtual void* Alloc(size_t bytes) = 0;
  virtual void Free(void* p) = 0;
  // Host memory the backend copies from and to fastest (CUDA: pinned), for staging; nullptr
  // when out of memory.
  virtual void* AllocHost(size_t bytes) = 0;
  virtual void FreeHost(void* p) = 0;
  // host -> backend, queued: `src` must stay unchanged until the next Sync or CopyToHost.
  virtual void CopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  // Uploads: host -> backend copies on a queue of their own that runs beside the ops (CUDA: a
  // second stream), for KV pulled into staging while the decode steps go on. `src` is AllocHost
  // memory that must stay unchanged until UploadsDone says so. FenceUploads marks the uploads
  // queued so far and makes the ops queued after it wait for them (no host wait); UploadsDone
  // tells whether the uploads up to a mark have finished (with `wait`, waits until they have).
  // Not while capturing. Defaults for backends with one queue: the copies join the ops.
  virtual void Upload(void* dst, const void* src, size_t bytes) { CopyToDevice(dst, src, bytes); }
  virtual uint64_t FenceUploads() { return 0; }
  // As FenceUploads, but the ops do not wait: only UploadsDone can tell about the mark.
  virtual uint64_t MarkUploads() { return 0; }
  virtual bool UploadsDone(uint64_t /*mark*/, bool /*wait*/) { return Sync().ok(); }
  // backend -> host: waits for every queued op, then copies. Returns the first error of any op
  // since the last check (the CUDA backend's launch and runtime errors).
  virtual Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;
  // backend -> backend, queued.
  virtual void CopyDevice(void* dst, const void* src, size_t bytes) = 0;
  // `rows` rows of `width` bytes: dst + r * dst_pitch <- src + r * src_pitch, queued.
  virtual void CopyDevice2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                            size_t width, size_t rows) = 0;
  // The stream the ops are queued on (CUDA: a cudaStream_t), for collectives that queue on it
  // too (NCCL); nullptr for the CPU backend.
  virtual void* native_stream() { return nullptr; }
  // backend -> host memory from AllocHost, queued (a graph may hold it): the data is there
  // after the next Sync.
  virtual void CopyToHostAsync(void* dst, const void* src, size_t bytes) = 0;
  // Waits for every queued op; returns the first error since the last check.
  virtual Status Sync() = 0;

  // Graphs (CUDA Graphs): between BeginCapture and EndCapture the ops are recorded, not run;
  // Replay(graph) runs the recording again, with kernel arguments as they were captured and
  // buffer contents as they are then. While capturing nothing may wait (CopyToHost, Sync) or
  // allocate. A failed capture is an error of EndCapture only (the backend stays usable).
  virtual bool SupportsGraphs() const { return false; }
  virtual Status BeginCapture() { return Unimplemented("this backend has no graphs"); }
  virtual StatusOr<int> EndCapture() { return Unimplemented("this backend has no graphs"); }
  virtual Status Replay(int /*graph*/) { return Unimplemented("this backend has no graphs"); }
  // Frees every graph (their buffers are about to move).
  virtual void DropGraphs() {}
  // How often the backend's own scratch (e.g. a GEMM workspace a graph holds) has moved.
  virtual uint64_t scratch_moves() const { return 0; }
  // How many ops of kernel `op` (e.g. "GemvCuda") the backend has queued, captures included;
  // -1 where it does not count (tests check which kernels a model's step took).
  virtual int64_t ops_queued(const std::string& /*op*/) const { return -1; }

  virtual void Gemm(const kernels::GemmParams& p) = 0;
  // `batch` GEMMs over strided views in one call (kernels/gemm.h GemmBatchedParams).
  virtual void GemmBatched(const kernels::GemmBatchedParams& p) = 0;
  virtual void RmsNorm(const kernels::RmsNormParams& p) = 0;
  virtual void Rope(const kernels::RopeParams& p) = 0;
  virtual void SiluMul(const kernels::SiluMulParams& p) = 0;
  // The packed gate|up product p, then act (the SiluMul that reads its two halves of each row
  // of p.y), in one op where the backend has one, with fusion f (its RMSNorm of x; no
  // accumulate): true = done (p.y may be left unwritten); false = nothing done, the caller runs
  // the separate ops (RmsNorm, Gemm(p), SiluMul(act)).
  virtual bool GemmSiluMul(const kernels::GemmParams& /*p*/, const kernels::SiluMulParams& /*act*/,
                           const kernels::GemmFusion& /*f*/) {
    return false;
  }
  // Gemm(p) with fusion f (the RMSNorm of its input, the residual add of its output) in one op
  // where the backend has it: true = done; false = nothing done, the caller runs the separate
  // ops (kernels::GemmFusion says which).
  virtual bool GemmFused(const kernels::GemmParams& /*p*/, const kernels::GemmFusion& /*f*/) {
    return false;
  }
  // Whether GemmFused(p, f) (silu_mul: GemmSiluMul(p, its packed act, f)) would run fused, for
  // a caller planning ahead (the residual add is folded into a product only when the next
  // product takes the norm that follows it).
  virtual bool TakesFusion(const kernels::GemmParams& /*p*/, const kernels::GemmFusion& /*f*/,
                           bool /*silu_mul*/) const {
    return false;
  }
  // Gemm(p) with fusion f, then RopeWriteKv(rk) over its output (p the packed q|k|v product whose
  // rows rk describes), in one op where the backend has it: true = done; false = nothing done.
  virtual bool GemmRopeWriteKv(const kernels::GemmParams& /*p*/, const kernels::GemmFusion& /*f*/,
                               const kernels::RopeWriteKvParams& /*rk*/) {
    return false;
  }
  // The partial sums of squares per row that GemmFused(p, f) writes with f.norm_sums_out (for
  // the next product's f.norm_sums_in), or 0 when this backend leaves none for p.
  virtual int64_t NormSumParts(const kernels::GemmParams& /*p*/) const { return 0; }
  // Whether Gemm of `rows` rows of x (k wide) with `w` weights reads x rounded to 16 bits (then
  // a producer's GemmParams::x_lowp copy saves it a conversion; false: such a copy goes unread).
  virtual bool GemmReadsLowpX(int64_t /*rows*/, int64_t /*k*/, kernels::DType w) const {
    return w != kernels::DType::kF32;
  }
  // x[i] += y[i] for i < n (the residual add).
  virtual void Add(float* x, const float* y, int64_t n) = 0;
  // out[rows[j]][d] += w[j] * y[j][d] for j < n, d < dim (an MoE expert's weighted output into
  // its tokens' rows). REQUIRES: the rows are distinct.
  virtual void ScatterAddRows(const float* y, const int32_t* rows, const float* w, int64_t n,
                              int64_t dim, float* out) = 0;
  // bytes of zeros at p, queued.
  virtual void Zero(void* p, size_t bytes) = 0;
  // out[r][0..n) = in[rows[r]][0..n) for r < num_rows, rows of `stride` floats in `in`; rows
  // in backend memory.
  virtual void GatherRows(const float* in, int64_t stride, const int32_t* rows, int64_t num_rows,
                          int64_t n, float* out) = 0;
  // Writes a batch of tokens' K and V (this rank's KV heads) into their block slots: token t
  // goes to (block[t], slot[t]) unless block[t] < 0 (another CP rank owns its position).
  // k, v: [tokens][kv.num_kv_heads][kv.head_dim] (v nullptr for a one-plane pool); block and
  // slot in backend memory.
  virtual void WriteKvBatch(const kernels::KvPoolView& kv, int64_t layer, const float* k,
                            const float* v, const int32_t* block, const int32_t* slot,
                            int64_t tokens) = 0;
  // RoPE of q and k (RopeParams semantics: base theta, no inverse-frequency table, mscale 1)
  // and WriteKvBatch of the rotated k and of v, as one op (kernels/rope.h RopeWriteKvParams).
  // Whether RopeWriteKv runs here; where it does not, callers run Rope, Rope and WriteKvBatch
  // (and keep q, k and v contiguous).
  virtual bool HasRopeWriteKv() const { return false; }
  // False (nothing done) where !HasRopeWriteKv().
  virtual bool RopeWriteKv(const kernels::RopeWriteKvParams& /*p*/) { return false; }
  virtual size_t PagedAttentionWorkspaceBytes(const kernels::PagedAttentionParams& p) = 0;
  virtual void PagedAttention(const kernels::PagedAttentionParams& p, void* workspace) = 0;
  virtual void MergeStates(const kernels::MergeStatesParams& p) = 0;
  // The Helix combine's all-to-all layout. Pack: att [tokens][peers * hp][dim] and lse
  // [tokens][peers * hp] -> send [peers][tokens][hp][dim + 1] (peer c gets heads [c hp, c hp +
  // hp) of every token, each head's LSE after its output). Unpack: recv [peers][rows][dim + 1]
  // -> parts_o [peers][rows][dim] and parts_lse [peers][rows] (MergeStates' input).
  virtual void PackCombine(const float* att, const float* lse, int64_t tokens, int64_t peers,
                           int64_t hp, int64_t dim, float* send) = 0;
  virtual void UnpackCombine(const float* recv, int64_t peers, int64_t rows, int64_t dim,
                             float* parts_o, float* parts_lse) = 0;
  // MLA decode attention in the latent space (absorbed form) over a one-plane pool.
  virtual size_t MlaAttentionWorkspaceBytes(const kernels::MlaAttentionParams& p) = 0;
  virtual void MlaAttention(const kernels::MlaAttentionParams& p, void* workspace) = 0;
  // Token selection per row of logits [rows][vocab] (arrays in backend memory): greedy[r] =
  // the first index of the largest logit, NaN never one (engine/sampler's temperature 0), or
  // kNoToken when the row holds nothing but NaN and -inf; sampled[r] = the
  // token temperature / top-k / top-p / min-p sampling picks with the uniform draw u[r] (as
  // engine/sampler does after its penalties; -1 where temperature[r] <= 0). Either output may
  // be nullptr (not wanted). False when the backend does not sample (the CPU backend: the engine
  // samples on the host from the logits).
  static constexpr int32_t kNoToken = -2;
  virtual bool SampleTokens(const float* /*logits*/, int64_t /*rows*/, int64_t /*vocab*/,
                            const float* /*temperature*/, const int32_t* /*top_k*/,
                            const float* /*top_p*/, const float* /*min_p*/, const double* /*u*/,
                            int32_t* /*greedy*/, int32_t* /*sampled*/) {
    return false;
  }
  // out[i] = table[ids[i]] rows of `dim` floats; REQUIRES: 0 <= ids[i] < vocab.
  virtual void Embedding(const float* table, int64_t vocab, const int32_t* ids, int64_t n,
                         int64_t dim, float* out) = 0;
};

}  // namespace helix
