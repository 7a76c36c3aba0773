#include "kernels/cuda/attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

// Threads of a plain-path thread block.
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Query heads one thread block serves (a GQA group, or a sub-group of a larger one).
constexpr int kMaxG = 8;
// KV rows per plain-path tile; equal to the warp size so the softmax step maps a row per lane.
constexpr int kTileRows = 32;
// Largest head dim of the plain (non-pipelined) path.
constexpr int kMaxGenericDim = 256;
// Split-KV chunks are never shorter than this many tokens (per-chunk start-up cost).
constexpr int64_t kMinChunkTokens = 128;

// Shapes of one call, precomputed on the host and passed by value.
struct Args {
  const float* q;
  const int32_t* q_seq;
  const int32_t* q_pos;
  const void* kv;
  int64_t block_elems;  // elements per pool block
  int64_t k_head_off;   // element offset of (layer, K, head 0, token 0) within a block
  int64_t head_stride;  // elements between consecutive KV heads (tokens_per_block * d)
  int64_t v_off;        // elements from a K row to the V row of the same token and head
  const int32_t* tables;
  const int32_t* first_pos;
  const int32_t* kv_lens;
  int64_t max_blocks;
  int64_t rows;  // num_q_tokens * num_q_heads
  int tpb, num_q_heads, num_kv_heads, group, d;
  int sub_size, subs;    // query heads per thread block (4 or 8), thread blocks per group
  int blocks_per_chunk;  // local blocks one thread block walks
  int parts;             // chunks per sequence; > 1 writes the workspace
  int stages;            // warp-pipelined path: ring depth, 2..kMaxStages
  int prefetch_steps;    // warp-pipelined path: L2 bulk prefetch distance beyond the ring
  bool bulk;             // warp-pipelined path, whole steps in a block: TMA bulk copies (sm_90)
  bool prefill_done;     // warp-pipelined path: skip the query tokens AttentionPrefillMmaKernel
                         // serves (PrefillBlockServed)
  bool early_kv;         // warp-pipelined path: PagedAttentionParams::kv_settled_below_q, one
                         // query token per sequence, whole steps in a block, cp.async copies
  float scale;
  float* out;
  float* lse;
  float* ws_o;    // [parts][rows][d] when parts > 1
  float* ws_lse;  // [parts][rows]
  // PagedAttentionParams::l2_prefetch (warp-pipelined path): the ranges the thread blocks share,
  // pf_share bytes each (PrefetchShareBytes).
  const unsigned char* pf[2];
  int64_t pf_bytes[2];
  int64_t pf_share;
};

// ---------------------------------------------------------------------------------------------
// Pieces shared by both paths.

struct Item {
  int t, h, c, qh0, g;  // query token, KV head, chunk, first query head, heads in the group
  int pos;
  int64_t tok_begin, tok_end;  // this chunk's local token range [begin, end)
  const int32_t* table;
  const int32_t* first;
};

__device__ inline Item DecodeItem(const Args& a) {
  Item it;
  const int64_t bx = blockIdx.x;
  const int sub = static_cast<int>(bx % a.subs);
  const int64_t rest = bx / a.subs;
  it.h = static_cast<int>(rest % a.num_kv_heads);
  it.t = static_cast<int>(rest / a.num_kv_heads);
  it.c = blockIdx.y;
  it.qh0 = it.h * a.group + sub * a.sub_size;
  it.g = min(a.sub_size, a.group - sub * a.sub_size);
  const int seq = a.q_seq[it.t];
  it.pos = a.q_pos[it.t];
  const int64_t kv_len = a.kv_lens[seq];
  it.table = a.tables + seq * a.max_blocks;
  it.first = a.first_pos + seq * a.max_blocks;
  const int64_t chunk_tokens = static_cast<int64_t>(a.blocks_per_chunk) * a.tpb;
  it.tok_begin = it.c * chunk_tokens;
  it.tok_end = min(kv_len, it.tok_begin + chunk_tokens);
  return it;
}

// The tensor-core prefill kernel (AttentionPrefillMmaKernel) gives each thread block
// kPrefillPairs consecutive (query token, query head) pairs of one KV head, token-major (pair =
// token * group + head in the group), and serves them only when all their query tokens belong to
// one sequence; the warp-pipelined kernel, launched after it, serves the query tokens of the
// other blocks (Args::prefill_done).
constexpr int kPrefillWarps = 8;
constexpr int kPrefillPairs = 8 * kPrefillWarps;

// Whether the prefill kernel's thread block b (of a KV head) serves its pairs: their query tokens
// all have the same sequence.
__device__ inline bool PrefillBlockServed(const Args& a, int64_t b) {
  const int64_t head_pairs = a.rows / a.num_q_heads * a.group;
  const int64_t t0 = b * kPrefillPairs / a.group;
  const int64_t t1 = (min((b + 1) * kPrefillPairs, head_pairs) - 1) / a.group;
  const int32_t seq = a.q_seq[t0];
  for (int64_t t = t0 + 1; t <= t1; ++t) {
    if (a.q_seq[t] != seq) {
      return false;
    }
  }
  return true;
}

// Element offset of the K row of local token i = j * tpb + tb (block j of the sequence, slot
// tb) of the item's KV head, or -1 when the token is past the chunk or not visible to the
// query (causal limit on its global position).
__device__ inline int64_t RowOffset(const Args& a, const Item& it, int64_t i, int j, int tb) {
  if (i >= it.tok_end) {
    return -1;
  }
  if (static_cast<int64_t>(it.first[j]) + tb > it.pos) {
    return -1;
  }
  return static_cast<int64_t>(it.table[j]) * a.block_elems + a.k_head_off + it.h * a.head_stride +
         static_cast<int64_t>(tb) * a.d;
}

__device__ inline int64_t RowOffset(const Args& a, const Item& it, int64_t i) {
  const int j = static_cast<int>(static_cast<uint32_t>(i) / static_cast<uint32_t>(a.tpb));
  return RowOffset(a, it, i, j, static_cast<int>(i - static_cast<int64_t>(j) * a.tpb));
}

// Online-softmax step for one tile: scores [kTileRows][stride] in s_p become probabilities;
// the running max / sum of each head and the factor alpha that rescales its output are
// updated. Warp w serves heads w, w + kWarps, ...; lane = row.
__device__ inline void SoftmaxStep(float* s_p, int stride, float* s_m, float* s_l, float* s_alpha,
                                   int g_count) {
  const int lane = threadIdx.x & 31;
  for (int g = threadIdx.x >> 5; g < g_count; g += kWarps) {
    const float x = s_p[lane * stride + g];
    const float mx = WarpMax(x);
    const float m_old = s_m[g];
    const float m_new = fmaxf(m_old, mx);
    const float pr = x == kNegInf ? 0.0f : expf(x - m_new);
    const float sum = WarpSum(pr);
    s_p[lane * stride + g] = pr;
    if (lane == 0) {
      const float alpha = m_old == kNegInf ? 0.0f : expf(m_old - m_new);
      s_alpha[g] = alpha;
      s_l[g] = s_l[g] * alpha + sum;
      s_m[g] = m_new;
    }
  }
}

// Writes the normalised output of head g (sum = unnormalised value of dim e) and its LSE,
// to the final output or to this chunk's workspace slot.
// l (the softmax's sum) is 0 only when no row was visible (out 0, LSE -inf); it is NaN when a
// score was NaN (from q or K) or +inf (inf - inf), and then so are the row and its LSE (also in
// a split-KV chunk, so that the merge makes the whole row NaN: MergeStatesCpu's semantics).
__device__ inline void StoreOut(const Args& a, const Item& it, int g, int e, float sum, float l) {
  const int64_t row = static_cast<int64_t>(it.t) * a.num_q_heads + it.qh0 + g;
  const float v = l != 0.0f ? sum * (1.0f / l) : 0.0f;
  if (a.parts > 1) {
    a.ws_o[(static_cast<int64_t>(it.c) * a.rows + row) * a.d + e] = v;
  } else {
    a.out[row * a.d + e] = v;
  }
}

__device__ inline void StoreLse(const Args& a, const Item& it, int g, float m, float l) {
  const int64_t row = static_cast<int64_t>(it.t) * a.num_q_heads + it.qh0 + g;
  const float v = l != 0.0f ? m + logf(l) : kNegInf;
  if (a.parts > 1) {
    a.ws_lse[static_cast<int64_t>(it.c) * a.rows + row] = v;
  } else if (a.lse != nullptr) {
    a.lse[row] = v;
  }
}

// The L2 prefetch of this thread block's share of the ranges a.pf (PagedAttentionParams::
// l2_prefetch), one thread: the grid's blocks take consecutive shares of a.pf_share bytes of the
// two ranges end to end, each issued as bulk prefetches of at most kPrefetchPiece bytes. (The
// share is worked out on the host: a 64-bit division here cost the kernels at their register
// bound spills.)
constexpr int64_t kPrefetchUnit = 4096;
constexpr int64_t kPrefetchPiece = 1 << 20;

int64_t PrefetchShareBytes(int64_t total, int64_t blocks) {
  const int64_t units = (total + kPrefetchUnit - 1) / kPrefetchUnit;
  return (units + blocks - 1) / blocks * kPrefetchUnit;
}

