#include "engine/model/llama_model.h"

#include <algorithm>
#include <cmath>

namespace helix {

LlamaModel::LlamaModel(std::unique_ptr<LoadedModel> model, Backend* backend, kernels::KvPoolView kv)
    : model_(std::move(model)), backend_(backend), kv_(kv) {}

void LlamaModel::Forward(const ForwardBatch& b, std::vector<float>* logits) {
  const ModelConfig& c = model_->config;
  const ModelWeights& w = model_->weights;
  const int64_t T = b.num_tokens(), D = c.dim, hd = c.head_dim, F = c.hidden_dim;
  const int64_t qd = c.n_heads * hd, kvd = c.n_kv_heads * hd;
  x_.resize(T * D);
  xb_.resize(T * D);
  q_.resize(T * qd);
  k_.resize(T * kvd);
  v_.resize(T * kvd);
  att_.resize(T * qd);
  h1_.resize(T * F);
  h3_.resize(T * F);

  backend_->Embedding(w.token_embedding.data(), b.tokens.data(), T, D, x_.data());

  kernels::PagedAttentionParams ap{};
  ap.q = q_.data();
  ap.q_seq = b.token_seq.data();
  ap.q_pos = b.positions.data();
  ap.kv = kv_;
  ap.block_tables = b.block_tables.data();
  ap.block_first_pos = b.block_first_pos.data();
  ap.kv_lens = b.kv_lens.data();
  ap.max_blocks_per_seq = b.max_blocks;
  ap.num_seqs = b.num_seqs;
  ap.num_q_tokens = T;
  ap.num_q_heads = c.n_heads;
  ap.num_kv_heads = c.n_kv_heads;
  ap.head_dim = hd;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ap.out = att_.data();
  lse_.resize(T * c.n_heads);
  ap.lse = lse_.data();
  ap.kv_split_tokens = 0;
  const size_t ws = backend_->PagedAttentionWorkspaceBytes(ap);
  if (workspace_.size() < ws) workspace_.resize(ws);

  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    backend_->RmsNorm({x_.data(), nullptr, lw.attn_norm.data(), xb_.data(), T, D, c.norm_eps});
    backend_->Gemm({xb_.data(), lw.wq.data(), lw.bq.empty() ? nullptr : lw.bq.data(), q_.data(), T,
                    qd, D, lw.wq.dtype});
    backend_->Gemm({xb_.data(), lw.wk.data(), lw.bk.empty() ? nullptr : lw.bk.data(), k_.data(), T,
                    kvd, D, lw.wk.dtype});
    backend_->Gemm({xb_.data(), lw.wv.data(), lw.bv.empty() ? nullptr : lw.bv.data(), v_.data(), T,
                    kvd, D, lw.wv.dtype});
    backend_->Rope(
        {q_.data(), b.positions.data(), T, c.n_heads, hd, hd, c.rope_theta, c.rope_style});
    backend_->Rope(
        {k_.data(), b.positions.data(), T, c.n_kv_heads, hd, hd, c.rope_theta, c.rope_style});
    for (int64_t t = 0; t < T; ++t) {
      if (b.kv_block[t] < 0) continue;  // another rank owns this position
      backend_->WriteKv(kv_, b.kv_block[t], l, b.kv_slot[t], k_.data() + t * kvd,
                        v_.data() + t * kvd);
    }
    ap.layer = l;
    backend_->PagedAttention(ap, workspace_.data());
    // x += Wo · att
    backend_->Gemm({att_.data(), lw.wo.data(), nullptr, xb_.data(), T, D, qd, lw.wo.dtype});
    for (int64_t i = 0; i < T * D; ++i) x_[i] += xb_[i];
    // FFN: x += W2 · (silu(W1 · n) ⊙ (W3 · n))
    backend_->RmsNorm({x_.data(), nullptr, lw.ffn_norm.data(), xb_.data(), T, D, c.norm_eps});
    backend_->Gemm({xb_.data(), lw.w1.data(), nullptr, h1_.data(), T, F, D, lw.w1.dtype});
    backend_->Gemm({xb_.data(), lw.w3.data(), nullptr, h3_.data(), T, F, D, lw.w3.dtype});
    backend_->SiluMul({h1_.data(), h3_.data(), h1_.data(), T * F});
    backend_->Gemm({h1_.data(), lw.w2.data(), nullptr, xb_.data(), T, D, F, lw.w2.dtype});
    for (int64_t i = 0; i < T * D; ++i) x_[i] += xb_[i];
  }

  // Final norm and the classifier, only for the rows that sample.
  const int64_t R = static_cast<int64_t>(b.logits_rows.size());
  rows_.resize(R * D);
  for (int64_t r = 0; r < R; ++r) {
    std::copy_n(x_.data() + static_cast<int64_t>(b.logits_rows[r]) * D, D, rows_.data() + r * D);
  }
  xb_.resize(std::max(T, R) * D);
  backend_->RmsNorm({rows_.data(), nullptr, w.final_norm.data(), xb_.data(), R, D, c.norm_eps});
  logits->resize(R * c.vocab_size);
  backend_->Gemm({xb_.data(), w.classifier_data(), nullptr, logits->data(), R, c.vocab_size, D,
                  w.classifier_dtype()});
}

}  // namespace helix
