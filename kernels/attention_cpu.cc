#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/attention.h"
#include "kernels/cpu_vec.h"
#include "kernels/merge.h"

namespace helix::kernels {
namespace {

using vec::V8;

// Query heads of a GQA group handled together (sharing every K/V load); larger groups are
// cut into sub-groups of this size.
constexpr int kMaxGroup = 8;
// KV rows scored before the running max/sum and the output are updated. A multiple of 8.
constexpr int64_t kTile = 32;
// Sub-groups (KV head x up to 8 query heads) whose state one work item carries.
constexpr int kMaxPairs = 32;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Dot products of G query heads with TT consecutive K rows starting at element row0. Lane
// tt * G + g of the result is q[g] . k[tt]. The rows are walked one after the other so the
// loads stream forward through memory (interleaving rows defeats the hardware prefetcher);
// the TT * G <= 8 independent accumulator chains still overlap in the out-of-order core.
template <DType T, int G, int TT>
inline V8 ScoreRows(const void* base, const float* const* q, int64_t row0, int64_t d) {
  static_assert(TT * G <= kMaxGroup);
  const int64_t d8 = d / 8 * 8;
  V8 acc[kMaxGroup];
  for (int i = 0; i < kMaxGroup; ++i) {
    acc[i] = vec::Zero();
  }
  for (int tt = 0; tt < TT; ++tt) {
    for (int64_t e = 0; e < d8; e += 8) {
      const V8 kv = vec::LoadAs<T>(base, row0 + tt * d + e);
      for (int g = 0; g < G; ++g) {
        acc[tt * G + g] = vec::Fma(vec::Load(q[g] + e), kv, acc[tt * G + g]);
      }
    }
  }
  V8 dots = vec::ReduceLanes8(acc);
  if (d8 < d) {
    alignas(32) float tail[kMaxGroup] = {};
    for (int tt = 0; tt < TT; ++tt) {
      for (int64_t e = d8; e < d; ++e) {
        const float kv = vec::LoadScalarAs<T>(base, row0 + tt * d + e);
        for (int g = 0; g < G; ++g) {
          tail[tt * G + g] += q[g][e] * kv;
        }
      }
    }
    dots = vec::Add(dots, vec::Load(tail));
  }
  return dots;
}

// o[g][e0 : e0 + 8 EE] = o * alpha[g] + sum_i p[g][i] v[i] over nt V rows starting at
// element row0. G * EE <= 8 accumulators; each V element is loaded once.
template <DType T, int G, int EE>
inline void AccumulateV(const void* base, int64_t row0, int64_t d, int64_t nt,
                        const float (*p)[kTile], const float* alpha, float* o, int64_t e0) {
  V8 acc[G][EE];
  for (int g = 0; g < G; ++g) {
    const V8 a = vec::Set1(alpha[g]);
    for (int c = 0; c < EE; ++c) {
      acc[g][c] = vec::Mul(vec::Load(o + g * d + e0 + 8 * c), a);
    }
  }
  for (int64_t i = 0; i < nt; ++i) {
    // Keep G * EE accumulators plus either the G weights or the EE V vectors live (never
    // both: that would exceed the 16 AVX2 registers and spill).
    if constexpr (G <= EE) {
      V8 w[G];
      for (int g = 0; g < G; ++g) {
        w[g] = vec::Set1(p[g][i]);
      }
      for (int c = 0; c < EE; ++c) {
        const V8 vv = vec::LoadAs<T>(base, row0 + i * d + e0 + 8 * c);
        for (int g = 0; g < G; ++g) {
          acc[g][c] = vec::Fma(w[g], vv, acc[g][c]);
        }
      }
    } else {
      V8 vv[EE];
      for (int c = 0; c < EE; ++c) {
        vv[c] = vec::LoadAs<T>(base, row0 + i * d + e0 + 8 * c);
      }
      for (int g = 0; g < G; ++g) {
        const V8 w = vec::Set1(p[g][i]);
        for (int c = 0; c < EE; ++c) {
          acc[g][c] = vec::Fma(w, vv[c], acc[g][c]);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < EE; ++c) {
      vec::Store(o + g * d + e0 + 8 * c, acc[g][c]);
    }
  }
}

// Running softmax state of one sub-group of query heads.
struct GroupState {
  float m[kMaxGroup];  // running max of the scaled scores (-inf before any visible token)
  float l[kMaxGroup];  // running sum of exp(score - m)
};

// One block's visible rows for one sub-group of query heads.
struct RowsArgs {
  const void* base;  // the KV pool
  const float* q;    // [G][d] the sub-group's query rows
  float* o;          // [G][d] running (unnormalised) output
  int64_t k_off;     // element offset of this block's K row 0 for the KV head
  int64_t v_off;     // element offset of this block's V row 0 for the KV head
  int64_t nvis;      // visible tokens: rows [0, nvis) of the block
  int64_t d;
  float scale;
  const char* next_k;  // K rows processed next (prefetched meanwhile), or nullptr
};

// Online-softmax update of a sub-group of G query heads with one block's visible rows, kTile
// rows at a time: score them, rescale the running state once, then accumulate p * V.
template <DType T, int G>
void AttendRows(const RowsArgs& a, GroupState* st) {
  constexpr int64_t kElemBytes = static_cast<int64_t>(DTypeSize(T));
  constexpr int kRowsPerPass = kMaxGroup / G;    // K rows scored together
  constexpr int kChunksPerPass = kMaxGroup / G;  // 8-wide column chunks of V done together
  const int64_t d = a.d;
  const int64_t d8 = d / 8 * 8;
  const float* q[G];
  for (int g = 0; g < G; ++g) {
    q[g] = a.q + g * d;
  }
  const V8 scale = vec::Set1(a.scale);
  // Scores, then probabilities, of the tile: [head][token], tokens in vector lanes so the
  // softmax bookkeeping costs per token and not per lane of a head vector.
  alignas(32) float sc[G][kTile];
  float alpha[G];

  for (int64_t i0 = 0; i0 < a.nvis; i0 += kTile) {
    const int64_t nt = std::min(kTile, a.nvis - i0);
    // While a K row is scored, prefetch the V row that follows it and the matching row of
    // the K rows processed next, which the hardware prefetcher cannot predict (blocks are
    // scattered). Spread out, so the prefetches never pile up in the miss buffers.
    const char* v_bytes = static_cast<const char*>(a.base) + a.v_off * kElemBytes;
    const auto prefetch_rows = [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0 * d * kElemBytes; b < r1 * d * kElemBytes; b += 64) {
        __builtin_prefetch(v_bytes + b);
        if (a.next_k != nullptr) {
          __builtin_prefetch(a.next_k + b);
        }
      }
    };

    int64_t i = 0;
    for (; i + kRowsPerPass <= nt; i += kRowsPerPass) {
      prefetch_rows(i0 + i, i0 + i + kRowsPerPass);
      const V8 dots =
          vec::Mul(ScoreRows<T, G, kRowsPerPass>(a.base, q, a.k_off + (i0 + i) * d, d), scale);
      if constexpr (G == 1) {
        vec::Store(&sc[0][i], dots);
      } else {
        alignas(32) float tmp[kMaxGroup];
        vec::Store(tmp, dots);
        for (int tt = 0; tt < kRowsPerPass; ++tt) {
          for (int g = 0; g < G; ++g) {
            sc[g][i + tt] = tmp[tt * G + g];
          }
        }
      }
    }
    for (; i < nt; ++i) {
      prefetch_rows(i0 + i, i0 + i + 1);
      alignas(32) float tmp[kMaxGroup];
      vec::Store(tmp, vec::Mul(ScoreRows<T, G, 1>(a.base, q, a.k_off + (i0 + i) * d, d), scale));
      for (int g = 0; g < G; ++g) {
        sc[g][i] = tmp[g];
      }
    }

    for (int g = 0; g < G; ++g) {
      alpha[g] = vec::OnlineSoftmaxTile(sc[g], nt, &st->m[g], &st->l[g]);
    }

    const int64_t v_row = a.v_off + i0 * d;
    int64_t e = 0;
    for (; e + 8 * kChunksPerPass <= d8; e += 8 * kChunksPerPass) {
      AccumulateV<T, G, kChunksPerPass>(a.base, v_row, d, nt, sc, alpha, a.o, e);
    }
    for (; e < d8; e += 8) {
      AccumulateV<T, G, 1>(a.base, v_row, d, nt, sc, alpha, a.o, e);
    }
    for (; e < d; ++e) {
      for (int g = 0; g < G; ++g) {
        float acc = a.o[g * d + e] * alpha[g];
        for (int64_t r = 0; r < nt; ++r) {
          acc += sc[g][r] * vec::LoadScalarAs<T>(a.base, v_row + r * d + e);
        }
        a.o[g * d + e] = acc;
      }
    }
  }
}

using AttendRowsFn = void (*)(const RowsArgs&, GroupState*);

template <DType T>
AttendRowsFn PickForDType(int g) {
  switch (g) {
    case 1:
      return &AttendRows<T, 1>;
    case 2:
      return &AttendRows<T, 2>;
    case 3:
      return &AttendRows<T, 3>;
    case 4:
      return &AttendRows<T, 4>;
    case 5:
      return &AttendRows<T, 5>;
    case 6:
      return &AttendRows<T, 6>;
    case 7:
      return &AttendRows<T, 7>;
    default:
      return &AttendRows<T, 8>;
  }
}

AttendRowsFn PickAttendRows(DType t, int g) {
  switch (t) {
    case DType::kF32:
      return PickForDType<DType::kF32>(g);
    case DType::kF16:
      return PickForDType<DType::kF16>(g);
    case DType::kBF16:
      return PickForDType<DType::kBF16>(g);
  }
  return nullptr;
}

// How the work of one call is cut.
struct Plan {
  int64_t group;            // query heads per KV head
  int64_t subs;             // sub-groups of <= kMaxGroup query heads per KV head
  int64_t parts;            // KV chunks per sequence (1 without split-KV)
  int64_t blocks_per_part;  // local blocks per chunk
  int64_t heads_per_item;   // KV heads one work item covers
  int64_t head_groups;      // ceil(num_kv_heads / heads_per_item)
};

// Attention of query token t over the local blocks of chunk c, for KV heads
// [h_begin, h_end) and all their query heads. Blocks are walked in the outer loop and heads
// in the inner one, so a block's K and V rows of these heads are read as two forward
// streams (one head's rows alone are only a few KiB, too short to stream well).
// o: [heads * group][d] output rows of (t, h_begin * group ...); lse: [heads * group].
void AttendItem(const PagedAttentionParams& p, const Plan& plan, int64_t t, int64_t c,
                int64_t h_begin, int64_t h_end, float* o, float* lse) {
  const int64_t d = p.head_dim;
  const int64_t group = plan.group;
  const int64_t tpb = p.kv.tokens_per_block;
  const int64_t seq = p.q_seq[t];
  const int64_t pos = p.q_pos[t];
  const int64_t kv_len = p.kv_lens[seq];
  const int32_t* table = p.block_tables + seq * p.max_blocks_per_seq;
  const int32_t* first_pos = p.block_first_pos + seq * p.max_blocks_per_seq;
  const int64_t elem_bytes = static_cast<int64_t>(DTypeSize(p.kv.dtype));
  const char* base_bytes = static_cast<const char*>(p.kv.base);

  const int last_size = static_cast<int>(group - (plan.subs - 1) * kMaxGroup);
  const AttendRowsFn full_fn = PickAttendRows(p.kv.dtype, kMaxGroup);
  const AttendRowsFn last_fn = PickAttendRows(p.kv.dtype, last_size);

  GroupState st[kMaxPairs];
  const int64_t pairs = (h_end - h_begin) * plan.subs;
  for (int64_t i = 0; i < pairs; ++i) {
    std::fill(st[i].m, st[i].m + kMaxGroup, kNegInf);
    std::fill(st[i].l, st[i].l + kMaxGroup, 0.0f);
  }
  std::fill(o, o + (h_end - h_begin) * group * d, 0.0f);

  const int64_t num_blocks = (kv_len + tpb - 1) / tpb;
  const int64_t blk_begin = c * plan.blocks_per_part;
  const int64_t blk_end = std::min(num_blocks, blk_begin + plan.blocks_per_part);
  RowsArgs a;
  a.base = p.kv.base;
  a.d = d;
  a.scale = p.scale;
  for (int64_t j = blk_begin; j < blk_end; ++j) {
    a.nvis = std::clamp<int64_t>(pos - first_pos[j] + 1, 0, std::min(tpb, kv_len - j * tpb));
    if (a.nvis == 0) {
      continue;
    }
    for (int64_t h = h_begin; h < h_end; ++h) {
      a.k_off = KvOffset(p.kv, table[j], p.layer, 0, h, 0);
      a.v_off = KvOffset(p.kv, table[j], p.layer, 1, h, 0);
      // The K rows processed after these: the next head's, or the next block's first head's.
      const char* next_k = nullptr;
      if (h + 1 < h_end) {
        next_k = base_bytes + (a.k_off + tpb * d) * elem_bytes;
      } else if (j + 1 < blk_end) {
        next_k = base_bytes + KvOffset(p.kv, table[j + 1], p.layer, 0, h_begin, 0) * elem_bytes;
      }
      for (int64_t sub = 0; sub < plan.subs; ++sub) {
        const int64_t qh = h * group + sub * kMaxGroup;
        a.q = p.q + (t * p.num_q_heads + qh) * d;
        a.o = o + (qh - h_begin * group) * d;
        a.next_k = sub == 0 ? next_k : nullptr;
        (sub + 1 < plan.subs ? full_fn : last_fn)(a, &st[(h - h_begin) * plan.subs + sub]);
      }
    }
  }

  for (int64_t h = h_begin; h < h_end; ++h) {
    for (int64_t sub = 0; sub < plan.subs; ++sub) {
      const GroupState& s = st[(h - h_begin) * plan.subs + sub];
      const int64_t g0 = (h - h_begin) * group + sub * kMaxGroup;
      const int gs = sub + 1 < plan.subs ? kMaxGroup : last_size;
      for (int g = 0; g < gs; ++g) {
        float* row = o + (g0 + g) * d;
        // l is 0 only when no row was visible; NaN when a score was NaN (from q or K) or
        // +inf (inf - inf): then the row and its LSE are NaN, so that a merge sees it too.
        if (s.l[g] != 0.0f) {
          const float inv = 1.0f / s.l[g];
          for (int64_t e = 0; e < d; ++e) {
            row[e] *= inv;
          }
          lse[g0 + g] = s.m[g] + std::log(s.l[g]);
        } else {
          lse[g0 + g] = kNegInf;  // nothing visible: the row stays 0
        }
      }
    }
  }
}

template <typename Dst>
void ConvertRow(const float* src, int64_t n, Dst* dst, Dst (*convert)(float)) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = convert(src[i]);
  }
}

}  // namespace