__device__ inline void PrefetchShareL2(const Args& a) {
  const int64_t total = a.pf_bytes[0] + a.pf_bytes[1];
  if (total <= 0) {
    return;
  }
  const int64_t b = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  int64_t lo = b * a.pf_share;  // [lo, hi): this block's bytes, in the ranges' end-to-end order
  int64_t hi = min(total, lo + a.pf_share);
  for (int r = 0; r < 2 && lo < hi; ++r) {
    const int64_t n = a.pf_bytes[r];
    for (int64_t o = lo; o < min(hi, n); o += kPrefetchPiece) {
      BulkPrefetchL2(a.pf[r] + o, static_cast<unsigned>(min(kPrefetchPiece, min(hi, n) - o)));
    }
    lo = lo > n ? lo - n : 0;  // into the next range's offsets
    hi -= n;
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-pipelined path (the default for head dims 64 and 128): every warp of a thread block
// walks its own steps of kStepRows KV rows (steps w, w + W, w + 2W, ... of the chunk) through
// a private cp.async ring of `stages` steps, with its own online softmax, and the warps' states
// are combined once at the end. No block-wide barrier in the main loop, so a warp waiting for
// memory never holds the others back, and each SM keeps stages - 1 steps per resident
// warp in flight. A lane copies and later reads back only its own 16-byte chunks (rows
// rg, rg + kRowsPerInstr, ..., chunk cl), so the ring needs no barrier either; the scores and
// probabilities of a step go through a small per-warp array (two __syncwarp per step).
// Scores are kept in log2 units (q is pre-scaled by scale * log2 e) so exp is one exp2.

// The bulk-copy helpers exist only in code compiled for sm_90+ (a device of compute
// capability 9 may run code JIT-compiled from an older arch's PTX): elsewhere the copy path
// stays on.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr bool kBulkCompiled = false;
#else
constexpr bool kBulkCompiled = true;
#endif

constexpr int kStepRows = 8;  // KV rows per warp step
constexpr int kMaxWarps = 8;  // warps per thread block, at most
constexpr int kDefaultWarps = 4;
constexpr int kMaxStages = 4;
// Off: distances of 2, 4 and 8 steps were 15-70% slower on an H200 (the prefetched lines
// compete with the ring's own copies).
constexpr int kDefaultPrefetchSteps = 0;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = -kNegInf;

template <typename T, int D, int kG>
struct WarpCfg {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per chunk
  static constexpr int kLanes = D / kVec;                        // lanes per row
  static constexpr int kRowsPerInstr = 32 / kLanes;              // rows one warp copy covers
  static constexpr int kRpl = kStepRows / kRowsPerInstr;         // rows per lane per step
  static constexpr int kStepElems = kStepRows * D;               // of K (and of V)
  static constexpr int kStageBytes = 2 * kStepElems * static_cast<int>(sizeof(T));
  static constexpr int kDefaultStages = kStageBytes <= 4096 ? 4 : 3;
  // Per warp after its ring: scores and probabilities [kStepRows][kG], alphas [kG] (floats),
  // row visibility [kMaxStages][kStepRows] (ints). After every warp: the warps' maxima and
  // sums [kMaxWarps][kG] each, then the bulk copies' mbarriers [kMaxWarps][kMaxStages].
  static constexpr int kSmallBytes = (2 * kStepRows * kG + kG + kMaxStages * kStepRows) * 4;
  __host__ __device__ static int WarpBytes(int stages) {
    return stages * kStageBytes + kSmallBytes;
  }
  static size_t SmemBytes(int warps, int stages) {
    return static_cast<size_t>(warps) * WarpBytes(stages) + 2 * kMaxWarps * kG * 4 +
           kMaxWarps * kMaxStages * 8;
  }
  static_assert(kLanes == 8 || kLanes == 16 || kLanes == 32);
  static_assert(kRpl * kRowsPerInstr == kStepRows);
  static_assert(kG == 4 || kG == 8);
  static_assert(kSmallBytes % 16 == 0 && kStageBytes % 16 == 0);
  static_assert(kG * D * 4 <= 2 * kStageBytes);  // the final reduction reuses the rings
};

// 16 bytes at p (16-byte aligned) read through L2 only: data another kernel may have written
// while this one ran (no stale L1 line).
__device__ inline uint4 LoadL2Only(const void* p) {
#ifdef HELIX_CUDA_EMULATION
  return *static_cast<const uint4*>(p);
#else
  return __ldcg(static_cast<const uint4*>(p));
#endif
}

// Block-table entries of a step, loaded two steps before use. When tokens_per_block is a
// multiple of kStepRows a step lies in one block: every lane holds the step's block, first
// position, first slot tb and n = its rows within the chunk. Otherwise lane r < kStepRows holds
// row r's block, first position and slot, n = 1 when the row is within the chunk.
struct RowPlan {
  int32_t block, first, tb, n;
};

// Variants of the warp-pipelined kernel: the default, and one for the benchmark only.
enum WarpMode : int {
  kWarpDefault = 0,
  kWarpLoadOnly = 1,  // the copies without the math (output meaningless): memory ceiling
  kWarpMma = 2,       // 16-bit KV, kG = 8: q.K and P.V on the tensor cores (see below)
};

// The kWarpMma variant keeps the ring, the row plans and the final combine of the default, and
// does a step's math on the tensor cores (MmaStepScores, MmaStepSoftmaxPv below): S = Q K^T as
// m16n8k16 products (the step's 8 rows are the n dimension) and O += P V as m16n8k8 products (the
// step's rows are k), the group's (up to) 8 query heads as the query rows.

// The tensor-core step (kWarpMma, and the prefill kernel below). A warp's 16 m rows are 8 query
// rows twice: row g holds query row g's q rounded to T (hi), row g + 8 the remainder (lo), so
// that the sum of the two rows' scores keeps about 16 bits of q; P is split the same way for
// P.V, and the output is the sum of the two halves. Lane l works on query row l / 4 and on the
// step's KV rows (or each 8-dim tile's dims) 2 (l % 4) and 2 (l % 4) + 1. KV rows live in a
// ring slot or tile with their 16-byte chunks swizzled: chunk c of row r at c ^ (r % 8), so
// that ldmatrix's eight row addresses fall in different banks.
template <int D>
using MmaQFrags = uint32_t[D / 16][4];
template <int D>
using MmaAcc = float[D / 8][4];

// The A fragments of q for this lane's query row, `row` (nullptr: a row of zeros), scaled by
// qscale.
template <typename T, int D>
__device__ inline void MmaLoadQ(const float* row, float qscale, MmaQFrags<D>& qa) {
  const int t2 = 2 * (threadIdx.x & 3);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float x0 = 0.0f, x1 = 0.0f;
      if (row != nullptr) {
        const float2 v = *reinterpret_cast<const float2*>(row + 16 * kk + 8 * half + t2);
        x0 = v.x * qscale;
        x1 = v.y * qscale;
      }
      const T h0 = FromFloat<T>(x0), h1 = FromFloat<T>(x1);
      qa[kk][2 * half] = PackPair(h0, h1);
      qa[kk][2 * half + 1] =
          PackPair(FromFloat<T>(x0 - ToFloat(h0)), FromFloat<T>(x1 - ToFloat(h1)));
    }
  }
}

// q.k (log2 units) of this lane's query row with KV rows 2 (l % 4) and 2 (l % 4) + 1 of the 8
// rows at `rows` (a swizzled slot; 8-row aligned within it).
template <typename T, int D>
__device__ inline void MmaStepScores(const T* rows, const MmaQFrags<D>& qa, float* x0, float* x1) {
  constexpr int kVec = 8;
  const int lane = threadIdx.x & 31;
  const int r8 = lane & 7;   // the row whose address this lane gives
  const int mi = lane >> 3;  // the matrix of the x4 load it gives it for
  // Two accumulators, so that consecutive mma do not wait on each other.
  float sa[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
    uint32_t b[4];  // K^T fragments of dims 16 kk .. 16 kk + 31
    LdMatrixX4<false>(b, rows + r8 * D + ((2 * kk + mi) ^ r8) * kVec);
    MmaK16<T>(sa, qa[kk], b[0], b[1]);
    MmaK16<T>(sb, qa[kk + 1], b[2], b[3]);
  }
  *x0 = (sa[0] + sa[2]) + (sb[0] + sb[2]);
  *x1 = (sa[1] + sa[3]) + (sb[1] + sb[3]);
  // An infinite K element makes the hi row's score infinite, as q.k is; the lo row's may be NaN
  // (0 x inf where q's remainder is 0) or the other infinity: the score is the hi row's then.
  const float h0 = sa[0] + sb[0], h1 = sa[1] + sb[1];
  if (fabsf(h0) == kInf) {
    *x0 = h0;
  }
  if (fabsf(h1) == kInf) {
    *x1 = h1;
  }
}

// One online-softmax step of this lane's query row over the 8 rows' scores (x0, x1 here; -inf:
// not visible), then acc = acc * alpha + P V with the V rows at `vrows` (a swizzled slot).
template <typename T, int D>
__device__ inline void MmaStepSoftmaxPv(float x0, float x1, const T* vrows, MmaAcc<D>& acc,
                                        float* m_run, float* l_run) {
  constexpr int kVec = 8;
  const int lane = threadIdx.x & 31;
  const int r8 = lane & 7;
  const int mi = lane >> 3;
  // The query row's four lanes hold the step's 8 rows.
  float mx = fmaxf(x0, x1);
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(*m_run, mx);
  const float p0 = x0 == kNegInf ? 0.0f : exp2f(x0 - m_new);
  const float p1 = x1 == kNegInf ? 0.0f : exp2f(x1 - m_new);
  const float alpha = *m_run == kNegInf ? 0.0f : exp2f(*m_run - m_new);
  float sum = p0 + p1;
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  *l_run = *l_run * alpha + sum;
  *m_run = m_new;
  if (__any_sync(0xffffffffu, alpha != 1.0f)) {  // rare once the maxima settle
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[n][e] *= alpha;
      }
    }
  }
  const T h0 = FromFloat<T>(p0), h1 = FromFloat<T>(p1);
  const uint32_t p_hi = PackPair(h0, h1);
  const uint32_t p_lo = PackPair(FromFloat<T>(p0 - ToFloat(h0)), FromFloat<T>(p1 - ToFloat(h1)));
#pragma unroll
  for (int n4 = 0; n4 < D / 32; ++n4) {
    uint32_t b[4];  // V fragments of dims 32 n4 .. 32 n4 + 31
    LdMatrixX4<true>(b, vrows + r8 * D + ((4 * n4 + mi) ^ r8) * kVec);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      MmaK8<T>(acc[4 * n4 + j], p_hi, p_lo, b[j]);
    }
  }
}

// Writes this lane's part (dims 8 n + 2 (l % 4), + 1) of its query row's output, hi + lo, times
// `scale`, to dst (the row's first dim).
template <int D>
__device__ inline void MmaStoreRow(const MmaAcc<D>& acc, float* dst, float scale) {
  const int t2 = 2 * (threadIdx.x & 3);
  // An infinite V element makes the hi rows' sum infinite, as P.V is; the lo rows' may be NaN
  // (0 x inf) or the other infinity: the value is the hi rows' then.
  const auto sum = [](float hi, float lo) { return fabsf(hi) == kInf ? hi : hi + lo; };
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    *reinterpret_cast<float2*>(dst + 8 * n + t2) =
        make_float2(sum(acc[n][0], acc[n][2]) * scale, sum(acc[n][1], acc[n][3]) * scale);
  }
}

