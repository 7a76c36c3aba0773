#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu_vec.h"
#include "kernels/merge.h"
#include "kernels/mla_attention.h"

namespace helix::kernels {
namespace {

using vec::V8;

// MLA decode on the CPU is compute bound, not memory bound: every cached row (latent_dim +
// rope_dim elements) costs num_heads * (latent_dim + rope_dim + latent_dim) FMAs, about 15 per
// byte of bf16 KV at 16 heads. So the kernel is two small GEMMs per tile of rows, with
// register blocking that keeps the AVX2 FMA ports busy: S = Q K^T (scores of all heads), then
// O = alpha O + P V with V the rows' latent part.

// Rows per tile (a multiple of 8: the softmax works on 8-row vectors of one head's scores).
constexpr int64_t kTileRows = 24;
// fp32 copies of a tile's rows (16-bit pools; f32 rows are read in place): two buffers of
// 60 KiB on the stack, so rows of up to 640 elements come kTileRows at a time, longer ones
// fewer at a time.
constexpr int64_t kTileFloats = kTileRows * 640;
// Heads one work item serves; more heads are cut into several items (each reading the rows).
constexpr int64_t kMaxHeads = 128;
// Register blocks: scores kHb heads x kTb rows, output kHb heads x kEb 8-wide vectors. Each
// keeps 12 accumulators plus 4 operands in the 16 AVX2 registers.
constexpr int kHb = 4;
constexpr int kTb = 3;
constexpr int kEb = 3;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// s[h * kTileRows + t] = scale * q_h . k_t for HB heads (rows q + h * dk) and TB cached rows.
// Each (head, row) score is one 8-lane accumulator over the dk / 8 vectors of the row, summed
// across lanes, then the dk % 8 tail: the same operations whatever block it is computed in,
// so the result does not depend on how heads are grouped into work items.
template <int HB, int TB>
inline void ScoreBlock(const float* q, const float* const* k, int64_t dk, float scale, float* s) {
  const int64_t dk8 = dk / 8 * 8;
  V8 acc[HB][TB];
  for (int h = 0; h < HB; ++h) {
    for (int t = 0; t < TB; ++t) {
      acc[h][t] = vec::Zero();
    }
  }
  for (int64_t e = 0; e < dk8; e += 8) {
    V8 kv[TB];
    for (int t = 0; t < TB; ++t) {
      kv[t] = vec::Load(k[t] + e);
    }
    for (int h = 0; h < HB; ++h) {
      const V8 qv = vec::Load(q + h * dk + e);
      for (int t = 0; t < TB; ++t) {
        acc[h][t] = vec::Fma(qv, kv[t], acc[h][t]);
      }
    }
  }
  for (int h = 0; h < HB; ++h) {
    for (int t = 0; t < TB; ++t) {
      float x = vec::HorizontalSum(acc[h][t]);
      for (int64_t e = dk8; e < dk; ++e) {
        x = std::fma(q[h * dk + e], k[t][e], x);
      }
      s[h * kTileRows + t] = x * scale;
    }
  }
}

// o[h][e0 : e0 + 8 EB] = o * alpha[h] + sum_t p[h * kTileRows + t] v_t[e0 : ...] for HB heads
// (output rows o + h * o_stride) and the nt rows v.
template <int HB, int EB>
inline void AccumulateBlock(const float* p, const float* alpha, const float* const* v, int64_t nt,
                            float* o, int64_t o_stride, int64_t e0) {
  V8 acc[HB][EB];
  for (int h = 0; h < HB; ++h) {
    const V8 a = vec::Set1(alpha[h]);
    for (int c = 0; c < EB; ++c) {
      acc[h][c] = vec::Mul(vec::Load(o + h * o_stride + e0 + 8 * c), a);
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    V8 vv[EB];
    for (int c = 0; c < EB; ++c) {
      vv[c] = vec::Load(v[t] + e0 + 8 * c);
    }
    for (int h = 0; h < HB; ++h) {
      const V8 w = vec::Set1(p[h * kTileRows + t]);
      for (int c = 0; c < EB; ++c) {
        acc[h][c] = vec::Fma(w, vv[c], acc[h][c]);
      }
    }
  }
  for (int h = 0; h < HB; ++h) {
    for (int c = 0; c < EB; ++c) {
      vec::Store(o + h * o_stride + e0 + 8 * c, acc[h][c]);
    }
  }
}

// ScoreBlock for any hb <= kHb, tb <= kTb.
template <int HB>
void ScoreHeads(int tb, const float* q, const float* const* k, int64_t dk, float scale, float* s) {
  switch (tb) {
    case 3:
      return ScoreBlock<HB, 3>(q, k, dk, scale, s);
    case 2:
      return ScoreBlock<HB, 2>(q, k, dk, scale, s);
    default:
      return ScoreBlock<HB, 1>(q, k, dk, scale, s);
  }
}

void Score(int hb, int tb, const float* q, const float* const* k, int64_t dk, float scale,
           float* s) {
  static_assert(kHb == 4 && kTb == 3);
  switch (hb) {
    case 4:
      return ScoreHeads<4>(tb, q, k, dk, scale, s);
    case 3:
      return ScoreHeads<3>(tb, q, k, dk, scale, s);
    case 2:
      return ScoreHeads<2>(tb, q, k, dk, scale, s);
    default:
      return ScoreHeads<1>(tb, q, k, dk, scale, s);
  }
}

template <int HB>
void AccumulateHeads(int eb, const float* p, const float* alpha, const float* const* v, int64_t nt,
                     float* o, int64_t o_stride, int64_t e0) {
  switch (eb) {
    case 3:
      return AccumulateBlock<HB, 3>(p, alpha, v, nt, o, o_stride, e0);
    case 2:
      return AccumulateBlock<HB, 2>(p, alpha, v, nt, o, o_stride, e0);
    default:
      return AccumulateBlock<HB, 1>(p, alpha, v, nt, o, o_stride, e0);
  }
}

void Accumulate(int hb, int eb, const float* p, const float* alpha, const float* const* v,
                int64_t nt, float* o, int64_t o_stride, int64_t e0) {
  static_assert(kHb == 4 && kEb == 3);
  switch (hb) {
    case 4:
      return AccumulateHeads<4>(eb, p, alpha, v, nt, o, o_stride, e0);
    case 3:
      return AccumulateHeads<3>(eb, p, alpha, v, nt, o, o_stride, e0);
    case 2:
      return AccumulateHeads<2>(eb, p, alpha, v, nt, o, o_stride, e0);
    default:
      return AccumulateHeads<1>(eb, p, alpha, v, nt, o, o_stride, e0);
  }
}

// Converts n pool elements starting at element off to fp32.
template <DType T>
void ConvertRow(const void* base, int64_t off, int64_t n, float* dst) {
  const int64_t n8 = n / 8 * 8;
  for (int64_t e = 0; e < n8; e += 8) {
    vec::Store(dst + e, vec::LoadAs<T>(base, off + e));
  }
  for (int64_t e = n8; e < n; ++e) {
    dst[e] = vec::LoadScalarAs<T>(base, off + e);
  }
}

using ConvertRowFn = void (*)(const void*, int64_t, int64_t, float*);

ConvertRowFn PickConvert(DType t) {
  switch (t) {
    case DType::kF16:
      return &ConvertRow<DType::kF16>;
    case DType::kBF16:
      return &ConvertRow<DType::kBF16>;
    case DType::kF32:
      break;
  }
  return nullptr;  // f32 rows are read in place
}

// Walks the visible rows of a chunk's blocks in order: block j's rows [0, nvis(j)) are those
// within kv_len and at global positions <= the query's.
struct RowCursor {
  const MlaAttentionParams* p;
  const int32_t* table;
  const int32_t* first;
  int64_t pos, kv_len;
  int64_t j, blk_end;  // current local block, end of the chunk's blocks
  int64_t r, nvis;     // next row within block j, visible rows of block j

  int64_t Visible(int64_t blk) const {
    const int64_t tpb = p->kv.tokens_per_block;
    return std::clamp<int64_t>(pos - first[blk] + 1, 0, std::min(tpb, kv_len - blk * tpb));
  }
  // Element offset of the next visible row's dim 0, or -1 when the chunk is done.
  int64_t Next() {
    while (r >= nvis) {
      if (++j >= blk_end) {
        return -1;
      }
      r = 0;
      nvis = Visible(j);
    }
    return KvOffset(p->kv, table[j], p->layer, 0, 0, r++);
  }
};

// Attention of query token t over chunk c's rows for heads [h0, h0 + nh), into o [nh][latent]
// and lse [nh].
void AttendItem(const MlaAttentionParams& p, int64_t blocks_per_part, int64_t t, int64_t c,
                int64_t h0, int64_t nh, float* o, float* lse) {
  const int64_t latent = p.latent_dim;
  const int64_t dk = p.latent_dim + p.rope_dim;
  const int64_t tpb = p.kv.tokens_per_block;
  const int64_t seq = p.q_seq[t];
  const int64_t kv_len = p.kv_lens[seq];
  const int64_t elem_bytes = static_cast<int64_t>(DTypeSize(p.kv.dtype));
  const char* base_bytes = static_cast<const char*>(p.kv.base);
  const ConvertRowFn convert = PickConvert(p.kv.dtype);
  const int64_t tile_rows = convert == nullptr ? kTileRows : std::min(kTileRows, kTileFloats / dk);
  const float* q = p.q + (t * p.num_heads + h0) * dk;

  const int64_t num_blocks = (kv_len + tpb - 1) / tpb;
  RowCursor cur{.p = &p,
                .table = p.block_tables + seq * p.max_blocks_per_seq,
                .first = p.block_first_pos + seq * p.max_blocks_per_seq,
                .pos = p.q_pos[t],
                .kv_len = kv_len,
                .j = c * blocks_per_part - 1,
                .blk_end = std::min(num_blocks, (c + 1) * blocks_per_part),
                .r = 0,
                .nvis = 0};

  // Two tile buffers: the next tile's rows are converted while this one is scored, so their
  // cache misses overlap the FMAs instead of stalling the start of every tile.
  alignas(32) float tiles[2][kTileFloats];
  alignas(32) float sc[kMaxHeads * kTileRows];  // [head][row]: scores, then probabilities
  float m[kMaxHeads], l[kMaxHeads], alpha[kMaxHeads];
  const float* row_ptrs[2][kTileRows];
  int64_t offs[kTileRows];  // the next tile's rows (element offsets)
  std::fill(m, m + nh, kNegInf);
  std::fill(l, l + nh, 0.0f);
  std::fill(o, o + nh * latent, 0.0f);

  int64_t next_off = cur.Next();
  const auto gather = [&] {
    int64_t n = 0;
    for (; n < tile_rows && next_off >= 0; next_off = cur.Next()) {
      offs[n++] = next_off;
    }
    return n;
  };
  const auto load_rows = [&](int buf, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (convert == nullptr) {
        row_ptrs[buf][i] = static_cast<const float*>(p.kv.base) + offs[i];
      } else {
        convert(p.kv.base, offs[i], dk, tiles[buf] + i * dk);
        row_ptrs[buf][i] = tiles[buf] + i * dk;
      }
    }
  };
  int buf = 0;
  int64_t nt = gather();
  load_rows(buf, 0, nt);
  while (nt > 0) {
    const float* const* rows = row_ptrs[buf];
    const int64_t n_next = gather();
    if (convert == nullptr) {
      // f32 rows are read in place: have the next tile's arrive in L2 meanwhile (blocks are
      // scattered, so the hardware prefetcher cannot guess the first lines of each).
      for (int64_t i = 0; i < n_next; ++i) {
        const char* row = base_bytes + offs[i] * elem_bytes;
        for (int64_t b = 0; b < dk * elem_bytes; b += 64) {
          __builtin_prefetch(row + b, 0, 2);
        }
      }
    }

    int64_t loaded = 0;
    for (int64_t t0 = 0; t0 < nt; t0 += kTb) {
      const int tb = static_cast<int>(std::min<int64_t>(kTb, nt - t0));
      for (int64_t hb0 = 0; hb0 < nh; hb0 += kHb) {
        const int hb = static_cast<int>(std::min<int64_t>(kHb, nh - hb0));
        Score(hb, tb, q + hb0 * dk, rows + t0, dk, p.scale, sc + hb0 * kTileRows + t0);
      }
      const int64_t upto = std::min(n_next, t0 + kTb);
      load_rows(buf ^ 1, loaded, upto);
      loaded = std::max(loaded, upto);
    }
    load_rows(buf ^ 1, loaded, n_next);

    for (int64_t h = 0; h < nh; ++h) {
      alpha[h] = vec::OnlineSoftmaxTile(sc + h * kTileRows, nt, &m[h], &l[h]);
    }

    const int64_t lat8 = latent / 8 * 8;
    for (int64_t e0 = 0; e0 < lat8; e0 += 8 * kEb) {
      const int eb = static_cast<int>(std::min<int64_t>(kEb, (lat8 - e0) / 8));
      for (int64_t hb0 = 0; hb0 < nh; hb0 += kHb) {
        const int hb = static_cast<int>(std::min<int64_t>(kHb, nh - hb0));
        Accumulate(hb, eb, sc + hb0 * kTileRows, alpha + hb0, rows, nt, o + hb0 * latent, latent,
                   e0);
      }
    }
    for (int64_t h = 0; h < nh; ++h) {  // latent % 8 tail, the same operations per element
      for (int64_t e = lat8; e < latent; ++e) {
        float x = o[h * latent + e] * alpha[h];
        for (int64_t r = 0; r < nt; ++r) {
          x = std::fma(sc[h * kTileRows + r], rows[r][e], x);
        }
        o[h * latent + e] = x;
      }
    }
    buf ^= 1;
    nt = n_next;
  }

  for (int64_t h = 0; h < nh; ++h) {
    if (l[h] != 0.0f) {  // 0: nothing visible; NaN (a NaN score): the row and LSE NaN
      const float inv = 1.0f / l[h];
      for (int64_t e = 0; e < latent; ++e) {
        o[h * latent + e] *= inv;
      }
      lse[h] = m[h] + std::log(l[h]);
    } else {
      lse[h] = kNegInf;  // nothing visible: the row stays 0
    }
  }
}

}  // namespace

size_t MlaAttentionWorkspaceBytes(const MlaAttentionParams& p) {
  const int64_t parts = SplitKvParts(p);
  if (parts <= 1) {
    return 0;
  }
  const int64_t rows = p.num_q_tokens * p.num_heads;
  return static_cast<size_t>(parts * rows * (p.latent_dim + 1)) * sizeof(float);
}

void MlaAttentionCpu(const MlaAttentionParams& p, void* workspace, ThreadPool* pool) {
  if (p.num_q_tokens <= 0 || p.num_heads <= 0) {
    return;
  }
  const int64_t H = p.num_heads;
  const int64_t latent = p.latent_dim;
  const int64_t parts = SplitKvParts(p);
  const int64_t blocks_per_part = parts > 1 ? SplitKvBlocksPerChunk(p) : p.max_blocks_per_seq;

  // Work items are (query token, chunk, head group). Heads are grouped only as far as needed
  // to give every thread about two items (at least 8 heads an item) or to stay within
  // kMaxHeads; every head's result is the same whatever its group, so the thread count does
  // not change the output.
  const int64_t threads = pool != nullptr ? pool->size() : 1;
  const int64_t per_group = p.num_q_tokens * parts;
  const int64_t min_groups = (H + kMaxHeads - 1) / kMaxHeads;
  const int64_t wanted = (2 * threads + per_group - 1) / per_group;
  const int64_t groups = std::clamp<int64_t>(wanted, min_groups, std::max(min_groups, H / 8));
  int64_t heads_per_item = (H + groups - 1) / groups;
  heads_per_item = std::min(kMaxHeads, (heads_per_item + kHb - 1) / kHb * kHb);
  const int64_t head_groups = (H + heads_per_item - 1) / heads_per_item;

  const int64_t rows = p.num_q_tokens * H;
  float* ws_o = parts > 1 ? static_cast<float*>(workspace) : nullptr;
  float* ws_lse = parts > 1 ? ws_o + parts * rows * latent : nullptr;

  // Items ordered (token, chunk, head group), handed out dynamically: their costs follow the
  // sequence lengths.
  const int64_t items = p.num_q_tokens * parts * head_groups;
  auto run_item = [&](int64_t it) {
    const int64_t hg = it % head_groups;
    it /= head_groups;
    const int64_t c = it % parts;
    const int64_t t = it / parts;
    const int64_t h0 = hg * heads_per_item;
    const int64_t nh = std::min(H, h0 + heads_per_item) - h0;
    const int64_t row = t * H + h0;
    float* o = parts > 1 ? ws_o + (c * rows + row) * latent : p.out + row * latent;
    float lse_tmp[kMaxHeads];
    float* lse = parts > 1 ? ws_lse + c * rows + row : (p.lse ? p.lse + row : lse_tmp);
    AttendItem(p, blocks_per_part, t, c, h0, nh, o, lse);
  };
  ParallelForEachItem(pool, items, run_item);

  if (parts > 1) {
    MergeStatesCpu({.o = ws_o,
                    .lse = ws_lse,
                    .out = p.out,
                    .out_lse = p.lse,
                    .num_parts = parts,
                    .rows = rows,
                    .head_dim = latent},
                   pool);
  }
}

}  // namespace helix::kernels