void WriteKv(const KvPoolView& view, int64_t block, int64_t layer, int64_t token_in_block,
             const float* k, const float* v) {
  for (int c = 0; c < view.num_planes; ++c) {
    const float* src = c == 0 ? k : v;
    for (int64_t h = 0; h < view.num_kv_heads; ++h) {
      const int64_t off = KvOffset(view, block, layer, c, h, token_in_block);
      const float* row = src + h * view.head_dim;
      switch (view.dtype) {
        case DType::kF32:
          std::copy(row, row + view.head_dim, static_cast<float*>(view.base) + off);
          break;
        case DType::kF16:
          ConvertRow<uint16_t>(row, view.head_dim, static_cast<uint16_t*>(view.base) + off,
                               &FloatToHalf);
          break;
        case DType::kBF16:
          ConvertRow<uint16_t>(row, view.head_dim, static_cast<uint16_t*>(view.base) + off,
                               &FloatToBf16);
          break;
      }
    }
  }
}

size_t PagedAttentionWorkspaceBytes(const PagedAttentionParams& p) {
  const int64_t parts = SplitKvParts(p);
  if (parts <= 1) {
    return 0;
  }
  const int64_t rows = p.num_q_tokens * p.num_q_heads;
  return static_cast<size_t>(parts * rows * (p.head_dim + 1)) * sizeof(float);
}

