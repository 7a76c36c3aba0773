#include "engine/model/llama_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>

namespace helix {
namespace {

// Adds the time since the last Lap (or construction) to *bucket.
class Stopwatch {
 public:
  void Lap(double* bucket) {
    const auto now = std::chrono::steady_clock::now();
    *bucket += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

}  // namespace

LlamaModel::LlamaModel(std::unique_ptr<LoadedModel> model, Backend* backend, kernels::KvPoolView kv,
                       ParallelContext parallel)
    : model_(std::move(model)),
      backend_(backend),
      kv_(kv),
      par_(parallel),
      dims_(ComputeShardDims(model_->config, par_.layout)) {}

Status LlamaModel::CombineAttention(int64_t T) {
  const int cp = par_.layout.cp;
  if (cp == 1) return Status::Ok();  // q_heads == out_heads: nothing to exchange
  const int64_t hd = model_->config.head_dim, hq = dims_.q_heads, ho = dims_.out_heads;
  // Chunk for peer c: [T][ho][hd + 1] (the LSE rides after each head's output).
  const int64_t chunk = T * ho * (hd + 1);
  send_.resize(cp * chunk);
  recv_.resize(cp * chunk);
  for (int c = 0; c < cp; ++c) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < ho; ++h) {
        const int64_t src = t * hq + c * ho + h;
        float* dst = send_.data() + c * chunk + (t * ho + h) * (hd + 1);
        std::copy_n(att_.data() + src * hd, hd, dst);
        dst[hd] = lse_[src];
      }
    }
  }
  RETURN_IF_ERROR(par_.cp->AllToAll(send_.data(), recv_.data(), chunk * sizeof(float)));
  const int64_t rows = T * ho;
  parts_o_.resize(cp * rows * hd);
  parts_lse_.resize(cp * rows);
  for (int i = 0; i < cp; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = recv_.data() + i * chunk + r * (hd + 1);
      std::copy_n(src, hd, parts_o_.data() + (i * rows + r) * hd);
      parts_lse_[i * rows + r] = src[hd];
    }
  }
  backend_->MergeStates({parts_o_.data(), parts_lse_.data(), att_.data(), nullptr, cp, rows, hd});
  return Status::Ok();
}

