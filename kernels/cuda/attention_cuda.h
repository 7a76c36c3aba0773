// CUDA paged decode/prefill attention (flash-decoding split-KV) and the (O, LSE) merge that
// is both its second phase and the Helix combine. Same Params and semantics as the CPU
// kernels in kernels/attention.h and kernels/merge.h; every pointer in the Params is a device
// pointer. Launchers are stateless and thread-safe; they never allocate or synchronise
// (except the debug-build launch check) and return the launch's cudaError_t.
#ifndef HELIX_KERNELS_CUDA_ATTENTION_CUDA_H_
#define HELIX_KERNELS_CUDA_ATTENTION_CUDA_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/attention.h"
#include "kernels/merge.h"

namespace helix::kernels::cuda {

// The kv_split_tokens to put in p for this device: splits each sequence's blocks into chunks
// so that one wave of thread blocks fills every SM, chunks no shorter than min_chunk_tokens
// (0: PagedAttentionCudaTuning::min_chunk_tokens, else 128), or 0 (no split) when the batch
// alone fills the GPU. Uses p's shapes only (max_blocks_per_seq as the length bound: kv_lens
// stay on the device). Host function; queries the current device.
int64_t PagedAttentionCudaSplitTokens(const PagedAttentionParams& p, int64_t min_chunk_tokens = 0);

// Which kernel PagedAttentionCuda runs for p under the current tuning (see
// PagedAttentionCudaTuning): "mma" (warp-pipelined, tensor-core math), "mma_prefill" (tensor-core
// math, the KV shared by the query tokens of a sequence: calls with more query tokens than
// sequences and no split-KV), "warp" (warp-pipelined, fp32 math), "loadonly" (the benchmark's
// copies-only variant) or "generic" (other head dims).
// Host function; queries the current device.
const char* PagedAttentionCudaKernelName(const PagedAttentionParams& p);

// Bytes of workspace PagedAttentionCuda needs for p (p.kv_split_tokens included): 0 without
// split-KV, else [parts][rows][head_dim] partial outputs then [parts][rows] LSEs, fp32.
size_t PagedAttentionCudaWorkspaceBytes(const PagedAttentionParams& p);

// Online-softmax attention, fp32 accumulation, K/V read as stored (f32, f16, bf16). One
// thread block per (query token, KV head, sub-group of <= 8 query heads, KV chunk); the query
// heads of a group share every K/V load. Head dims 64 and 128 take the warp-pipelined path
// (each warp streams its own rows through a private 16-byte cp.async ring and keeps its own
// softmax state; the warps combine at the end); any other head dim (<= 256) a plain path. A query
// token that sees no KV gets out = 0, lse = -inf. NaN and infinities come out where the CPU
// kernel has them (see PagedAttentionCpu), with one exception: the tensor-core prefill kernel
// shares a KV tile among queries on both sides of the causal cut and multiplies a masked row's
// probability (0) by its V row, so a NaN or infinite V element there also makes that dimension
// NaN for the earlier queries of its tile (as flash-attention kernels do). With split-KV the
// chunks' (O, LSE) go to the workspace and MergeStatesCuda combines them. The first call for a
// (dtype, head dim, group) shape on a device sets the kernel's shared memory opt-in (a runtime
// call); make it, or PagedAttentionCudaSplitTokens, once before capturing a CUDA graph. With
// split-KV the merge is a programmatic dependent launch. p.l2_prefetch: the warp-pipelined kernel's
// thread blocks (head dims 64 and 128) share the ranges and each has its share bulk-prefetched into
// L2 (sm_90) before it waits for the kernel before it; other paths and older GPUs ignore them (a
// range breaking their rules is cudaErrorInvalidValue). REQUIRES: the CPU version's REQUIRES;
// device pointers; kv.base and q 16-byte aligned;
//   workspace holds PagedAttentionCudaWorkspaceBytes(p) bytes (nullptr when that is 0),
//   256-byte aligned as cudaMalloc returns; chunks per sequence (see kv_split_tokens)
//   <= 65535.
cudaError_t PagedAttentionCuda(const PagedAttentionParams& p, void* workspace, cudaStream_t stream);

// LSE = log sum_i exp(LSE_i), O = sum_i exp(LSE_i - LSE) O_i, empty parts (-inf) skipped, an
// all-empty row gives O = 0, LSE = -inf (MergeStatesCpu semantics). Helix combine layout
// [peers][tokens][heads][dim]: num_parts = peers, rows = tokens * heads. One thread block per
// row; where the row's parts fit its threads (up to 8 each: 64 parts at head dim 128, 128 at 64)
// and the layout allows 16-byte loads, every LSE and O value is loaded at once (one pass), else
// the LSEs first and the O values after them. A NaN LSE makes the row NaN (MergeStatesCpu).
cudaError_t MergeStatesCuda(const MergeStatesParams& p, cudaStream_t stream);

// Whether PagedAttentionCuda does the math of 16-bit KV on the tensor cores (as
// PagedAttentionCudaTuning::tensor_cores, which also turns it on). Process-wide; off here until
// set (the kernel library's default, the fp32-math kernel); the CUDA backend sets it from
// CudaBackendOptions::attention_tensor_cores, on by default since it was measured faster on an
// H100 (docs/results/gpu-h100-2026-11-26c.md; attention_bench's "mma" variants). Safe to call
// while other threads launch; set it before capturing graphs that should use it.
void SetPagedAttentionCudaTensorCores(bool on);

// Benchmark and test knobs of PagedAttentionCuda / PagedAttentionCudaSplitTokens,
// process-wide. Not synchronised: set them from one thread while no other thread launches or
// sizes attention (the split and workspace must be computed under the same knobs as the
// launch). Zero / false keeps the default.
struct PagedAttentionCudaTuning {
  int warps_per_block = 0;       // head dims 64 / 128: warps per thread block, 1..8 (default 4,
                                 // or 8 for <= 16 query tokens x KV heads)
  int stages = 0;                // head dims 64 / 128: cp.async ring depth per warp, 2..4
                                 // (default 4, or 3 where a step exceeds 4 KiB or with 8
                                 // default warps)
  int prefetch_steps = 0;        // tokens_per_block a multiple of 8: L2 bulk-prefetch distance
                                 // in steps beyond the ring (default none; < 0: none)
  int64_t min_chunk_tokens = 0;  // shortest split-KV chunk PagedAttentionCudaSplitTokens picks
                                 // (default 128)
  bool load_only = false;        // bf16, head dims 64 / 128, groups <= 4: only the K/V copies, no
                                 // math (the output is meaningless): the kernel's memory ceiling
  bool bulk_copy = false;        // head dims 64 / 128, tokens_per_block a multiple of 8, sm_90:
                                 // each warp step's K and V rows arrive as two TMA bulk copies
                                 // completing on an mbarrier (instead of 16-byte cp.async per
                                 // lane); ignored on older GPUs. The rows a partial step does not
                                 // copy keep an earlier step's values, so there a NaN or
                                 // infinite V element of an earlier row becomes NaN (0 x inf) in
                                 // its dimension: not the CPU's non-finite positions
  bool tensor_cores = false;     // f16 / bf16 KV, head dims 64 / 128, sm_80+: q.K and P.V of
                                 // each warp step on the tensor cores (mma.sync), 8 query heads
                                 // per thread block, q and P split into two 16-bit halves each
                                 // (about fp32 accuracy); and calls with more query tokens than
                                 // sequences (prefill) and no split-KV on a kernel whose thread
                                 // blocks share each KV tile among 64 (query token, head) rows of
                                 // one sequence (rows of blocks that span sequences, e.g. decode
                                 // tokens batched with a prompt, go to the decode kernel after
                                 // it); ignored for f32 KV and older GPUs. With f16 KV, q x
                                 // scale x log2(e) must stay within f16's range (65504)
  bool merge_two_pass = false;   // the split-KV merge and MergeStatesCuda always on the two-pass
                                 // kernel (LSEs, then the O values), not the one-pass one that
                                 // loads both at once where a row's parts fit its threads
};
void SetPagedAttentionCudaTuningForTesting(const PagedAttentionCudaTuning& t);

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_ATTENTION_CUDA_H_
