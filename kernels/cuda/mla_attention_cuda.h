// CUDA Multi-head Latent Attention decode (DeepSeek V2/V3 absorbed form) over a one-plane paged
// KV pool: same Params and semantics as MlaAttentionCpu (kernels/mla_attention.h), every
// pointer a device pointer. Launchers are stateless and thread-safe; they never allocate or
// synchronise (except the debug-build launch check) and return the launch's cudaError_t.
#ifndef HELIX_KERNELS_CUDA_MLA_ATTENTION_CUDA_H_
#define HELIX_KERNELS_CUDA_MLA_ATTENTION_CUDA_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/mla_attention.h"

namespace helix::kernels::cuda {

// The kv_split_tokens to put in p for this device: cuts each sequence's blocks into chunks so
// that one wave of thread blocks fills every SM (chunks of at least 256 tokens), or 0 (no
// split) when the batch's (query token, head group) thread blocks alone fill the GPU. Uses p's
// shapes only (max_blocks_per_seq as the length bound: kv_lens stay on the device). Host
// function; queries the current device (and sets the kernel's shared memory opt-in, so call
// it, or MlaAttentionCuda, once before capturing a CUDA graph).
int64_t MlaAttentionCudaSplitTokens(const MlaAttentionParams& p);

// Bytes of workspace MlaAttentionCuda needs for p (p.kv_split_tokens included): 0 without
// split-KV, else [parts][num_q_tokens * num_heads][latent_dim] partial outputs then
// [parts][num_q_tokens * num_heads] LSEs, fp32 (the MlaAttentionWorkspaceBytes layout).
size_t MlaAttentionCudaWorkspaceBytes(const MlaAttentionParams& p);

// Online-softmax MLA attention, fp32 accumulation, the pool read as stored (f32, f16, bf16).
// One thread block per (query token, group of 16 heads, KV chunk): each tile of 32 cached rows
// [c_kv | k_pe] is copied once into shared memory through a cp.async ring and used by all the
// group's heads for the scores (q_lat . c_kv + q_pe . k_pe) and for the values (c_kv). With
// split-KV the chunks' (O, LSE) go to the workspace and MergeStatesCuda combines them. A query
// token that sees no KV gets out = 0, lse = -inf.
// REQUIRES: the CPU version's REQUIRES; device pointers; latent_dim <= 512 and latent_dim +
//   rope_dim <= 576 (else cudaErrorInvalidValue); workspace holds
//   MlaAttentionCudaWorkspaceBytes(p) bytes (nullptr when that is 0), 256-byte aligned as
//   cudaMalloc returns; chunks per sequence <= 65535.
cudaError_t MlaAttentionCuda(const MlaAttentionParams& p, void* workspace, cudaStream_t stream);

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_MLA_ATTENTION_CUDA_H_
