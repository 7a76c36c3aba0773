// CUDA versions of the element-wise and row-wise ops of kernels/ (RMSNorm, RoPE, K/V write,
// SiLU*mul), the embedding gather and token selection (greedy argmax, top-k / top-p / min-p
// sampling). Same Params and semantics as the CPU kernels where one exists; every pointer is a
// device pointer. Launchers are stateless and thread-safe, never allocate or synchronise
// (except the debug-build launch check) and return the launch's cudaError_t. Those with a thread
// block per row (RMSNorm, argmax, sampling) refuse more than 2^31 - 1 rows (a grid's limit) with
// cudaErrorInvalidValue.
#ifndef HELIX_KERNELS_CUDA_OPS_CUDA_H_
#define HELIX_KERNELS_CUDA_OPS_CUDA_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/attention.h"
#include "kernels/dtype.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/silu_mul.h"

namespace helix::kernels::cuda {

// Programmatic dependent launch of the decode-step kernels (ops here, GemvCuda, GemmCuda's
// conversions, decode attention and its merge; Hopper and later): each may be launched while
// the kernel before it in the stream runs, and waits for it before touching memory, which hides
// the launch gaps between the step's ~200 small kernels. Process-wide, on by default
// (CudaBackendOptions::programmatic_launch; decode_bench --pdl 0 measures without it).
void SetProgrammaticLaunch(bool on);

// RmsNormCpu semantics (sum of squares in double; residual += x first when set). p.weight must
// not be written by a kernel queued before it on the stream: it is read before the programmatic
// launch's wait (a model's norm weights are written only by uploads).
cudaError_t RmsNormCuda(const RmsNormParams& p, cudaStream_t stream);

// RopeCpu semantics: angles and their sine / cosine in double, both styles, an optional
// inv_freq table (a device pointer) and mscale (yarn).
cudaError_t RopeCuda(const RopeParams& p, cudaStream_t stream);

// SiluMulCpu semantics.
cudaError_t SiluMulCuda(const SiluMulParams& p, cudaStream_t stream);

// x[i] += y[i] for i < n (the residual add).
struct AddParams {
  float* x;
  const float* y;
  int64_t n;
};
cudaError_t AddCuda(const AddParams& p, cudaStream_t stream);

// out[rows[j]][d] += w[j] * y[j][d] for j < n, d < dim. REQUIRES: distinct rows.
struct ScatterAddRowsParams {
  const float* y;       // [n][dim]
  const int32_t* rows;  // [n]
  const float* w;       // [n]
  int64_t n, dim;
  float* out;
};
cudaError_t ScatterAddRowsCuda(const ScatterAddRowsParams& p, cudaStream_t stream);

// out[r][0..n) = in[rows[r] * stride + 0..n) for r < num_rows (the rows that get logits).
struct GatherRowsParams {
  const float* in;
  int64_t stride;
  const int32_t* rows;  // [num_rows]
  int64_t num_rows, n;
  float* out;  // [num_rows][n]
};
cudaError_t GatherRowsCuda(const GatherRowsParams& p, cudaStream_t stream);

// The Helix combine's all-to-all layout (see engine/model/llama_model.cc CombineAttention):
// pack: send[c][t][h][0..dim) = att[t][c * heads_per_peer + h], send[c][t][h][dim] = that
// head's LSE, for c < peers; unpack: recv[i][r][0..dim] -> parts_o[i][r][0..dim), parts_lse[i][r].
struct PackCombineParams {
  const float* att;  // [tokens][peers * heads_per_peer][dim]
  const float* lse;  // [tokens][peers * heads_per_peer]
  float* send;       // [peers][tokens][heads_per_peer][dim + 1]
  int64_t tokens, peers, heads_per_peer, dim;
};
cudaError_t PackCombineCuda(const PackCombineParams& p, cudaStream_t stream);
struct UnpackCombineParams {
  const float* recv;  // [peers][rows][dim + 1]
  float* parts_o;     // [peers][rows][dim]
  float* parts_lse;   // [peers][rows]
  int64_t peers, rows, dim;
};
cudaError_t UnpackCombineCuda(const UnpackCombineParams& p, cudaStream_t stream);

// K/V of a batch of tokens into their block slots (WriteKv for each token), converted to the
// pool dtype with round-to-nearest-even.
struct WriteKvBatchParams {
  KvPoolView kv;  // kv.base on the device
  int64_t layer;
  const float* k;                 // [tokens][kv.num_kv_heads][kv.head_dim]
  const float* v;                 // [tokens][kv.num_kv_heads][kv.head_dim]
  const int32_t* block;           // [tokens] physical block of each token; < 0: not stored here
                                  // (a Helix rank that does not own the token's position)
  const int32_t* token_in_block;  // [tokens] slot within the block
  int64_t tokens;
};
cudaError_t WriteKvBatchCuda(const WriteKvBatchParams& p, cudaStream_t stream);

// WriteKv's signature: one token whose block and slot the host knows.
cudaError_t WriteKvCuda(const KvPoolView& view, int64_t block, int64_t layer,
                        int64_t token_in_block, const float* k, const float* v,
                        cudaStream_t stream);

// RopeWriteKvParams (kernels/rope.h): the decode step's RoPE and K/V write in one launch.
cudaError_t RopeWriteKvCuda(const RopeWriteKvParams& p, cudaStream_t stream);

struct EmbeddingParams {
  const void* table;  // [vocab][dim] of dtype
  DType dtype = DType::kF32;
  const int32_t* ids;  // [n]
  float* out;          // [n][dim]; row i = table[ids[i]] in fp32, zeros for an id outside
                       // [0, vocab)
  int64_t n, dim, vocab;
};
cudaError_t EmbeddingCuda(const EmbeddingParams& p, cudaStream_t stream);

// Greedy token of each row, exactly as engine/sampler's temperature 0: the first index of the
// largest logit (ties -> lowest id); NaN logits never win, and a row with nothing but NaN and
// -inf gives kArgmaxNoToken.
// One thread block per row; with a workspace (ArgmaxCudaWorkspaceBytes) each row is cut into up
// to kArgmaxMaxChunks chunks of at least kArgmaxMinChunk logits (a multiple of 4), one thread
// block each, whose winners a second kernel reduces (one thread block alone reads a 128K-entry
// row at a fraction of the memory bandwidth).
// A NaN logit is never the largest; a row of nothing but NaN and -inf gives kArgmaxNoToken
// (engine/sampler fails such a request).
constexpr int32_t kArgmaxNoToken = -2;
struct ArgmaxParams {
  const float* logits;  // [rows][vocab]
  int32_t* out;         // [rows]
  int64_t rows, vocab;
  void* workspace = nullptr;  // nullptr, or ArgmaxCudaWorkspaceBytes(*this) bytes, 4-aligned
};
constexpr int64_t kArgmaxMaxChunks = 32;
constexpr int64_t kArgmaxMinChunk = 128;
// Bytes of workspace for the chunked argmax of p: 0 when a row is one chunk (then the workspace
// is not used), else a (value, id) pair per chunk of every row.
size_t ArgmaxCudaWorkspaceBytes(const ArgmaxParams& p);
cudaError_t ArgmaxCuda(const ArgmaxParams& p, cudaStream_t stream);

// Temperature / top-k / top-p / min-p sampling of each row as engine/sampler does it (after
// its penalties): candidates sorted by (logit / temperature desc, id asc), cut to top_k
// (<= 0 or >= vocab: off), then to the shortest prefix whose probability reaches top_p
// (>= 1: off), then to the tokens whose probability is >= min_p x the top one's; the token is
// the first candidate whose cumulative probability exceeds u x (kept mass). u is the
// request's uniform draw in [0, 1) (the CPU sampler's std::uniform_real_distribution<double>
// on its generator), so the same u picks the same token on both backends up to rounding at a
// boundary. Probabilities are exp(logit / T - max) in double. Done without a full sort:
// radix selection over the logits' bit patterns, a few passes over each row.
// A row with temperature <= 0 (greedy: the argmax gives its token) is skipped with out = -1,
// so that a captured decode step can run both kernels over every row. Non-finite logits as the
// sampler takes them: NaN is no candidate, +inf logits share the whole mass, and a row of
// nothing but NaN and -inf gives kArgmaxNoToken.
struct SampleParams {
  const float* logits;       // [rows][vocab]
  const float* temperature;  // [rows]
  const int32_t* top_k;      // [rows]
  const float* top_p;        // [rows]
  const float* min_p;        // [rows]
  const double* u;           // [rows]
  int32_t* out;              // [rows]
  int64_t rows, vocab;
};
cudaError_t SampleCuda(const SampleParams& p, cudaStream_t stream);

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_OPS_CUDA_H_