// The running max a warp leaves for the combine of the block's warps, which skips warps whose
// max is -inf (no visible row): 0 where the warp's sum l is NaN (a NaN score; fmaxf passed it
// over, so its max may still be -inf), so that the warp is counted and the row comes out NaN.
__device__ inline float WarpStateMax(float m, float l) { return l != l ? 0.0f : m; }

// Groups of <= 4 heads: at most 128 registers a thread, so two 8-warp thread blocks fit an SM
// (8 heads need more).
template <typename T, int D, int kG, int kMode = kWarpDefault>
__global__ void __launch_bounds__(kMaxWarps * 32, kG == 4 || kMode == kWarpMma ? 2 : 1)
    AttentionWarpKernel(const Args a) {
  using C = WarpCfg<T, D, kG>;
  constexpr int kVec = C::kVec;
  constexpr int kLanes = C::kLanes;
  constexpr int kRpi = C::kRowsPerInstr;
  constexpr int kRpl = C::kRpl;
  const int stages = a.stages;
  const int warp_bytes = C::WarpBytes(stages);
  constexpr int kN = kRpl * kG;                          // partial scores per lane per step
  constexpr int kHeld = kN >= kLanes ? kN / kLanes : 1;  // totals per lane after the reduction
  constexpr int kSmPerLane = kG / 4;                     // softmax entries per lane
  HELIX_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  const int rg = lane / kLanes;  // row group: rows rg + kRpi * i
  const int cl = lane % kLanes;  // 16-byte chunk of the row
  unsigned char* wbase = smem + static_cast<size_t>(warp) * warp_bytes;
  T* pipe = reinterpret_cast<T*>(wbase);  // [stages][K, V][kStepRows][D]
  float* s_sc = reinterpret_cast<float*>(wbase + stages * C::kStageBytes);  // [kStepRows][kG]
  float* s_p = s_sc + kStepRows * kG;                                       // [kStepRows][kG]
  float* s_alpha = s_p + kStepRows * kG;                                    // [kG]
  int* s_vis = reinterpret_cast<int*>(s_alpha + kG);                        // [stages][kStepRows]
  float* s_wm = reinterpret_cast<float*>(smem + static_cast<size_t>(warps) * warp_bytes);
  float* s_wl = s_wm + kMaxWarps * kG;  // [warps][kG] each: per-warp max (log2) and sum
  uint64_t* bars = reinterpret_cast<uint64_t*>(s_wl + kMaxWarps * kG) + warp * kMaxStages;
  float* red = reinterpret_cast<float*>(smem);  // [warps][kG][D], after the rings are done

  if (threadIdx.x == 0) {
    // Before PdlEnter, overlapping the kernel before this one: no kernel of the step writes
    // the ranges (the next products' weights).
    PrefetchShareL2(a);
  }
  // a.early_kv (PagedAttentionParams::kv_settled_below_q): the metadata and the KV rows below
  // each query's own position are settled before the kernel before this one ends, so the ring's
  // first steps are issued before PdlEnter, overlapping that kernel; the query's own row (which
  // that kernel may be writing) and q are read after it.
  const bool early = a.early_kv;
  if (!early) {
    PdlEnter();  // see HELIX_LAUNCH_PDL (the split-KV merge may then start its launch)
  }
  if (a.prefill_done) {
    // This query token's pairs lie in one or two of the prefill kernel's blocks: done if each
    // of them was served there (the same answer in every thread).
    const int64_t t = static_cast<int64_t>(blockIdx.x) / a.subs / a.num_kv_heads;
    const int64_t b0 = t * a.group / kPrefillPairs;
    const int64_t b1 = (t * a.group + a.group - 1) / kPrefillPairs;
    if (PrefillBlockServed(a, b0) && (b1 == b0 || PrefillBlockServed(a, b1))) {
      return;
    }
  }
  const Item it = DecodeItem(a);
  const int G = it.g;
  const int64_t n_tok = it.tok_end > it.tok_begin ? it.tok_end - it.tok_begin : 0;
  const int n_steps = static_cast<int>((n_tok + kStepRows - 1) / kStepRows);
  const int my_steps = warp < n_steps ? (n_steps - 1 - warp) / warps + 1 : 0;

  // This lane's slice of every query row of the group, scaled so that q.k is in log2 units.
  const float qscale = a.scale * kLog2e;
  constexpr bool kMma = kMode == kWarpMma;
  constexpr int kKSteps = D / 16;  // kMma: k-steps of q.k
  float q[kG][kVec];
  uint32_t qa[kMma ? kKSteps : 1][4];  // kMma: q's A fragments (MmaLoadQ)
  auto load_q = [&] {
    if constexpr (kMma) {
      const int gq = lane >> 2;
      MmaLoadQ<T, D>(
          gq < G ? a.q + (static_cast<int64_t>(it.t) * a.num_q_heads + it.qh0 + gq) * D : nullptr,
          qscale, qa);
    }
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      if (!kMma && g < G) {
        const float4* src = reinterpret_cast<const float4*>(
            a.q + (static_cast<int64_t>(it.t) * a.num_q_heads + it.qh0 + g) * D + cl * kVec);
#pragma unroll
        for (int v = 0; v < kVec / 4; ++v) {
          const float4 x = src[v];
          q[g][4 * v] = x.x * qscale;
          q[g][4 * v + 1] = x.y * qscale;
          q[g][4 * v + 2] = x.z * qscale;
          q[g][4 * v + 3] = x.w * qscale;
        }
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          q[g][e] = 0.0f;
        }
      }
    }
  };
  if (!early) {
    load_q();
  }
  float acc[kG][kVec];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      acc[g][e] = 0.0f;
    }
  }
  // kMma: O's C fragments, one per 8 dims: [0], [1] the hi rows, [2], [3] the lo rows.
  float acc_m[kMma ? D / 8 : 1][4];
#pragma unroll
  for (int n = 0; n < (kMma ? D / 8 : 1); ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_m[n][e] = 0.0f;
    }
  }
  // Softmax state of the heads this lane serves in the softmax step: (lane >> 3) + 4 e.
  float m_run[kSmPerLane], l_run[kSmPerLane];
