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
  if (c.mla()) d.kv_heads = 1;  // the latent is not split over heads: every TP shard holds it
  std::tie(d.shared_begin, d.shared_end) =
      parallel::SplitRange(c.n_shared_experts * c.moe_hidden_dim, l.world(), l.rank());
  std::tie(d.expert_begin, d.expert_end) =
      parallel::SplitRange(c.n_routed_experts, l.world(), l.rank());
  return d;
}

namespace {

// MLA: kv_b_proj [H][nope + v][kv_lora] -> wuk_t (the TP shard's query heads, each W_UK
// transposed to [kv_lora][nope]) and wuv (the combined heads' W_UV [v][kv_lora]).
void SplitKvB(const ModelConfig& c, const ShardDims& d, const parallel::HelixLayout& l,
              LayerWeights* lw) {
  const int64_t nope = c.qk_nope_head_dim, v = c.v_head_dim, r = c.kv_lora_rank;
  const int64_t per_head = (nope + v) * r;
  lw->wuk_t.f32.assign(static_cast<size_t>(d.q_heads * r * nope), 0.0f);
  for (int64_t i = 0; i < d.q_heads; ++i) {
    const float* src = lw->wkv_b.data() + (l.tp_rank * d.q_heads + i) * per_head;
    float* dst = lw->wuk_t.f32.data() + i * r * nope;
    for (int64_t n = 0; n < nope; ++n) {
      for (int64_t k = 0; k < r; ++k) dst[k * nope + n] = src[n * r + k];
    }
  }
  lw->wuv.f32.clear();
  for (int64_t i = 0; i < d.out_heads; ++i) {
    const float* src = lw->wkv_b.data() + (d.head_begin + i) * per_head + nope * r;
    lw->wuv.f32.insert(lw->wuv.f32.end(), src, src + v * r);
  }
  std::vector<float>().swap(lw->wkv_b);
}

}  // namespace

void ShardWeights(const ModelConfig& c, const parallel::HelixLayout& l, ModelWeights* w) {
  const ShardDims d = ComputeShardDims(c, l);
  if (c.mla()) {
    for (LayerWeights& lw : w->layers) SplitKvB(c, d, l, &lw);
  }
  if (l.single()) return;
  const int64_t D = c.dim, F = c.hidden_dim;
  if (c.mla()) {
    const int64_t qh = c.qk_head_dim(), in = c.q_lora_rank > 0 ? c.q_lora_rank : D;
    const int64_t q0 = l.tp_rank * d.q_heads * qh, q1 = q0 + d.q_heads * qh;
    const int64_t o0 = d.head_begin * c.v_head_dim, o1 = o0 + d.out_heads * c.v_head_dim;
    for (LayerWeights& lw : w->layers) {
      lw.wq.f32 = Rows(lw.wq.f32, in, q0, q1);
      lw.wo.f32 = Cols(lw.wo.f32, c.n_heads * c.v_head_dim, o0, o1);
    }
  } else {
    const int64_t hd = c.head_dim;
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
    }
  }
  for (int64_t li = 0; li < c.n_layers; ++li) {
    LayerWeights& lw = w->layers[li];
    if (!c.IsMoeLayer(li)) {
      lw.w1.f32 = Rows(lw.w1.f32, D, d.ffn_begin, d.ffn_end);
      lw.w3.f32 = Rows(lw.w3.f32, D, d.ffn_begin, d.ffn_end);
      lw.w2.f32 = Cols(lw.w2.f32, F, d.ffn_begin, d.ffn_end);
      continue;
    }
    if (c.n_shared_experts > 0) {
      const int64_t S = c.n_shared_experts * c.moe_hidden_dim;
      lw.w1.f32 = Rows(lw.w1.f32, D, d.shared_begin, d.shared_end);
      lw.w3.f32 = Rows(lw.w3.f32, D, d.shared_begin, d.shared_end);
      lw.w2.f32 = Cols(lw.w2.f32, S, d.shared_begin, d.shared_end);
    }
    const int64_t e0 = d.expert_begin - lw.expert_begin, e1 = d.expert_end - lw.expert_begin;
    std::vector<LayerWeights::Expert> mine;
    for (int64_t e = e0; e < e1; ++e) mine.push_back(std::move(lw.experts[e]));
    lw.experts = std::move(mine);
    lw.expert_begin = d.expert_begin;
  }
  const std::vector<float>& cls =
      w->classifier.f32.empty() ? w->token_embedding : w->classifier.f32;
  w->classifier.f32 = Rows(cls, D, d.vocab_begin, d.vocab_end);
}

}  // namespace helix