Status LlamaModel::Forward(const ForwardBatch& b, std::vector<float>* logits) {
  const ModelConfig& c = model_->config;
  const ModelWeights& w = model_->weights;
  const int64_t T = b.num_tokens(), D = c.dim, hd = c.head_dim;
  const int64_t F = dims_.ffn_end - dims_.ffn_begin;
  const int64_t qd = dims_.q_heads * hd, kvd = dims_.kv_heads * hd, od = dims_.out_heads * hd;
  parallel::Communicator* world = par_.layout.single() ? nullptr : par_.world;
  x_.resize(T * D);
  xb_.resize(T * D);
  q_.resize(T * qd);
  k_.resize(T * kvd);
  v_.resize(T * kvd);
  att_.resize(T * qd);
  h1_.resize(T * F);
  h3_.resize(T * F);

  ForwardTimings& tm = timings_;
  ++tm.calls;
  Stopwatch sw;
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
  ap.num_q_heads = dims_.q_heads;
  ap.num_kv_heads = dims_.kv_heads;
  ap.head_dim = hd;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ap.out = att_.data();
  lse_.resize(T * dims_.q_heads);
  ap.lse = lse_.data();
  ap.kv_split_tokens = 0;
  const size_t ws = backend_->PagedAttentionWorkspaceBytes(ap);
  if (workspace_.size() < ws) workspace_.resize(ws);

  // x += the sum over ranks of each rank's row-parallel partial in xb_.
  const auto AddRowParallel = [&]() -> Status {
    if (world != nullptr && par_.barrier_before_collectives) {
      RETURN_IF_ERROR(world->Barrier());
      sw.Lap(&tm.wait);
    }
    if (world != nullptr) RETURN_IF_ERROR(world->AllReduceSum(xb_.data(), T * D));
    sw.Lap(&tm.all_reduce);
    for (int64_t i = 0; i < T * D; ++i) x_[i] += xb_[i];
    return Status::Ok();
  };
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    backend_->RmsNorm({x_.data(), nullptr, lw.attn_norm.data(), xb_.data(), T, D, c.norm_eps});
    sw.Lap(&tm.other);
    backend_->Gemm({xb_.data(), lw.wq.data(), lw.bq.empty() ? nullptr : lw.bq.data(), q_.data(), T,
                    qd, D, lw.wq.dtype});
    backend_->Gemm({xb_.data(), lw.wk.data(), lw.bk.empty() ? nullptr : lw.bk.data(), k_.data(), T,
                    kvd, D, lw.wk.dtype});
    backend_->Gemm({xb_.data(), lw.wv.data(), lw.bv.empty() ? nullptr : lw.bv.data(), v_.data(), T,
                    kvd, D, lw.wv.dtype});
    sw.Lap(&tm.gemm);
    // RoPE at global positions; only the owner of a position writes its K/V.
    backend_->Rope(
        {q_.data(), b.positions.data(), T, dims_.q_heads, hd, hd, c.rope_theta, c.rope_style});
    backend_->Rope(
        {k_.data(), b.positions.data(), T, dims_.kv_heads, hd, hd, c.rope_theta, c.rope_style});
    for (int64_t t = 0; t < T; ++t) {
      if (b.kv_block[t] < 0) continue;  // another CP rank owns this position
      backend_->WriteKv(kv_, b.kv_block[t], l, b.kv_slot[t], k_.data() + t * kvd,
                        v_.data() + t * kvd);
    }
    ap.layer = l;
    sw.Lap(&tm.other);
    backend_->PagedAttention(ap, workspace_.data());
    sw.Lap(&tm.attention);
    if (par_.barrier_before_collectives && par_.cp != nullptr && par_.layout.cp > 1) {
      RETURN_IF_ERROR(par_.cp->Barrier());
      sw.Lap(&tm.wait);
    }
    RETURN_IF_ERROR(CombineAttention(T));
    sw.Lap(&tm.combine);
    // x += Wo · att: row-parallel over the N ranks (each holds Wo's columns for its heads).
    backend_->Gemm({att_.data(), lw.wo.data(), nullptr, xb_.data(), T, D, od, lw.wo.dtype});
    sw.Lap(&tm.gemm);
    RETURN_IF_ERROR(AddRowParallel());
    // FFN: x += W2 · (silu(W1 · n) ⊙ (W3 · n)), column- then row-parallel over the N ranks.
    backend_->RmsNorm({x_.data(), nullptr, lw.ffn_norm.data(), xb_.data(), T, D, c.norm_eps});
    sw.Lap(&tm.other);
    backend_->Gemm({xb_.data(), lw.w1.data(), nullptr, h1_.data(), T, F, D, lw.w1.dtype});
    backend_->Gemm({xb_.data(), lw.w3.data(), nullptr, h3_.data(), T, F, D, lw.w3.dtype});
    backend_->SiluMul({h1_.data(), h3_.data(), h1_.data(), T * F});
    backend_->Gemm({h1_.data(), lw.w2.data(), nullptr, xb_.data(), T, D, F, lw.w2.dtype});
    sw.Lap(&tm.gemm);
    RETURN_IF_ERROR(AddRowParallel());
  }
  sw.Lap(&tm.other);

  // Final norm and the classifier, only for the rows that sample; vocab-parallel, gathered.
  const int64_t R = static_cast<int64_t>(b.logits_rows.size());
  const int64_t V = c.vocab_size, Vl = dims_.vocab_end - dims_.vocab_begin;
  rows_.resize(R * D);
  for (int64_t r = 0; r < R; ++r) {
    std::copy_n(x_.data() + static_cast<int64_t>(b.logits_rows[r]) * D, D, rows_.data() + r * D);
  }
  xb_.resize(std::max(T, R) * D);
  backend_->RmsNorm({rows_.data(), nullptr, w.final_norm.data(), xb_.data(), R, D, c.norm_eps});
  if (world == nullptr) {
    logits->resize(R * V);
    backend_->Gemm(
        {xb_.data(), w.classifier_data(), nullptr, logits->data(), R, V, D, w.classifier_dtype()});
    return Status::Ok();
  }
  // Every rank's slice padded to the largest, so the all-gather moves equal chunks.
  const int n = par_.layout.world();
  const int64_t vmax = parallel::SplitRange(V, n, 0).second;
  local_logits_.assign(R * vmax, 0.0f);
  if (R > 0) {
    rows_.resize(R * Vl);
    backend_->Gemm(
        {xb_.data(), w.classifier_data(), nullptr, rows_.data(), R, Vl, D, w.classifier_dtype()});
    for (int64_t r = 0; r < R; ++r) {
      std::copy_n(rows_.data() + r * Vl, Vl, local_logits_.data() + r * vmax);
    }
  }
  gathered_.resize(n * R * vmax);
  RETURN_IF_ERROR(
      world->AllGather(local_logits_.data(), gathered_.data(), R * vmax * sizeof(float)));
  logits->resize(R * V);
  for (int i = 0; i < n; ++i) {
    const auto [v0, v1] = parallel::SplitRange(V, n, i);
    for (int64_t r = 0; r < R; ++r) {
      std::copy_n(gathered_.data() + (i * R + r) * vmax, v1 - v0, logits->data() + r * V + v0);
    }
  }
  sw.Lap(&tm.logits);
  return Status::Ok();
}

}  // namespace helix