#pragma unroll
  for (int e = 0; e < kSmPerLane; ++e) {
    m_run[e] = kNegInf;
    l_run[e] = 0.0f;
  }

  const T* kv = static_cast<const T*>(a.kv);
  const bool aligned = a.tpb % kStepRows == 0;  // chunks start at block boundaries
  // With whole steps in one block, a step's K rows (and its V rows) are contiguous: lane 0
  // can fetch each with one bulk copy completing on the slot's mbarrier, instead of every
  // lane copying 16-byte chunks. A copy covers only the step's visible rows; the rest of the
  // slot keeps what an earlier step left there (finite KV, or the zeros written here), which
  // the softmax masks: their probability is exactly 0.
  const bool bulk = !kMma && kBulkCompiled && aligned && a.bulk;
  // Where chunk c of row r goes in a ring slot: swizzled for kMma's ldmatrix.
  auto chunk_at = [](int r, int c) { return kMma ? c ^ (r & 7) : c; };
  uint32_t phases = 0;  // bit s: the parity of slot s's barrier phase to wait for next
  if (bulk) {
    for (int st = 0; st < stages; ++st) {
      T* ks = pipe + static_cast<size_t>(st) * 2 * C::kStepElems;
#pragma unroll
      for (int i = 0; i < kRpl; ++i) {
        const int r = rg + kRpi * i;
        *reinterpret_cast<uint4*>(ks + r * D + cl * kVec) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(ks + C::kStepElems + r * D + cl * kVec) = make_uint4(0, 0, 0, 0);
      }
    }
    if (lane == 0) {
      for (int st = 0; st < stages; ++st) {
        MbarInit(&bars[st], 1);
      }
      FenceMbarInit();
    }
    FenceProxyAsync();  // the zeros before any bulk copy into the ring
    __syncwarp();
  }
  // early: the copy of the query's own K and V rows that this lane leaves for after PdlEnter
  // (their element offset from kv and the K chunk's offset from pipe; -1: none).
  bool waited = !early;
  int64_t defer_src = -1;
  int defer_at = 0;
  auto load_plan = [&](int k) {
    RowPlan pl{0, 0, 0, 0};
    if (k < my_steps && (aligned || lane < kStepRows)) {
      const int64_t i = it.tok_begin +
                        (static_cast<int64_t>(warp) + static_cast<int64_t>(k) * warps) * kStepRows +
                        (aligned ? 0 : lane);
      if (i < it.tok_end) {
        const int j = static_cast<int>(static_cast<uint32_t>(i) / static_cast<uint32_t>(a.tpb));
        pl.tb = static_cast<int>(i - static_cast<int64_t>(j) * a.tpb);
        pl.block = it.table[j];
        pl.first = it.first[j];
        pl.n =
            aligned ? static_cast<int>(it.tok_end - i < kStepRows ? it.tok_end - i : kStepRows) : 1;
      }
    }
    return pl;
  };
  auto issue = [&](int stage, const RowPlan& pl) {
    T* ks = pipe + static_cast<size_t>(stage) * 2 * C::kStepElems;
    T* vs = ks + C::kStepElems;
    if (aligned) {
      // Every row of the step is slot tb + r of the same block.
      const int64_t base = static_cast<int64_t>(pl.block) * a.block_elems + a.k_head_off +
                           it.h * a.head_stride + static_cast<int64_t>(pl.tb) * D;
      const int64_t last_visible = it.pos - pl.first - pl.tb;  // rows r <= this are visible
      if (lane < kStepRows) {
        s_vis[stage * kStepRows + lane] = lane < pl.n && lane <= last_visible ? 1 : 0;
      }
      if (bulk) {
        const int64_t rows = last_visible + 1 < pl.n ? last_visible + 1 : pl.n;
        const unsigned bytes = rows > 0 ? static_cast<unsigned>(rows * D * sizeof(T)) : 0u;
        __syncwarp();  // every lane is done with the slot (read a step ago) before it is rewritten
        if (lane == 0) {
          FenceProxyAsync();
          MbarArriveExpectTx(&bars[stage], 2 * bytes);
          if (bytes > 0) {
            BulkCopyG2S(ks, kv + base, bytes, &bars[stage]);
            BulkCopyG2S(vs, kv + base + a.v_off, bytes, &bars[stage]);
          }
        }
        return;
      }
#pragma unroll
      for (int i = 0; i < kRpl; ++i) {
        const int r = rg + kRpi * i;
        const bool ok = r < pl.n && r <= last_visible;
        if (!waited && ok && r == last_visible) {  // the query's own row: after PdlEnter
          defer_src = base + r * D + cl * kVec;
          defer_at = static_cast<int>(ks - pipe) + r * D + chunk_at(r, cl) * kVec;
          continue;
        }
        const T* src = ok ? kv + base + r * D + cl * kVec : kv;
        CpAsync16(ks + r * D + chunk_at(r, cl) * kVec, src, ok);
        CpAsync16(vs + r * D + chunk_at(r, cl) * kVec, ok ? src + a.v_off : kv, ok);
      }
      return;
    }
    int64_t off = -1;
    if (pl.n > 0 && static_cast<int64_t>(pl.first) + pl.tb <= it.pos) {
      off = static_cast<int64_t>(pl.block) * a.block_elems + a.k_head_off + it.h * a.head_stride +
            static_cast<int64_t>(pl.tb) * D;
    }
    if (lane < kStepRows) {
      s_vis[stage * kStepRows + lane] = off >= 0 ? 1 : 0;
    }
#pragma unroll
    for (int i = 0; i < kRpl; ++i) {
      const int r = rg + kRpi * i;
      const int64_t o = __shfl_sync(0xffffffffu, off, r);
      const bool ok = o >= 0;
      const T* src = ok ? kv + o + cl * kVec : kv;
      CpAsync16(ks + r * D + chunk_at(r, cl) * kVec, src, ok);
      CpAsync16(vs + r * D + chunk_at(r, cl) * kVec, ok ? src + a.v_off : kv, ok);
    }
  };

  // Optional (off by default, see kDefaultPrefetchSteps): with whole steps in one block, the K
  // and V rows of the step `pf` steps beyond the ring's newest are prefetched into L2 by one
  // bulk prefetch each, for more bytes in flight per SM than shared memory could hold.
  const int pf = aligned ? a.prefetch_steps : 0;
  auto prefetch = [&](int k, const RowPlan& pl) {
    if (lane == 0 && k < my_steps && pl.n > 0) {
      const T* src = kv + static_cast<int64_t>(pl.block) * a.block_elems + a.k_head_off +
                     it.h * a.head_stride + static_cast<int64_t>(pl.tb) * D;
      const unsigned bytes = static_cast<unsigned>(pl.n * D * sizeof(T));
      BulkPrefetchL2(src, bytes);
      BulkPrefetchL2(src + a.v_off, bytes);
    }
  };

  RowPlan pa = load_plan(0);
  for (int k = 0; k < stages - 1; ++k) {
    if (k < my_steps) {
      issue(k, pa);
    }
    CpAsyncCommit();
    pa = load_plan(k + 1);
  }
  RowPlan pb = load_plan(stages);
  RowPlan pp{0, 0, 0, 0};  // plan of the next step to prefetch
  if (pf > 0) {
    for (int k = stages - 1; k < stages - 1 + pf; ++k) {
      prefetch(k, load_plan(k));
    }
    pp = load_plan(stages - 1 + pf);
  }
  if (early) {
    PdlEnter();  // see HELIX_LAUNCH_PDL (the split-KV merge may then start its launch)
    waited = true;
    if (defer_src >= 0) {  // plain loads and stores: the slot's __syncwarp publishes them
      *reinterpret_cast<uint4*>(pipe + defer_at) = LoadL2Only(kv + defer_src);
      *reinterpret_cast<uint4*>(pipe + defer_at + C::kStepElems) =
          LoadL2Only(kv + defer_src + a.v_off);
    }
    load_q();
  }

  int stage = 0;                 // ring slot of step k
  int issue_stage = stages - 1;  // ring slot of step k + stages - 1
  for (int k = 0; k < my_steps; ++k) {
    const int nk = k + stages - 1;
    if (nk < my_steps) {
      issue(issue_stage, pa);
    }
    CpAsyncCommit();
    if (pf > 0) {
      prefetch(nk + pf, pp);
      pp = load_plan(nk + pf + 1);
    }
    pa = pb;
    pb = load_plan(nk + 2);  // the table reads have two steps to arrive
    if (stages == 4) {       // step k's group is complete once stages - 1 are left in flight
      CpAsyncWait<3>();
    } else if (stages == 3) {
      CpAsyncWait<2>();
    } else {
      CpAsyncWait<1>();
    }
    if (bulk) {
      MbarWait(&bars[stage], (phases >> stage) & 1u);
      phases ^= 1u << stage;
    }
    issue_stage = stage;
    if constexpr (kMode == kWarpLoadOnly) {
      stage = stage + 1 == stages ? 0 : stage + 1;
      continue;
    }
    const T* ks = pipe + static_cast<size_t>(stage) * 2 * C::kStepElems;
    const T* vs = ks + C::kStepElems;
    if constexpr (kMma) {
      __syncwarp();  // every lane's copies of the step are in: ldmatrix reads the others' rows
      float x0, x1;
      MmaStepScores<T, D>(ks, qa, &x0, &x1);
      const int t2 = 2 * (lane & 3);
      if (s_vis[stage * kStepRows + t2] == 0) {
        x0 = kNegInf;
      }
      if (s_vis[stage * kStepRows + t2 + 1] == 0) {
        x1 = kNegInf;
      }
      MmaStepSoftmaxPv<T, D>(x0, x1, vs, acc_m, &m_run[0], &l_run[0]);
      __syncwarp();  // every lane has read the slot before a later step's copies refill it
    } else {
      // Partial scores of this lane's rows and chunk for every head, summed over the row's lanes.
      float v[kN];
#pragma unroll
      for (int i = 0; i < kRpl; ++i) {
        const int r = rg + kRpi * i;
        float kf[kVec];
        ChunkToFloats<T>(*reinterpret_cast<const uint4*>(ks + r * D + cl * kVec), kf);
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          float s = 0.0f;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            s = fmaf(q[g][e], kf[e], s);
          }
          v[i * kG + g] = s;
        }
      }
      ReduceScatterN<kN, kLanes, kN>(v, cl);
      if (kN >= kLanes || (cl & (kLanes / kN - 1)) == 0) {
        const int base = ScatterBase<kN, kLanes>(cl);
#pragma unroll
        for (int j = 0; j < kHeld; ++j) {
          const int idx = base + j;
          s_sc[(rg + kRpi * (idx / kG)) * kG + idx % kG] = v[j];
        }
      }
      __syncwarp();

      // Online softmax: lane serves row lane & 7 of heads (lane >> 3) + 4 e.
      {
        const int r = lane & (kStepRows - 1);
        const bool visible = s_vis[stage * kStepRows + r] != 0;
#pragma unroll
        for (int e = 0; e < kSmPerLane; ++e) {
          const int g = (lane >> 3) + 4 * e;
          const float x = visible ? s_sc[r * kG + g] : kNegInf;
          float mx = x;
#pragma unroll
          for (int o = 1; o < kStepRows; o <<= 1) {
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
          }
          const float m_new = fmaxf(m_run[e], mx);
          const float pr = x == kNegInf ? 0.0f : exp2f(x - m_new);
          const float alpha = m_run[e] == kNegInf ? 0.0f : exp2f(m_run[e] - m_new);
          float sum = pr;
#pragma unroll
          for (int o = 1; o < kStepRows; o <<= 1) {
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
          }
          l_run[e] = l_run[e] * alpha + sum;
          m_run[e] = m_new;
          s_p[r * kG + g] = pr;
          if (r == 0) {
            s_alpha[g] = alpha;
          }
        }
      }
      __syncwarp();

      // acc = acc * alpha + P V over this lane's rows and chunk.
      float al[kG];
