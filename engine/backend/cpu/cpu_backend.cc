#include "engine/backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace helix {

CpuBackend::CpuBackend(int num_threads)
    : pool_(std::make_unique<kernels::ThreadPool>(num_threads)) {}

void* CpuBackend::Alloc(size_t bytes) {
  return std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
}
void CpuBackend::Free(void* p) { std::free(p); }

void CpuBackend::CopyToDevice(void* dst, const void* src, size_t bytes) {
  if (bytes > 0 && dst != src) std::memcpy(dst, src, bytes);
}
Status CpuBackend::CopyToHost(void* dst, const void* src, size_t bytes) {
  if (bytes > 0 && dst != src) std::memcpy(dst, src, bytes);
  return Status::Ok();
}
void CpuBackend::CopyDevice(void* dst, const void* src, size_t bytes) {
  if (bytes > 0 && dst != src) std::memmove(dst, src, bytes);
}

void CpuBackend::CopyDevice2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                              size_t width, size_t rows) {
  for (size_t r = 0; r < rows; ++r) {
    std::memmove(static_cast<char*>(dst) + r * dst_pitch,
                 static_cast<const char*>(src) + r * src_pitch, width);
  }
}

void CpuBackend::PackCombine(const float* att, const float* lse, int64_t tokens, int64_t peers,
                             int64_t hp, int64_t dim, float* send) {
  for (int64_t c = 0; c < peers; ++c) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < hp; ++h) {
        const int64_t src = (t * peers + c) * hp + h;
        float* dst = send + ((c * tokens + t) * hp + h) * (dim + 1);
        std::memcpy(dst, att + src * dim, dim * sizeof(float));
        dst[dim] = lse[src];
      }
    }
  }
}

void CpuBackend::UnpackCombine(const float* recv, int64_t peers, int64_t rows, int64_t dim,
                               float* parts_o, float* parts_lse) {
  for (int64_t r = 0; r < peers * rows; ++r) {
    std::memcpy(parts_o + r * dim, recv + r * (dim + 1), dim * sizeof(float));
    parts_lse[r] = recv[r * (dim + 1) + dim];
  }
}

void CpuBackend::Gemm(const kernels::GemmParams& p) { kernels::GemmCpu(p, pool_.get()); }
void CpuBackend::GemmBatched(const kernels::GemmBatchedParams& p) {
  kernels::GemmBatchedCpu(p, pool_.get());
}
void CpuBackend::RmsNorm(const kernels::RmsNormParams& p) { kernels::RmsNormCpu(p, pool_.get()); }
void CpuBackend::Rope(const kernels::RopeParams& p) { kernels::RopeCpu(p, pool_.get()); }
void CpuBackend::SiluMul(const kernels::SiluMulParams& p) { kernels::SiluMulCpu(p, pool_.get()); }

void CpuBackend::Add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void CpuBackend::ScatterAddRows(const float* y, const int32_t* rows, const float* w, int64_t n,
                                int64_t dim, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    float* o = out + static_cast<int64_t>(rows[j]) * dim;
    const float* yj = y + j * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] += w[j] * yj[d];
  }
}

void CpuBackend::Zero(void* p, size_t bytes) {
  if (bytes > 0) std::memset(p, 0, bytes);
}

void CpuBackend::GatherRows(const float* in, int64_t stride, const int32_t* rows, int64_t num_rows,
                            int64_t n, float* out) {
  for (int64_t r = 0; r < num_rows; ++r) {
    std::memcpy(out + r * n, in + static_cast<int64_t>(rows[r]) * stride, n * sizeof(float));
  }
}

void CpuBackend::WriteKvBatch(const kernels::KvPoolView& kv, int64_t layer, const float* k,
                              const float* v, const int32_t* block, const int32_t* slot,
                              int64_t tokens) {
  const int64_t row = kv.num_kv_heads * kv.head_dim;
  for (int64_t t = 0; t < tokens; ++t) {
    if (block[t] < 0) continue;
    kernels::WriteKv(kv, block[t], layer, slot[t], k + t * row,
                     v == nullptr ? nullptr : v + t * row);
  }
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

void CpuBackend::Embedding(const float* table, int64_t /*vocab*/, const int32_t* ids, int64_t n,
                           int64_t dim, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(out + i * dim, table + static_cast<int64_t>(ids[i]) * dim, dim * sizeof(float));
  }
}

}  // namespace helix
