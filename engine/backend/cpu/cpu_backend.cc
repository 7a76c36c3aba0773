#include "engine/backend/cpu/cpu_backend.h"

#include <cstring>

namespace helix {

CpuBackend::CpuBackend(int num_threads)
    : pool_(std::make_unique<kernels::ThreadPool>(num_threads)) {}

void CpuBackend::Gemm(const kernels::GemmParams& p) { kernels::GemmCpu(p, pool_.get()); }
void CpuBackend::RmsNorm(const kernels::RmsNormParams& p) { kernels::RmsNormCpu(p, pool_.get()); }
void CpuBackend::Rope(const kernels::RopeParams& p) { kernels::RopeCpu(p, pool_.get()); }
void CpuBackend::SiluMul(const kernels::SiluMulParams& p) { kernels::SiluMulCpu(p, pool_.get()); }

void CpuBackend::WriteKv(const kernels::KvPoolView& kv, int64_t block, int64_t layer, int64_t slot,
                         const float* k, const float* v) {
  kernels::WriteKv(kv, block, layer, slot, k, v);
}

size_t CpuBackend::PagedAttentionWorkspaceBytes(const kernels::PagedAttentionParams& p) {
  return kernels::PagedAttentionWorkspaceBytes(p);
}

void CpuBackend::PagedAttention(const kernels::PagedAttentionParams& p, void* workspace) {
  kernels::PagedAttentionCpu(p, workspace, pool_.get());
}

void CpuBackend::MergeStates(const kernels::MergeStatesParams& p) {
  kernels::MergeStatesCpu(p, pool_.get());
}

size_t CpuBackend::MlaAttentionWorkspaceBytes(const kernels::MlaAttentionParams& p) {
  return kernels::MlaAttentionWorkspaceBytes(p);
}

void CpuBackend::MlaAttention(const kernels::MlaAttentionParams& p, void* workspace) {
  kernels::MlaAttentionCpu(p, workspace, pool_.get());
}

void CpuBackend::Embedding(const float* table, const int32_t* ids, int64_t n, int64_t dim,
                           float* out) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(out + i * dim, table + static_cast<int64_t>(ids[i]) * dim, dim * sizeof(float));
  }
}

}  // namespace helix