#pragma unroll
      for (int j = 0; j < kG / 4; ++j) {
        const float4 a4 = *reinterpret_cast<const float4*>(s_alpha + 4 * j);
        al[4 * j] = a4.x;
        al[4 * j + 1] = a4.y;
        al[4 * j + 2] = a4.z;
        al[4 * j + 3] = a4.w;
      }
      bool rescale = false;
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        rescale = rescale || al[g] != 1.0f;
      }
      if (rescale) {  // the same in every lane: the maxima rarely move after the first steps
#pragma unroll
        for (int g = 0; g < kG; ++g) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            acc[g][e] *= al[g];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kRpl; ++i) {
        const int r = rg + kRpi * i;
        float vf[kVec];
        ChunkToFloats<T>(*reinterpret_cast<const uint4*>(vs + r * D + cl * kVec), vf);
        float pr[kG];
#pragma unroll
        for (int j = 0; j < kG / 4; ++j) {
          const float4 p4 = *reinterpret_cast<const float4*>(s_p + r * kG + 4 * j);
          pr[4 * j] = p4.x;
          pr[4 * j + 1] = p4.y;
          pr[4 * j + 2] = p4.z;
          pr[4 * j + 3] = p4.w;
        }
#pragma unroll
        for (int g = 0; g < kG; ++g) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            acc[g][e] = fmaf(pr[g], vf[e], acc[g][e]);
          }
        }
      }
    }
    stage = stage + 1 == stages ? 0 : stage + 1;
  }
  CpAsyncWait<0>();

  if constexpr (kMma) {
    __syncthreads();  // every ring is drained: red may overwrite them
    const int gq = lane >> 2;
    MmaStoreRow<D>(acc_m, red + (warp * kG + gq) * D, 1.0f);
    if ((lane & 3) == 0) {
      s_wm[warp * kG + gq] = WarpStateMax(m_run[0], l_run[0]);
      s_wl[warp * kG + gq] = l_run[0];
    }
  } else {
    // Sum the row groups of the warp (same dims, other rows), then combine the warps.
#pragma unroll
    for (int o = kLanes; o < 32; o <<= 1) {
#pragma unroll
      for (int g = 0; g < kG; ++g) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        }
      }
    }
    __syncthreads();  // every ring is drained: red may overwrite them
    if (rg == 0) {
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        float* dst = red + (warp * kG + g) * D + cl * kVec;
#pragma unroll
        for (int v = 0; v < kVec / 4; ++v) {
          *reinterpret_cast<float4*>(dst + 4 * v) =
              make_float4(acc[g][4 * v], acc[g][4 * v + 1], acc[g][4 * v + 2], acc[g][4 * v + 3]);
        }
      }
    }
    if ((lane & (kStepRows - 1)) == 0) {
#pragma unroll
      for (int e = 0; e < kSmPerLane; ++e) {
        const int g = (lane >> 3) + 4 * e;
        s_wm[warp * kG + g] = WarpStateMax(m_run[e], l_run[e]);
        s_wl[warp * kG + g] = l_run[e];
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < G * D; idx += static_cast<int>(blockDim.x)) {
    const int g = idx / D;
    const int e = idx % D;
    float m = kNegInf;
    for (int w = 0; w < warps; ++w) {
      m = fmaxf(m, s_wm[w * kG + g]);
    }
    float l = 0.0f;
    float o = 0.0f;
    if (m != kNegInf) {
      for (int w = 0; w < warps; ++w) {
        const float mw = s_wm[w * kG + g];
        if (mw != kNegInf) {
          const float f = exp2f(mw - m);
          l = fmaf(s_wl[w * kG + g], f, l);
          o = fmaf(red[(w * kG + g) * D + e], f, o);
        }
      }
    }
    StoreOut(a, it, g, e, o, l);
    if (e == 0) {
      StoreLse(a, it, g, m * kLn2, l);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core prefill path: the kWarpMma step's math for calls whose sequences have several query
// tokens (a prefill, or a chunk of one). A thread block serves kPrefillPairs consecutive (query
// token, query head) pairs of one KV head (see PrefillBlockServed), 8 per warp as its query rows,
// when their query tokens all belong to one sequence; it walks that sequence's KV once, in tiles
// of kPrefillTileRows rows that the whole block copies (two buffers: the next tile's copies fly
// while this one is used) and every warp reads: one KV read per block instead of one per query
// token. Each warp keeps the online softmax of its own rows with per-row causal masks, so nothing
// is combined at the end. The walk stops at the first tile past the block's last query position
// (a sequence's blocks are in position order), and rows past it are not read. A block whose
// tokens span sequences leaves them to the warp-pipelined kernel launched after it (a decode
// token batched with a prompt is served there, in parallel with the others, instead of in turn
// inside a shared block). Blocks run latest tokens first (they walk the most KV). Without
// split-KV only.

constexpr int kPrefillTileRows = 32;  // KV rows per shared tile: 4 warp steps

template <typename T, int D>
struct PrefillCfg {
  static constexpr int kVec = 8;                           // elements per 16-byte chunk
  static constexpr int kChunks = D / kVec;                 // chunks per KV row
  static constexpr int kTileElems = kPrefillTileRows * D;  // of K (and of V)
  // [2][K, V][rows][D] tiles, then the tiles' row positions [2][rows], then the block's tokens'
  // positions [kPrefillPairs].
  static constexpr size_t kSmemBytes =
      4 * kTileElems * sizeof(T) + (2 * kPrefillTileRows + kPrefillPairs) * sizeof(int);
};

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillWarps * 32, 2) AttentionPrefillMmaKernel(const Args a) {
  using C = PrefillCfg<T, D>;
  constexpr int kNoPos = 0x7fffffff;  // the position of a tile row not read
  HELIX_DYNAMIC_SMEM(smem);
  T* tiles = reinterpret_cast<T*>(smem);
  int* s_kpos = reinterpret_cast<int*>(tiles + 4 * C::kTileElems);  // [2][kPrefillTileRows]
  int* s_pos = s_kpos + 2 * kPrefillTileRows;  // [kPrefillPairs]: the block's tokens' positions
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int threads = static_cast<int>(blockDim.x);

  PdlEnter();                                                   // first: see HELIX_LAUNCH_PDL
  const int64_t head_pairs = a.rows / a.num_q_heads * a.group;  // pairs of one KV head
  const int64_t blocks_per_head = (head_pairs + kPrefillPairs - 1) / kPrefillPairs;
  const int h = static_cast<int>(blockIdx.x / blocks_per_head);
  const int64_t b = blocks_per_head - 1 - blockIdx.x % blocks_per_head;  // latest tokens first
  if (!PrefillBlockServed(a, b)) {
    return;  // the same answer in every thread
  }
  const int64_t pb = b * kPrefillPairs;
  const int64_t pe = min(pb + kPrefillPairs, head_pairs);  // pairs [pb, pe)
  const int64_t t_first = pb / a.group;
  const int n_tok = static_cast<int>((pe - 1) / a.group - t_first + 1);  // <= kPrefillPairs
  const int seq = a.q_seq[t_first];
  for (int u = tid; u < n_tok; u += threads) {
    s_pos[u] = a.q_pos[t_first + u];
  }

  // This lane's query row.
  const int64_t pair = pb + warp * 8 + (lane >> 2);
  const bool has = pair < pe;
  const int64_t t = has ? pair / a.group : t_first;
  const int qh = h * a.group + static_cast<int>(has ? pair % a.group : 0);
  MmaQFrags<D> qa;
  MmaLoadQ<T, D>(has ? a.q + (t * a.num_q_heads + qh) * D : nullptr, a.scale * kLog2e, qa);
  MmaAcc<D> acc;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc[n][e] = 0.0f;
    }
  }
  float m_run = kNegInf, l_run = 0.0f;
  __syncthreads();   // s_pos
  int max_pos = -1;  // the block's last query position
  for (int u = 0; u < n_tok; ++u) {
    max_pos = max(max_pos, s_pos[u]);
  }
  const int row_pos = has ? s_pos[t - t_first] : -1;  // -1: sees nothing

  const T* kv = static_cast<const T*>(a.kv);
  const int t2 = 2 * (lane & 3);
  const int kv_len = a.kv_lens[seq];
  const int32_t* table = a.tables + static_cast<int64_t>(seq) * a.max_blocks;
  const int32_t* first = a.first_pos + static_cast<int64_t>(seq) * a.max_blocks;
  const uint32_t tpb = static_cast<uint32_t>(a.tpb);
  // Whether tile n holds a row the block's queries may see (the same answer in every thread).
  auto tile_needed = [&](int n) {
    const int i = n * kPrefillTileRows;
    if (i >= kv_len) {
      return false;
    }
    const uint32_t j = static_cast<uint32_t>(i) / tpb;
    return first[j] + static_cast<int>(static_cast<uint32_t>(i) - j * tpb) <= max_pos;
  };
  auto issue = [&](int n, int buf) {
    T* kt = tiles + static_cast<size_t>(buf) * 2 * C::kTileElems;
    T* vt = kt + C::kTileElems;
    for (int c = tid; c < kPrefillTileRows * C::kChunks; c += threads) {
      const int r = c / C::kChunks;
      const int ch = c % C::kChunks;
      const int i = n * kPrefillTileRows + r;
      int64_t off = 0;
      int pos = kNoPos;
      if (i < kv_len) {
        const uint32_t j = static_cast<uint32_t>(i) / tpb;
        const uint32_t tb = static_cast<uint32_t>(i) - j * tpb;
        if (first[j] + static_cast<int>(tb) <= max_pos) {  // else no query of the block sees it
          off = static_cast<int64_t>(table[j]) * a.block_elems + a.k_head_off + h * a.head_stride +
                static_cast<int64_t>(tb) * D;
          pos = first[j] + static_cast<int>(tb);
        }
      }
      const bool ok = pos != kNoPos;
      const int dst = r * D + (ch ^ (r & 7)) * C::kVec;
      CpAsync16(kt + dst, ok ? kv + off + ch * C::kVec : kv, ok);
      CpAsync16(vt + dst, ok ? kv + off + a.v_off + ch * C::kVec : kv, ok);
      if (ch == 0) {
        s_kpos[buf * kPrefillTileRows + r] = pos;
      }
    }
  };
  if (tile_needed(0)) {
    issue(0, 0);
  }
  CpAsyncCommit();
  for (int n = 0; tile_needed(n); ++n) {
    const int buf = n & 1;
    if (tile_needed(n + 1)) {
      issue(n + 1, buf ^ 1);
    }
    CpAsyncCommit();
    CpAsyncWait<1>();  // tile n's copies (this thread's) are in
    __syncthreads();   // and every thread's, with their row positions
    const T* kt = tiles + static_cast<size_t>(buf) * 2 * C::kTileElems;
    const T* vt = kt + C::kTileElems;
#pragma unroll 1  // unrolled, the steps' fragments would not fit in 128 registers
    for (int st = 0; st < kPrefillTileRows / 8; ++st) {
      float x0, x1;
      MmaStepScores<T, D>(kt + st * 8 * D, qa, &x0, &x1);
      if (s_kpos[buf * kPrefillTileRows + st * 8 + t2] > row_pos) {
        x0 = kNegInf;
      }
      if (s_kpos[buf * kPrefillTileRows + st * 8 + t2 + 1] > row_pos) {
        x1 = kNegInf;
      }
      MmaStepSoftmaxPv<T, D>(x0, x1, vt + st * 8 * D, acc, &m_run, &l_run);
    }
    __syncthreads();  // every warp is done with the buffer before tile n + 2 refills it
  }
  CpAsyncWait<0>();

  if (has) {
    const int64_t row = t * a.num_q_heads + qh;
    // l_run: 0 when nothing was visible, NaN after a NaN score (see StoreOut).
    MmaStoreRow<D>(acc, a.out + row * D, l_run != 0.0f ? 1.0f / l_run : 0.0f);
    if ((lane & 3) == 0 && a.lse != nullptr) {
      a.lse[row] = l_run != 0.0f ? m_run * kLn2 + logf(l_run) : kNegInf;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Plain path: any head dim up to kMaxGenericDim, element-wise loads converted to fp32 in
// shared memory. For the tiny test dims and odd shapes; correctness over speed.

size_t GenericSmemBytes(int d) {
  return (static_cast<size_t>(2 * kTileRows * d + 2 * kMaxG * d + kTileRows * kMaxG + 3 * kMaxG) *
          4) +
         kTileRows * (sizeof(int64_t) + sizeof(int));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) AttentionGenericKernel(const Args a) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  HELIX_DYNAMIC_SMEM(smem);
  const int d = a.d;
  float* kf = reinterpret_cast<float*>(smem);  // [kTileRows][d]
  float* vf = kf + kTileRows * d;              // [kTileRows][d]
  float* qf = vf + kTileRows * d;              // [kMaxG][d]
  float* acc = qf + kMaxG * d;                 // [kMaxG][d]
  float* s_p = acc + kMaxG * d;                // [kTileRows][kMaxG]
  float* s_m = s_p + kTileRows * kMaxG;
  float* s_l = s_m + kMaxG;
  float* s_alpha = s_l + kMaxG;
  int64_t* s_off = reinterpret_cast<int64_t*>(s_alpha + kMaxG);  // 8-byte aligned: even count
  int* s_vis = reinterpret_cast<int*>(s_off + kTileRows);

  const int tid = threadIdx.x;
  const Item it = DecodeItem(a);
  const int G = it.g;
  const T* kv = static_cast<const T*>(a.kv);
  for (int idx = tid; idx < kMaxG * d; idx += kThreads) {
    const int g = idx / d;
    qf[idx] =
        g < G ? a.q[(static_cast<int64_t>(it.t) * a.num_q_heads + it.qh0 + g) * d + idx % d] : 0.0f;
    acc[idx] = 0.0f;
  }
  if (tid < kMaxG) {
    s_m[tid] = kNegInf;
    s_l[tid] = 0.0f;
    s_alpha[tid] = 0.0f;
  }
  const int64_t n_tok = it.tok_end > it.tok_begin ? it.tok_end - it.tok_begin : 0;
  for (int64_t i0 = 0; i0 < n_tok; i0 += kTileRows) {
    if (tid < kTileRows) {
      const int64_t off = RowOffset(a, it, it.tok_begin + i0 + tid);
      s_off[tid] = off;
      s_vis[tid] = off >= 0 ? 1 : 0;
    }
    __syncthreads();
    for (int idx = tid; idx < kTileRows * d; idx += kThreads) {
      const int r = idx / d;
      const int64_t off = s_off[r];
      kf[idx] = off >= 0 ? ToFloat(kv[off + idx % d]) : 0.0f;
      vf[idx] = off >= 0 ? ToFloat(kv[off + a.v_off + idx % d]) : 0.0f;
    }
    __syncthreads();
    for (int pair = tid; pair < kTileRows * kMaxG; pair += kThreads) {
      const int r = pair / kMaxG;
      const int g = pair % kMaxG;
      if (g >= G) {
        continue;
      }
      float s = 0.0f;
      for (int e = 0; e < d; ++e) {
        s = fmaf(qf[g * d + e], kf[r * d + e], s);
      }
      s_p[r * kMaxG + g] = s_vis[r] ? s * a.scale : kNegInf;
    }
    __syncthreads();
    SoftmaxStep(s_p, kMaxG, s_m, s_l, s_alpha, G);
    __syncthreads();
    for (int idx = tid; idx < G * d; idx += kThreads) {
      const int g = idx / d;
      const int e = idx % d;
      float o = acc[idx] * s_alpha[g];
      for (int r = 0; r < kTileRows; ++r) {
        if (s_vis[r]) {
          o = fmaf(s_p[r * kMaxG + g], vf[r * d + e], o);
        }
      }
      acc[idx] = o;
    }
    __syncthreads();
  }
  __syncthreads();
  for (int idx = tid; idx < G * d; idx += kThreads) {
    StoreOut(a, it, idx / d, idx % d, acc[idx], s_l[idx / d]);
  }
  if (tid < G) {
    StoreLse(a, it, tid, s_m[tid], s_l[tid]);
  }
}

// ---------------------------------------------------------------------------------------------
// Merge: one thread block per row. Every step reads many parts at once: the block's threads
// take the parts' LSEs side by side (max, then the sum of the weights), the weights of up to
// kMergeChunk parts go to shared memory, and for the output each tile of up to kMergeThreads
// units (4 dims with 16-byte loads, else 1) is split among groups of threads that take every
// G-th part, summed in shared memory at the end. (A row's parts read one after another would
// put the latency of each load on the path: at batch 1 the split-KV merge took longer than the
// attention.) This two-pass kernel (MergeKernel) serves any row; MergeOnePassKernel below, rows
// whose parts fit its threads.

constexpr int kMergeThreads = 256;
constexpr int kMergeChunk = 256;  // part weights held in shared memory at a time

// The larger of a and b, NaN if either is NaN (fmaxf passes NaN over): a part's NaN LSE (its
// softmax saw a NaN) makes the merged row NaN, as MergeStatesCpu does.
__device__ inline float MaxOrNan(float a, float b) {
  return a != a || b != b ? a + b : fmaxf(a, b);
}

// Block-wide max (MaxOrNan) or sum of v (every thread gets the result); s holds one value per
// warp.
__device__ inline float MergeBlockReduce(float v, float* s, bool is_max) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? MaxOrNan(v, other) : v + other;
  }
  __syncthreads();  // s may still be read by the previous reduction
  if ((threadIdx.x & 31) == 0) {
    s[threadIdx.x >> 5] = v;
  }
  __syncthreads();
  float r = s[0];
#pragma unroll
  for (int w = 1; w < kMergeThreads / 32; ++w) {
    r = is_max ? MaxOrNan(r, s[w]) : r + s[w];
  }
  return r;
}

