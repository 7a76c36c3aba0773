// CPU backend: the reference implementation of every op, multi-threaded over one pool.
// Not thread-safe (one engine thread per rank drives it).
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

  void Gemm(const kernels::GemmParams& p) override;
  void RmsNorm(const kernels::RmsNormParams& p) override;
  void Rope(const kernels::RopeParams& p) override;
  void SiluMul(const kernels::SiluMulParams& p) override;
  void WriteKv(const kernels::KvPoolView& kv, int64_t block, int64_t layer, int64_t slot,
               const float* k, const float* v) override;
  size_t PagedAttentionWorkspaceBytes(const kernels::PagedAttentionParams& p) override;
  void PagedAttention(const kernels::PagedAttentionParams& p, void* workspace) override;
  void MergeStates(const kernels::MergeStatesParams& p) override;
  size_t MlaAttentionWorkspaceBytes(const kernels::MlaAttentionParams& p) override;
  void MlaAttention(const kernels::MlaAttentionParams& p, void* workspace) override;
  void Embedding(const float* table, const int32_t* ids, int64_t n, int64_t dim,
                 float* out) override;

 private:
  std::unique_ptr<kernels::ThreadPool> pool_;
};

}  // namespace helix
