// The ops a model's forward pass needs, behind one interface so the CPU backend (the
// reference) and the CUDA backend are interchangeable. Pointers are in the backend's memory
// space. One Backend per rank; calls come from the engine thread only.
#pragma once

#include <cstddef>
#include <cstdint>

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

  virtual void Gemm(const kernels::GemmParams& p) = 0;
  virtual void RmsNorm(const kernels::RmsNormParams& p) = 0;
  virtual void Rope(const kernels::RopeParams& p) = 0;
  virtual void SiluMul(const kernels::SiluMulParams& p) = 0;
  // Writes one token's K and V (this rank's KV heads) into its block slot.
  virtual void WriteKv(const kernels::KvPoolView& kv, int64_t block, int64_t layer, int64_t slot,
                       const float* k, const float* v) = 0;
  virtual size_t PagedAttentionWorkspaceBytes(const kernels::PagedAttentionParams& p) = 0;
  virtual void PagedAttention(const kernels::PagedAttentionParams& p, void* workspace) = 0;
  virtual void MergeStates(const kernels::MergeStatesParams& p) = 0;
  // MLA decode attention in the latent space (absorbed form) over a one-plane pool.
  virtual size_t MlaAttentionWorkspaceBytes(const kernels::MlaAttentionParams& p) = 0;
  virtual void MlaAttention(const kernels::MlaAttentionParams& p, void* workspace) = 0;
  // out[i] = table[ids[i]] rows of `dim` floats.
  virtual void Embedding(const float* table, const int32_t* ids, int64_t n, int64_t dim,
                         float* out) = 0;
};

}  // namespace helix
