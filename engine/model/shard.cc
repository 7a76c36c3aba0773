#include "engine/model/shard.h"

#include <algorithm>

namespace helix {
namespace {

// Rows [r0, r1) of a row-major [rows][cols] matrix.
std::vector<float> Rows(const std::vector<float>& m, int64_t cols, int64_t r0, int64_t r1) {
  return std::vector<float>(m.begin() + r0 * cols, m.begin() + r1 * cols);
}

// Columns [c0, c1) of a row-major [rows][cols] matrix.
std::vector<float> Cols(const std::vector<float>& m, int64_t cols, int64_t c0, int64_t c1) {
  const int64_t rows = static_cast<int64_t>(m.size()) / cols;
  std::vector<float> out(static_cast<size_t>(rows * (c1 - c0)));
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(m.begin() + r * cols + c0, m.begin() + r * cols + c1, out.begin() + r * (c1 - c0));
  }
  return out;
}

}  // namespace

ShardDims ComputeShardDims(const ModelConfig& c, const parallel::HelixLayout& l) {
  ShardDims d{};
  d.q_heads = c.n_heads / l.tp;
  d.kv_heads = c.n_kv_heads / l.tp;
  d.out_heads = c.n_heads / l.world();
  d.head_begin = l.rank() * d.out_heads;
  std::tie(d.ffn_begin, d.ffn_end) = parallel::SplitRange(c.hidden_dim, l.world(), l.rank());
  std::tie(d.vocab_begin, d.vocab_end) = parallel::SplitRange(c.vocab_size, l.world(), l.rank());
  return d;
}

void ShardWeights(const ModelConfig& c, const parallel::HelixLayout& l, ModelWeights* w) {
  if (l.single()) return;
  const ShardDims d = ComputeShardDims(c, l);
  const int64_t hd = c.head_dim, D = c.dim, F = c.hidden_dim;
  const int64_t q0 = l.tp_rank * d.q_heads * hd, q1 = q0 + d.q_heads * hd;
  const int64_t k0 = l.tp_rank * d.kv_heads * hd, k1 = k0 + d.kv_heads * hd;
  const int64_t o0 = d.head_begin * hd, o1 = o0 + d.out_heads * hd;
  for (LayerWeights& lw : w->layers) {
    lw.wq.f32 = Rows(lw.wq.f32, D, q0, q1);
    lw.wk.f32 = Rows(lw.wk.f32, D, k0, k1);
    lw.wv.f32 = Rows(lw.wv.f32, D, k0, k1);
    if (!lw.bq.empty()) {
      lw.bq = Rows(lw.bq, 1, q0, q1);
      lw.bk = Rows(lw.bk, 1, k0, k1);
      lw.bv = Rows(lw.bv, 1, k0, k1);
    }
    lw.wo.f32 = Cols(lw.wo.f32, c.n_heads * hd, o0, o1);
    lw.w1.f32 = Rows(lw.w1.f32, D, d.ffn_begin, d.ffn_end);
    lw.w3.f32 = Rows(lw.w3.f32, D, d.ffn_begin, d.ffn_end);
    lw.w2.f32 = Cols(lw.w2.f32, F, d.ffn_begin, d.ffn_end);
  }
  const std::vector<float>& cls =
      w->classifier.f32.empty() ? w->token_embedding : w->classifier.f32;
  w->classifier.f32 = Rows(cls, D, d.vocab_begin, d.vocab_end);
}

}  // namespace helix