// kVec floats of O per thread and load (4: one 16-byte load; REQUIRES head_dim % 4 == 0 and
// 16-byte aligned o and out).
template <int kVec>
__global__ void __launch_bounds__(kMergeThreads) MergeKernel(const MergeStatesParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL (launched early after split-KV attention)
  using Red = float[kMergeThreads / 32];
  using Weights = float[kMergeChunk];
  using Acc = float[kVec * kMergeThreads];
  HELIX_STATIC_SMEM(Red, s_red);
  HELIX_STATIC_SMEM(Weights, s_w);
  HELIX_STATIC_SMEM(Acc, s_acc);
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t parts = p.num_parts, D = p.head_dim;
  const float* lse = p.lse + row;  // part i at lse[i * rows]
  float mx = kNegInf;
  for (int64_t i = tid; i < parts; i += kMergeThreads) {
    mx = MaxOrNan(mx, lse[i * p.rows]);
  }
  mx = MergeBlockReduce(mx, s_red, true);
  float* out = p.out + row * D;
  if (mx == kNegInf) {
    for (int64_t e = tid; e < D; e += kMergeThreads) {
      out[e] = 0.0f;
    }
    if (tid == 0 && p.out_lse != nullptr) {
      p.out_lse[row] = kNegInf;
    }
    return;
  }
  float sum = 0.0f;
  for (int64_t i = tid; i < parts; i += kMergeThreads) {
    const float l = lse[i * p.rows];
    if (l != kNegInf) {
      sum += expf(l - mx);
    }
  }
  sum = MergeBlockReduce(sum, s_red, false);
  const float inv = 1.0f / sum;
  const int64_t units = D / kVec;  // kVec dims each
  for (int64_t u0 = 0; u0 < units; u0 += kMergeThreads) {
    // This tile: `width` units, `groups` groups of threads, thread (g, u) takes parts g, g + G...
    const int width = static_cast<int>(units - u0 < kMergeThreads ? units - u0 : kMergeThreads);
    const int groups = kMergeThreads / width;
    const int g = tid / width;
    const int64_t u = u0 + tid % width;
    const float* o = p.o + row * D + u * kVec;  // part i at o[i * rows * D]
    float acc[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      acc[v] = 0.0f;
    }
    for (int64_t c0 = 0; c0 < parts; c0 += kMergeChunk) {
      const int n = static_cast<int>(parts - c0 < kMergeChunk ? parts - c0 : kMergeChunk);
      __syncthreads();  // the previous chunk's weights are no longer read
      for (int j = tid; j < n; j += kMergeThreads) {
        const float l = lse[(c0 + j) * p.rows];
        s_w[j] = l == kNegInf ? -1.0f : expf(l - mx);  // -1: an empty part
      }
      __syncthreads();
      if (g < groups) {
#pragma unroll 4
        for (int j = g; j < n; j += groups) {
          const float w = s_w[j];
          // An empty part's O may hold anything; a weight that underflowed to 0 still counts
          // (0 x NaN is NaN, as in MergeStatesCpu), and a NaN one (a NaN LSE) too.
          if (!(w < 0.0f)) {
            const float* src = o + (c0 + j) * p.rows * D;
            float val[kVec];
            if constexpr (kVec == 4) {
              const float4 x = *reinterpret_cast<const float4*>(src);
              val[0] = x.x;
              val[1] = x.y;
              val[2] = x.z;
              val[3] = x.w;
            } else {
              val[0] = src[0];
            }
#pragma unroll
            for (int v = 0; v < kVec; ++v) {
              acc[v] = fmaf(w, val[v], acc[v]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      s_acc[v * kMergeThreads + tid] = acc[v];
    }
    __syncthreads();
    if (tid < width) {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        float x = 0.0f;
        for (int k = 0; k < groups; ++k) {
          x += s_acc[v * kMergeThreads + k * width + tid];
        }
        out[u * kVec + v] = x * inv;
      }
    }
    __syncthreads();
  }
  if (tid == 0 && p.out_lse != nullptr) {
    p.out_lse[row] = mx + logf(sum);
  }
}

// One-pass merge, for rows of up to kMergePer parts per thread group: thread (g, u) of the
// block takes dims 4u..4u+3 of parts g, g + G, ..., g + (kMergePer - 1) G (G = groups of
// head_dim / 4 threads) and loads all of their LSEs and O values at once, so the row costs one
// memory latency (MergeKernel reads the LSEs, then the O values after two block-wide
// reductions). The block's max LSE, then each thread's weighted sum of its parts and their
// weights, then the groups' sums in shared memory. REQUIRES: head_dim % 4 == 0, head_dim / 4 <=
// kMergeThreads, num_parts <= G * kMergePer, o and out 16-byte aligned (MergeKernelFor).
constexpr int kMergePer = 8;

__global__ void __launch_bounds__(kMergeThreads) MergeOnePassKernel(const MergeStatesParams p) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL (launched early after split-KV attention)
  using Red = float[kMergeThreads / 32];
  using Acc = float4[kMergeThreads];
  using Sums = float[kMergeThreads];
  HELIX_STATIC_SMEM(Red, s_red);
  HELIX_STATIC_SMEM(Acc, s_acc);
  HELIX_STATIC_SMEM(Sums, s_sum);
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int units = static_cast<int>(p.head_dim / 4);
  const int groups = kMergeThreads / units;
  const int g = tid / units;
  const int u = tid % units;
  float l[kMergePer];
  float4 o[kMergePer];
  float mx = kNegInf;
#pragma unroll
  for (int k = 0; k < kMergePer; ++k) {
    const int64_t j = g + static_cast<int64_t>(k) * groups;
    l[k] = kNegInf;
    o[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (g < groups && j < p.num_parts) {
      l[k] = p.lse[j * p.rows + row];
      o[k] = *reinterpret_cast<const float4*>(p.o + (j * p.rows + row) * p.head_dim + 4 * u);
    }
    mx = MaxOrNan(mx, l[k]);
  }
  mx = MergeBlockReduce(mx, s_red, true);
  float* out = p.out + row * p.head_dim;
  if (mx == kNegInf) {  // every part empty (the same in every thread)
    if (tid < units) {
      *reinterpret_cast<float4*>(out + 4 * tid) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    if (tid == 0 && p.out_lse != nullptr) {
      p.out_lse[row] = kNegInf;
    }
    return;
  }
  float sum = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
  for (int k = 0; k < kMergePer; ++k) {
    if (l[k] != kNegInf) {  // an empty part's O may hold anything
      const float w = expf(l[k] - mx);
      sum += w;
      acc.x = fmaf(w, o[k].x, acc.x);
      acc.y = fmaf(w, o[k].y, acc.y);
      acc.z = fmaf(w, o[k].z, acc.z);
      acc.w = fmaf(w, o[k].w, acc.w);
    }
  }
  s_acc[tid] = acc;
  s_sum[tid] = sum;
  __syncthreads();
  if (tid < units) {
    float4 t = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float s = 0.0f;
    for (int k = 0; k < groups; ++k) {
      const float4 a = s_acc[k * units + tid];
      t.x += a.x;
      t.y += a.y;
      t.z += a.z;
      t.w += a.w;
      s += s_sum[k * units + tid];
    }
    const float inv = 1.0f / s;
    *reinterpret_cast<float4*>(out + 4 * tid) =
        make_float4(t.x * inv, t.y * inv, t.z * inv, t.w * inv);
    if (tid == 0 && p.out_lse != nullptr) {
      p.out_lse[row] = mx + logf(s);
    }
  }
}

PagedAttentionCudaTuning& Tuning();

// The merge kernel for p: the one-pass kernel where it fits (unless the tuning asks for the
// other), else 16-byte loads where the layout allows them.
using MergeFn = void (*)(MergeStatesParams);
MergeFn MergeKernelFor(const MergeStatesParams& p) {
  const bool vec4 = p.head_dim % 4 == 0 && reinterpret_cast<uintptr_t>(p.o) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  if (vec4 && p.head_dim >= 4 && p.head_dim / 4 <= kMergeThreads && !Tuning().merge_two_pass &&
      p.num_parts <= kMergeThreads / (p.head_dim / 4) * kMergePer) {
    return MergeOnePassKernel;
  }
  return vec4 ? MergeKernel<4> : MergeKernel<1>;
}

// ---------------------------------------------------------------------------------------------
// Host side.

using KernelFn = void (*)(Args);

struct Choice {
  KernelFn fn;
  size_t smem;
  int sub_size;  // query heads per thread block
  int threads;
  int stages;        // warp-pipelined path
  const char* name;  // PagedAttentionCudaKernelName
};

PagedAttentionCudaTuning& Tuning() {
  static PagedAttentionCudaTuning t;
  return t;
}

std::atomic<bool> g_tensor_cores{false};  // SetPagedAttentionCudaTensorCores

bool UseTensorCores() {
  return Tuning().tensor_cores || g_tensor_cores.load(std::memory_order_relaxed);
}

// Below this many (query token, KV head) items the warp-pipelined kernel runs 8 warps with
// 3-step rings per thread block instead of 4 warps with 4-step rings (faster there on H200;
// the items are then split into many chunks).
constexpr int64_t kFewItems = 16;

int WarpsFor(int64_t items) {
  const int w = Tuning().warps_per_block;
  if (w >= 1 && w <= kMaxWarps) {
    return w;
  }
  return items <= kFewItems ? 8 : kDefaultWarps;
}

template <typename T, int D, int kG>
int StagesFor(int64_t items) {
  const int s = Tuning().stages;
  if (s >= 2 && s <= kMaxStages) {
    return s;
  }
  return items <= kFewItems && Tuning().warps_per_block == 0
             ? std::min(3, WarpCfg<T, D, kG>::kDefaultStages)
             : WarpCfg<T, D, kG>::kDefaultStages;
}

#ifndef HELIX_CUDA_EMULATION
// The current device's compute capability major, or 0 when it cannot be asked. Asked once per
// device: every attention call chooses its kernel with it (several times: split, name, launch).
int DeviceMajor() {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices] = {};  // major + 1 once asked
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (device >= 0 && device < kDevices) {
    const int k = known[device].load(std::memory_order_relaxed);
    if (k > 0) {
      return k - 1;
    }
  }
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (device >= 0 && device < kDevices) {
    known[device].store(major + 1, std::memory_order_relaxed);
  }
  return major;
}
#endif

// cp.async.bulk and mbarrier transaction counts: sm_90 and later.
bool BulkCopyAvailable() {
#ifdef HELIX_CUDA_EMULATION
  return true;
#else
  return DeviceMajor() >= 9;
#endif
}

// mma.sync with bf16 / f16 inputs and fp32 accumulation: sm_80 and later, on the device and in
// the code it runs (a device may run code JIT-compiled from an older arch's PTX, where the mma
// helpers are compiled out).
bool TensorCoresAvailable() {
#ifdef HELIX_CUDA_EMULATION
  return true;
#else
  static const bool compiled = [] {  // first asked outside a capture (see the setters)
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, AttentionWarpKernel<__nv_bfloat16, 128, 8, kWarpMma>) !=
        cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return attr.ptxVersion >= 80;
  }();
  return compiled && DeviceMajor() >= 8;
#endif
}

// Whether PagedAttentionCuda runs p (split into `parts` chunks) with AttentionPrefillMmaKernel:
// tensor cores on, 16-bit KV at head dim 64 or 128, no split, and a sequence with several query
// tokens.
bool UsePrefillMma(const PagedAttentionParams& p, int64_t parts) {
  return parts == 1 && (p.kv.dtype == DType::kF16 || p.kv.dtype == DType::kBF16) &&
         (p.head_dim == 64 || p.head_dim == 128) && p.num_q_tokens > p.num_seqs &&
         UseTensorCores() && TensorCoresAvailable();
}

template <typename T, int D>
cudaError_t LaunchPrefillMma(const Args& a, int64_t num_tokens, cudaStream_t stream) {
  const int64_t blocks =
      a.num_kv_heads * ((num_tokens * a.group + kPrefillPairs - 1) / kPrefillPairs);
  const KernelFn fn = &AttentionPrefillMmaKernel<T, D>;
  constexpr size_t kSmem = PrefillCfg<T, D>::kSmemBytes;
  static_assert(kSmem <= 48 * 1024);  // no shared-memory opt-in needed
  HELIX_LAUNCH_PDL(fn, static_cast<unsigned>(blocks), kPrefillWarps * 32, kSmem, stream, a);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

int PrefetchSteps() {
  const int s = Tuning().prefetch_steps;
  return s == 0 ? kDefaultPrefetchSteps : std::max(0, s);
}

// The caller's shortest split-KV chunk, else the tuning's, else kMinChunkTokens.
int64_t MinChunkTokens(int64_t asked) {
  const int64_t t = asked > 0 ? asked : Tuning().min_chunk_tokens;
  return t > 0 ? t : kMinChunkTokens;
}

// The warp-pipelined kernel <T, D, kG, kMode> with its warps, ring depth and shared memory for
// a call of `items` (query token, KV head) items.
template <typename T, int D, int kG, int kMode = kWarpDefault>
Choice WarpChoice(int64_t items, const char* name) {
  const int warps = WarpsFor(items);
  const int st = StagesFor<T, D, kG>(items);
  return {&AttentionWarpKernel<T, D, kG, kMode>,
          WarpCfg<T, D, kG>::SmemBytes(warps, st),
          kG,
          warps * 32,
          st,
          name};
}

template <typename T, int D>
Choice ChooseFast(int group, int64_t items) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // benchmark-only mode (head dims 64, 128)
    if (group <= 4 && Tuning().load_only) {
      return WarpChoice<T, D, 4, kWarpLoadOnly>(items, "loadonly");
    }
  }
  if constexpr (!std::is_same_v<T, float>) {
    if (UseTensorCores() && TensorCoresAvailable()) {
      return WarpChoice<T, D, 8, kWarpMma>(items, "mma");
    }
  }
  return group <= 4 ? WarpChoice<T, D, 4>(items, "warp") : WarpChoice<T, D, 8>(items, "warp");
}

template <typename T>
Choice ChooseForType(int d, int group, int64_t items) {
  if (d == 64) {
    return ChooseFast<T, 64>(group, items);
  }
  if (d == 128) {
    return ChooseFast<T, 128>(group, items);
  }
  return {&AttentionGenericKernel<T>, GenericSmemBytes(d), kMaxG, kThreads, 0, "generic"};
}

// items: query tokens x KV heads of the call.
Choice ChooseKernel(DType t, int d, int group, int64_t items) {
  switch (t) {
    case DType::kF32:
      return ChooseForType<float>(d, group, items);
    case DType::kF16:
      return ChooseForType<__half>(d, group, items);
    case DType::kBF16:
      return ChooseForType<__nv_bfloat16>(d, group, items);
  }
  return {nullptr, 0, kMaxG, kThreads, 0, "none"};
}

// Above 48 KiB of dynamic shared memory needs an opt-in per kernel and device. Set for the size
// this call needs and raised only when a later call needs more (one kernel asks for different
// sizes with its warp and stage counts), so repeated calls make no runtime call besides the
// launch. A raise inside a CUDA graph capture could be refused; none happens there, because
// every batch bucket's first step runs eagerly before it is captured.
cudaError_t PrepareKernel(const Choice& ch) {
#ifdef HELIX_CUDA_EMULATION
  return cudaSuccess;
#endif
  if (ch.smem <= 48 * 1024) {
    return cudaSuccess;
  }
  int device = 0;
  HELIX_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  static std::mutex mu;
  static std::vector<std::pair<std::pair<int, KernelFn>, size_t>> done;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& d : done) {
    if (d.first == std::make_pair(device, ch.fn) && d.second >= ch.smem) {
      return cudaSuccess;
    }
  }
  HELIX_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(reinterpret_cast<const void*>(ch.fn),
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(ch.smem)));
  done.emplace_back(std::make_pair(device, ch.fn), ch.smem);
  return cudaSuccess;
}

}  // namespace

