// CPU backend: the reference implementation of every op, multi-threaded over one pool. Its
// memory is host memory, so copies are memcpy and nothing is queued (Sync has nothing to wait
// for). Not thread-safe (one engine thread per rank drives it).
#pragma once

#include <memory>

#include "engine/backend/backend.h"
#include "kernels/thread_pool.h"

namespace helix {

class CpuBackend final : public Backend {
 public:
  // num_threads 0 = all hardware threads.
  explicit CpuBackend(int num_threads);
  const char* name() const override { return "cpu"; }
  int num_threads() const { return pool_->size(); }

  bool host_memory() const override { return true; }
  void* Alloc(size_t bytes) override;
  void Free(void* p) override;
  void* AllocHost(size_t bytes) override { return Alloc(bytes); }
  void FreeHost(void* p) override { Free(p); }
  void CopyToDevice(void* dst, const void* src, size_t bytes) override;
  Status CopyToHost(void* dst, const void* src, size_t bytes) override;
  void CopyDevice(void* dst, const void* src, size_t bytes) override;
  void CopyDevice2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                    size_t rows) override;
  void CopyToHostAsync(void* dst, const void* src, size_t bytes) override {
    CopyToDevice(dst, src, bytes);  // both host memory
  }
  Status Sync() override { return Status::Ok(); }

  void Gemm(const kernels::GemmParams& p) override;
  void GemmBatched(const kernels::GemmBatchedParams& p) override;
  void RmsNorm(const kernels::RmsNormParams& p) override;
  void Rope(const kernels::RopeParams& p) override;
  void SiluMul(const kernels::SiluMulParams& p) override;
  void Add(float* x, const float* y, int64_t n) override;
  void ScatterAddRows(const float* y, const int32_t* rows, const float* w, int64_t n, int64_t dim,
                      float* out) override;
  void Zero(void* p, size_t bytes) override;
  void GatherRows(const float* in, int64_t stride, const int32_t* rows, int64_t num_rows, int64_t n,
                  float* out) override;
  void WriteKvBatch(const kernels::KvPoolView& kv, int64_t layer, const float* k, const float* v,
                    const int32_t* block, const int32_t* slot, int64_t tokens) override;
  size_t PagedAttentionWorkspaceBytes(const kernels::PagedAttentionParams& p) override;
  void PagedAttention(const kernels::PagedAttentionParams& p, void* workspace) override;
  void MergeStates(const kernels::MergeStatesParams& p) override;
  void PackCombine(const float* att, const float* lse, int64_t tokens, int64_t peers, int64_t hp,
                   int64_t dim, float* send) override;
  void UnpackCombine(const float* recv, int64_t peers, int64_t rows, int64_t dim, float* parts_o,
                     float* parts_lse) override;
  size_t MlaAttentionWorkspaceBytes(const kernels::MlaAttentionParams& p) override;
  void MlaAttention(const kernels::MlaAttentionParams& p, void* workspace) override;
  void Embedding(const float* table, int64_t vocab, const int32_t* ids, int64_t n, int64_t dim,
                 float* out) override;

 private:
  std::unique_ptr<kernels::ThreadPool> pool_;
};

}  // namespace helix
