// CUDA backend: every Backend op on one GPU (kernels/cuda, GEMMs through cuBLAS), queued in
// order on one stream; memory is device memory, staging memory is pinned. Errors of launches
// and runtime calls are kept (the first one) and returned by every later CopyToHost, Sync and
// Activate: a CUDA error leaves the backend failed (most are sticky in the CUDA context too).
// Built only when CUDA is enabled (HELIX_HAVE_CUDA_BACKEND). Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>

#include "engine/backend/backend.h"
#include "engine/common/status.h"

namespace helix {

struct CudaBackendOptions {
  // The GPU: `device` modulo the visible devices (ranks share GPUs when there are fewer).
  int device = 0;
  // Split-KV chunk of decode attention (GQA and MLA) in tokens, a multiple of tokens_per_block;
  // 0: the kernel's choice (one wave of thread blocks over the GPU). Tests set it to exercise
  // the split path on small contexts.
  int64_t attention_split_tokens = 0;
  // The shortest chunk the kernel's own split may pick (kernels::cuda::
  // PagedAttentionCudaSplitTokens' min_chunk_tokens; 0: its default, 128 tokens). Longer chunks
  // mean fewer thread blocks and fewer parts to merge (decode_bench --attn-min-chunk N).
  int64_t attention_min_chunk_tokens = 0;
  // Decode GEMMs with 16-bit weights run as GemvCuda (fp32 x read directly: no conversion
  // kernel, no cuBLAS) where kernels::cuda::GemvPreferred says it beats cuBLAS (one row of x
  // always; a few rows on small matrices), and a packed gate|up GEMM with its SiLU·mul as one
  // GemvSiluMulCuda. Measured on an H100 (docs/benchmarks.md); false: cuBLAS for every GEMM.
  bool decode_gemv = true;
  // With decode_gemv: fold an RMSNorm into the GEMV that reads it where
  // kernels::cuda::GemvNormPreferred says that pays (and then the residual add before it into
  // the product that makes it); false: never (the other path, for tests and measurements).
  bool fold_norms = true;
  // Programmatic dependent launch of the decode-step kernels (kernels::cuda::
  // SetProgrammaticLaunch; process-wide: the last backend created sets it).
  bool programmatic_launch = true;
  // Decode attention over 16-bit KV with its q.K and P.V on the tensor cores (kernels::cuda::
  // SetPagedAttentionCudaTensorCores; process-wide: the last backend created sets it). On: on an
  // H100 it took the 1B shape's decode step from 1.427 to 1.365 ms at 8K context and its 32K
  // prefill from 10.25 to 1.32 s (docs/results/gpu-h100-2026-11-26c.md); false: the fp32-math
  // kernel (CUDA cores) everywhere. Ignored for f32 KV, other head dims and GPUs before sm_80.
  bool attention_tensor_cores = true;
  // Greedy sampling's argmax over each row in up to 32 chunks, one thread block each, then a
  // second kernel over the chunks' winners (kernels::cuda::ArgmaxCuda with a workspace);
  // false: one thread block per row (18 us for a 128K vocabulary on an H100). Off until
  // measured (decode_bench --split-argmax 1).
  bool split_argmax = false;
  // With decode_gemv and fold_norms: the GEMV that adds into the residual stream also leaves
  // each row's sum of squares in partials (kernels::GemmFusion::norm_sums_out), and the GEMV
  // that reads the stream next takes its RMSNorm from them (norm_sums_in) instead of a
  // separate RMSNorm kernel, whatever the shape (the norm costs it a few multiplies and no
  // block-wide step before its products). Off until measured (decode_bench --norm-sums 1).
  bool norm_sums = false;
  // With decode_gemv: the packed q|k|v GEMV also rotates q and k and writes k and v into the KV
  // pool (kernels::cuda::GemvRopeKvCuda, bit for bit the GEMV then RopeWriteKvCuda), one
  // kernel less per layer. Off until measured (decode_bench --gemv-rope 1).
  bool gemv_rope_kv = false;
  // Decode attention (head dims 64 and 128) has up to this many bytes of the products after it
  // (the attention output's, then the packed gate|up's weights: kernels::PagedAttentionParams::
  // l2_prefetch) prefetched into L2 as it runs, so that they read it from there instead of
  // memory. 0: none. Off until measured (decode_bench --l2-prefetch-mb N).
  int64_t l2_prefetch_bytes = 0;
  // Decode attention (head dims 64 and 128, one query token per sequence) issues its first KV
  // copies before it waits for the kernel before it (the caller's kernels::PagedAttentionParams::
  // kv_settled_below_q promise: only q and the query's own row come from that kernel), so that
  // they overlap it; false: the promise is dropped. Off until measured (decode_bench
  // --attn-early-kv 1).
  bool attention_early_kv = false;
};

// CUDA devices visible to this process (0 when none or on error).
int CudaDeviceCount();

// FailedPrecondition naming the CUDA error when no device is visible or it cannot be used.
StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options);
inline StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int device) {
  CudaBackendOptions o;
  o.device = device;
  return CreateCudaBackend(o);
}

}  // namespace helix