int64_t PagedAttentionCudaSplitTokens(const PagedAttentionParams& p, int64_t min_chunk_tokens) {
  const int64_t tpb = p.kv.tokens_per_block;
  if (p.num_q_tokens <= 0 || p.num_kv_heads <= 0 || tpb <= 0 || p.max_blocks_per_seq <= 0) {
    return 0;
  }
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // not left for the next launch check to report
    return 0;
  }
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const Choice ch = ChooseKernel(p.kv.dtype, static_cast<int>(p.head_dim), static_cast<int>(group),
                                 p.num_q_tokens * p.num_kv_heads);
  const int per_sm = CachedBlocksPerSm(device, reinterpret_cast<const void*>(ch.fn), ch.threads,
                                       ch.smem, [&] { return PrepareKernel(ch); });
  const int64_t subs = (group + ch.sub_size - 1) / ch.sub_size;
  return SplitTokensForOneWave(static_cast<int64_t>(sms) * std::max(1, per_sm),
                               p.num_q_tokens * p.num_kv_heads * subs, p.max_blocks_per_seq, tpb,
                               MinChunkTokens(min_chunk_tokens));
}

const char* PagedAttentionCudaKernelName(const PagedAttentionParams& p) {
  if (UsePrefillMma(p, SplitKvParts(p))) {
    return "mma_prefill";
  }
  const int group = static_cast<int>(p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 1);
  const Choice ch = ChooseKernel(p.kv.dtype, static_cast<int>(p.head_dim), group,
                                 p.num_q_tokens * p.num_kv_heads);
  return ch.name;
}