void PagedAttentionCpu(const PagedAttentionParams& p, void* workspace, ThreadPool* pool) {
  if (p.num_q_tokens <= 0 || p.num_q_heads <= 0 || p.num_kv_heads <= 0) {
    return;
  }
  const int64_t d = p.head_dim;
  Plan plan;
  plan.group = p.num_q_heads / p.num_kv_heads;
  plan.subs = (plan.group + kMaxGroup - 1) / kMaxGroup;
  plan.parts = SplitKvParts(p);
  plan.blocks_per_part = plan.parts > 1 ? SplitKvBlocksPerChunk(p) : p.max_blocks_per_seq;
  // Whole KV-head sets per item stream best; cut them only to give every thread about two
  // items (and to keep each item's state within kMaxPairs sub-groups).
  const int64_t threads = pool != nullptr ? pool->size() : 1;
  const int64_t max_heads = std::max<int64_t>(1, kMaxPairs / plan.subs);
  const int64_t per_head_set = p.num_q_tokens * plan.parts;
  const int64_t wanted = (2 * threads + per_head_set - 1) / per_head_set;
  const int64_t groups =
      std::clamp<int64_t>(wanted, (p.num_kv_heads + max_heads - 1) / max_heads, p.num_kv_heads);
  plan.heads_per_item = (p.num_kv_heads + groups - 1) / groups;
  plan.head_groups = (p.num_kv_heads + plan.heads_per_item - 1) / plan.heads_per_item;

  const int64_t rows = p.num_q_tokens * p.num_q_heads;
  float* ws_o = plan.parts > 1 ? static_cast<float*>(workspace) : nullptr;
  float* ws_lse = plan.parts > 1 ? ws_o + plan.parts * rows * d : nullptr;

  // Items ordered (token, chunk, head group) and handed out dynamically: their costs follow
  // the sequence lengths.
  const int64_t items = p.num_q_tokens * plan.parts * plan.head_groups;
  auto run_item = [&](int64_t it) {
    const int64_t hg = it % plan.head_groups;
    it /= plan.head_groups;
    const int64_t c = it % plan.parts;
    const int64_t t = it / plan.parts;
    const int64_t h_begin = hg * plan.heads_per_item;
    const int64_t h_end = std::min(p.num_kv_heads, h_begin + plan.heads_per_item);
    const int64_t row = t * p.num_q_heads + h_begin * plan.group;
    float* o = plan.parts > 1 ? ws_o + (c * rows + row) * d : p.out + row * d;
    float lse_tmp[kMaxPairs * kMaxGroup];
    float* lse = plan.parts > 1 ? ws_lse + c * rows + row : (p.lse ? p.lse + row : lse_tmp);
    AttendItem(p, plan, t, c, h_begin, h_end, o, lse);
  };
  ParallelForEachItem(pool, items, run_item);

  if (plan.parts > 1) {
    MergeStatesCpu({.o = ws_o,
                    .lse = ws_lse,
                    .out = p.out,
                    .out_lse = p.lse,
                    .num_parts = plan.parts,
                    .rows = rows,
                    .head_dim = d},
                   pool);
  }
}

}  // namespace helix::kernels