size_t PagedAttentionCudaWorkspaceBytes(const PagedAttentionParams& p) {
  const int64_t parts = SplitKvParts(p);
  if (parts <= 1) {
    return 0;
  }
  const int64_t rows = p.num_q_tokens * p.num_q_heads;
  return static_cast<size_t>(parts * rows * (p.head_dim + 1)) * sizeof(float);
}

cudaError_t PagedAttentionCuda(const PagedAttentionParams& p, void* workspace,
                               cudaStream_t stream) {
  if (p.num_q_tokens <= 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0) {
    return cudaSuccess;
  }
  if (p.head_dim <= 0 || p.head_dim > kMaxGenericDim || p.num_q_heads % p.num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t parts = SplitKvParts(p);
  if (parts > 65535) {
    return cudaErrorInvalidValue;  // grid.y limit: use larger kv_split_tokens
  }
  // Every grid.x below (the decode kernel's tokens x KV heads x sub-groups, the prefill kernel's
  // blocks, the merge's rows) is at most tokens x query heads.
  if (p.num_q_tokens > kMaxGridX / p.num_q_heads) {
    return cudaErrorInvalidValue;
  }
  for (int r = 0; r < 2; ++r) {  // cp.async.bulk.prefetch's rules
    const int64_t n = p.l2_prefetch_bytes[r];
    const auto at = reinterpret_cast<uintptr_t>(p.l2_prefetch[r]);
    if (n < 0 || (n > 0 && (at == 0 || at % 16 != 0 || n % 16 != 0))) {
      return cudaErrorInvalidValue;
    }
  }
  const int64_t rows = p.num_q_tokens * p.num_q_heads;
  Args a;
  a.q = p.q;
  a.q_seq = p.q_seq;
  a.q_pos = p.q_pos;
  a.kv = p.kv.base;
  a.block_elems = p.kv.block_elems();
  a.k_head_off = KvOffset(p.kv, 0, p.layer, 0, 0, 0);
  a.head_stride = p.kv.tokens_per_block * p.head_dim;
  a.v_off = KvOffset(p.kv, 0, p.layer, 1, 0, 0) - a.k_head_off;
  a.tables = p.block_tables;
  a.first_pos = p.block_first_pos;
  a.kv_lens = p.kv_lens;
  a.max_blocks = p.max_blocks_per_seq;
  a.rows = rows;
  a.tpb = static_cast<int>(p.kv.tokens_per_block);
  a.num_q_heads = static_cast<int>(p.num_q_heads);
  a.num_kv_heads = static_cast<int>(p.num_kv_heads);
  a.group = static_cast<int>(p.num_q_heads / p.num_kv_heads);
  const Choice ch = ChooseKernel(p.kv.dtype, static_cast<int>(p.head_dim), a.group,
                                 p.num_q_tokens * p.num_kv_heads);
  a.sub_size = ch.sub_size;
  a.stages = ch.stages;
  a.prefetch_steps = PrefetchSteps();
  a.bulk = Tuning().bulk_copy && BulkCopyAvailable();
  a.prefill_done = false;
  // Read by the warp-pipelined kernel only; one query token per sequence (decode), whole steps
  // in a block and the cp.async copies (AttentionWarpKernel).
  a.early_kv =
      p.kv_settled_below_q && p.num_q_tokens == p.num_seqs && a.tpb % kStepRows == 0 && !a.bulk;
  a.subs = (a.group + a.sub_size - 1) / a.sub_size;
  a.d = static_cast<int>(p.head_dim);
  a.blocks_per_chunk = static_cast<int>(parts > 1 ? SplitKvBlocksPerChunk(p)
                                                  : std::max<int64_t>(1, p.max_blocks_per_seq));
  a.parts = static_cast<int>(parts);
  a.scale = p.scale;
  a.out = p.out;
  a.lse = p.lse;
  a.ws_o = parts > 1 ? static_cast<float*>(workspace) : nullptr;
  a.ws_lse = parts > 1 ? a.ws_o + parts * rows * p.head_dim : nullptr;
  for (int r = 0; r < 2; ++r) {
    a.pf[r] = static_cast<const unsigned char*>(p.l2_prefetch[r]);
    a.pf_bytes[r] = p.l2_prefetch_bytes[r];
  }
  a.pf_share = 0;  // set with the warp kernel's grid below

  if (UsePrefillMma(p, parts)) {
    const bool bf16 = p.kv.dtype == DType::kBF16;
    const cudaError_t e =
        p.head_dim == 64 ? (bf16 ? LaunchPrefillMma<__nv_bfloat16, 64>(a, p.num_q_tokens, stream)
                                 : LaunchPrefillMma<__half, 64>(a, p.num_q_tokens, stream))
                         : (bf16 ? LaunchPrefillMma<__nv_bfloat16, 128>(a, p.num_q_tokens, stream)
                                 : LaunchPrefillMma<__half, 128>(a, p.num_q_tokens, stream));
    HELIX_CUDA_RETURN_IF_ERROR(e);
    if (p.num_seqs <= 1) {
      return cudaSuccess;  // every prefill block had one sequence
    }
    a.prefill_done = true;  // the warp kernel below serves the tokens of the other blocks
    a.early_kv = false;
  }
  HELIX_CUDA_RETURN_IF_ERROR(PrepareKernel(ch));
  const dim3 grid(static_cast<unsigned>(p.num_q_tokens * p.num_kv_heads * a.subs),
                  static_cast<unsigned>(parts));
  a.pf_share =
      PrefetchShareBytes(a.pf_bytes[0] + a.pf_bytes[1], static_cast<int64_t>(grid.x) * grid.y);
  HELIX_LAUNCH_PDL(ch.fn, grid, ch.threads, ch.smem, stream, a);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  if (parts > 1) {
    const MergeStatesParams mp{.o = a.ws_o,
                               .lse = a.ws_lse,
                               .out = p.out,
                               .out_lse = p.lse,
                               .num_parts = parts,
                               .rows = rows,
                               .head_dim = p.head_dim};
    // A programmatic dependent of the attention grid: its launch overlaps the attention's tail.
    HELIX_LAUNCH_PDL(MergeKernelFor(mp), static_cast<unsigned>(rows), kMergeThreads, 0, stream, mp);
    HELIX_CUDA_CHECK_LAUNCH(stream);
  }
  return cudaSuccess;
}

cudaError_t MergeStatesCuda(const MergeStatesParams& p, cudaStream_t stream) {
  if (p.rows <= 0) {
    return cudaSuccess;
  }
  if (p.rows > kMaxGridX) {
    return cudaErrorInvalidValue;
  }
  HELIX_LAUNCH_PDL(MergeKernelFor(p), static_cast<unsigned>(p.rows), kMergeThreads, 0, stream, p);
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

void SetPagedAttentionCudaTensorCores(bool on) {
  g_tensor_cores.store(on);
  if (on) {
    (void)TensorCoresAvailable();  // decided now, outside any stream capture
  }
}

void SetPagedAttentionCudaTuningForTesting(const PagedAttentionCudaTuning& t) {
  Tuning() = t;
  if (t.tensor_cores) {
    (void)TensorCoresAvailable();
  }
}

}  // namespace helix::kernels::cuda
