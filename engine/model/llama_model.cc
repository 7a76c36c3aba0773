#include "engine/model/llama_model.h"

#include "engine/model/moe_router.h"

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
      dims_(ComputeShardDims(model_->config, par_.layout)) {
  if (model_->config.mla()) model_->config.RopeTables(&inv_freq_, &rope_mscale_);
}

Status LlamaModel::CombineAttention(int64_t T, int64_t hd) {
  const int cp = par_.layout.cp;
  if (cp == 1) return Status::Ok();  // q_heads == out_heads: nothing to exchange
  const int64_t hq = dims_.q_heads, ho = dims_.out_heads;
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

namespace {

// Pointer to element `offset` of a matrix of dtype t.
const void* At(const WeightMatrix& m, int64_t offset) {
  return static_cast<const char*>(m.data()) +
         offset * static_cast<int64_t>(kernels::DTypeSize(m.dtype));
}

// dst[t][0..n) = src[t * stride + 0..n) for t < rows.
void Gather(const float* src, int64_t stride, int64_t rows, int64_t n, float* dst) {
  for (int64_t t = 0; t < rows; ++t) std::copy_n(src + t * stride, n, dst + t * n);
}
void Scatter(const float* src, int64_t rows, int64_t n, float* dst, int64_t stride) {
  for (int64_t t = 0; t < rows; ++t) std::copy_n(src + t * n, n, dst + t * stride);
}

}  // namespace

// DeepSeek's q_a_layernorm and kv_a_layernorm are built with their RMSNorm's default eps,
// not config.rms_norm_eps.
constexpr float kLatentEps = 1e-6f;

Status LlamaModel::MlaAttention(const ForwardBatch& b, int64_t l) {
  const ModelConfig& c = model_->config;
  const LayerWeights& lw = model_->weights.layers[l];
  ForwardTimings& tm = timings_;
  Stopwatch sw;
  const int64_t T = b.num_tokens(), D = c.dim, Hq = dims_.q_heads, Ho = dims_.out_heads;
  const int64_t nope = c.qk_nope_head_dim, R = c.qk_rope_head_dim, L = c.kv_lora_rank;
  const int64_t V = c.v_head_dim, qh = nope + R, LR = L + R, QL = c.q_lora_rank;
  // Queries: x -> (q_a -> RMSNorm ->) q_b, this TP shard's heads, each [nope | rope].
  const float* qin = xb_.data();
  int64_t qk = D;
  if (QL > 0) {
    cq_.resize(T * QL);
    backend_->Gemm({xb_.data(), lw.wq_a.data(), nullptr, cq_.data(), T, QL, D, lw.wq_a.dtype});
    backend_->RmsNorm({cq_.data(), nullptr, lw.q_a_norm.data(), cq_.data(), T, QL, kLatentEps});
    qin = cq_.data();
    qk = QL;
  }
  q_.resize(T * Hq * qh);
  backend_->Gemm({qin, lw.wq.data(), nullptr, q_.data(), T, Hq * qh, qk, lw.wq.dtype});
  // The latent: x -> [c_kv | k_pe]; c_kv through its RMSNorm.
  kva_.resize(T * LR);
  backend_->Gemm({xb_.data(), lw.wkv_a.data(), nullptr, kva_.data(), T, LR, D, lw.wkv_a.dtype});
  sw.Lap(&tm.gemm);
  ckv_.resize(T * L);
  Gather(kva_.data(), LR, T, L, ckv_.data());
  backend_->RmsNorm({ckv_.data(), nullptr, lw.kv_a_norm.data(), ckv_.data(), T, L, kLatentEps});
  Scatter(ckv_.data(), T, L, kva_.data(), LR);
  // RoPE (yarn tables) on q_pe of every head and on k_pe, at global positions.
  kernels::RopeParams rq{q_.data() + nope, b.positions.data(), T, Hq, qh, R,
                         c.rope_theta,     c.rope_style};
  rq.inv_freq = inv_freq_.data();
  rq.mscale = static_cast<float>(rope_mscale_);
  backend_->Rope(rq);
  kernels::RopeParams rk = rq;
  rk.x = kva_.data() + L;
  rk.heads = 1;
  rk.head_dim = LR;
  backend_->Rope(rk);
  for (int64_t t = 0; t < T; ++t) {
    if (b.kv_block[t] < 0) continue;  // another CP rank owns this position
    backend_->WriteKv(kv_, b.kv_block[t], l, b.kv_slot[t], kva_.data() + t * LR, nullptr);
  }
  sw.Lap(&tm.other);
  // Absorption: per head q_lat = W_UK^T q_nope; the query is [q_lat | q_pe].
  qfull_.resize(T * Hq * LR);
  tmp_a_.resize(T * std::max(nope, L));
  tmp_b_.resize(T * std::max(L, V));
  for (int64_t h = 0; h < Hq; ++h) {
    Gather(q_.data() + h * qh, Hq * qh, T, nope, tmp_a_.data());
    backend_->Gemm({tmp_a_.data(), At(lw.wuk_t, h * L * nope), nullptr, tmp_b_.data(), T, L, nope,
                    lw.wuk_t.dtype});
    Scatter(tmp_b_.data(), T, L, qfull_.data() + h * LR, Hq * LR);
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(q_.data() + (t * Hq + h) * qh + nope, R, qfull_.data() + (t * Hq + h) * LR + L);
    }
  }
  sw.Lap(&tm.gemm);
  kernels::MlaAttentionParams mp{};
  mp.q = qfull_.data();
  mp.q_seq = b.token_seq.data();
  mp.q_pos = b.positions.data();
  mp.kv = kv_;
  mp.layer = l;
  mp.block_tables = b.block_tables.data();
  mp.block_first_pos = b.block_first_pos.data();
  mp.kv_lens = b.kv_lens.data();
  mp.max_blocks_per_seq = b.max_blocks;
  mp.num_seqs = b.num_seqs;
  mp.num_q_tokens = T;
  mp.num_heads = Hq;
  mp.latent_dim = L;
  mp.rope_dim = R;
  mp.scale = static_cast<float>(c.SoftmaxScale());
  att_.resize(T * Hq * L);
  lse_.resize(T * Hq);
  mp.out = att_.data();
  mp.lse = lse_.data();
  // Long sequences are cut into ~1K-token chunks so that one sequence uses every thread.
  mp.kv_split_tokens = kv_.tokens_per_block * std::max<int64_t>(1, 1024 / kv_.tokens_per_block);
  const size_t ws = backend_->MlaAttentionWorkspaceBytes(mp);
  if (workspace_.size() < ws) workspace_.resize(ws);
  backend_->MlaAttention(mp, workspace_.data());
  sw.Lap(&tm.attention);
  if (par_.barrier_before_collectives && par_.cp != nullptr && par_.layout.cp > 1) {
    RETURN_IF_ERROR(par_.cp->Barrier());
    sw.Lap(&tm.wait);
  }
  // The Helix combine in the latent space: att_ [T][Ho][L].
  RETURN_IF_ERROR(CombineAttention(T, L));
  sw.Lap(&tm.combine);
  // Per combined head o = W_UV · o_lat, then this rank's row-parallel slice of o_proj.
  ov_.resize(T * Ho * V);
  for (int64_t h = 0; h < Ho; ++h) {
    Gather(att_.data() + h * L, Ho * L, T, L, tmp_a_.data());
    backend_->Gemm(
        {tmp_a_.data(), At(lw.wuv, h * V * L), nullptr, tmp_b_.data(), T, V, L, lw.wuv.dtype});
    Scatter(tmp_b_.data(), T, V, ov_.data() + h * V, Ho * V);
  }
  backend_->Gemm({ov_.data(), lw.wo.data(), nullptr, xb_.data(), T, D, Ho * V, lw.wo.dtype});
  sw.Lap(&tm.gemm);
  return Status::Ok();
}

void LlamaModel::MoeFfn(int64_t l, int64_t T) {
  const ModelConfig& c = model_->config;
  const LayerWeights& lw = model_->weights.layers[l];
  const int64_t D = c.dim, E = c.n_routed_experts, K = c.experts_per_token, M = c.moe_hidden_dim;
  // The gate in fp32 on every rank (the same normed hidden state everywhere).
  gate_logits_.resize(T * E);
  backend_->Gemm({xb_.data(), lw.gate.data(), nullptr, gate_logits_.data(), T, E, D});
  RouteTokens(c, gate_logits_.data(), lw.gate_bias.empty() ? nullptr : lw.gate_bias.data(), T,
              &route_e_, &route_w_);
  moe_out_.assign(T * D, 0.0f);
  // Bucket the (token, choice) pairs by local expert in one pass (a counting sort, tokens in
  // order within each expert): expert i's pairs are [expert_start_[i], expert_start_[i + 1]).
  const int64_t E_local = static_cast<int64_t>(lw.experts.size());
  expert_start_.assign(E_local + 1, 0);
  for (int32_t e : route_e_) {
    const int64_t i = e - lw.expert_begin;
    if (i >= 0 && i < E_local) ++expert_start_[i + 1];
  }
  for (int64_t i = 0; i < E_local; ++i) expert_start_[i + 1] += expert_start_[i];
  expert_rows_.resize(expert_start_[E_local]);
  expert_w_.resize(expert_start_[E_local]);
  expert_fill_.assign(expert_start_.begin(), expert_start_.end() - 1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = route_e_[t * K + k] - lw.expert_begin;
      if (i < 0 || i >= E_local) continue;  // another rank's expert
      expert_rows_[expert_fill_[i]] = static_cast<int32_t>(t);
      expert_w_[expert_fill_[i]++] = route_w_[t * K + k];
    }
  }
  for (int64_t i = 0; i < E_local; ++i) {
    const int32_t* rows = expert_rows_.data() + expert_start_[i];
    const float* row_w = expert_w_.data() + expert_start_[i];
    const int64_t n = expert_start_[i + 1] - expert_start_[i];
    if (n == 0) continue;
    const LayerWeights::Expert& ex = lw.experts[i];
    xe_.resize(n * D);
    for (int64_t j = 0; j < n; ++j) std::copy_n(xb_.data() + rows[j] * D, D, xe_.data() + j * D);
    he1_.resize(n * M);
    he3_.resize(n * M);
    ye_.resize(n * D);
    backend_->Gemm({xe_.data(), ex.w1.data(), nullptr, he1_.data(), n, M, D, ex.w1.dtype});
    backend_->Gemm({xe_.data(), ex.w3.data(), nullptr, he3_.data(), n, M, D, ex.w3.dtype});
    backend_->SiluMul({he1_.data(), he3_.data(), he1_.data(), n * M});
    backend_->Gemm({he1_.data(), ex.w2.data(), nullptr, ye_.data(), n, D, M, ex.w2.dtype});
    for (int64_t j = 0; j < n; ++j) {
      float* out = moe_out_.data() + rows[j] * D;
      const float* y = ye_.data() + j * D;
      for (int64_t d = 0; d < D; ++d) out[d] += row_w[j] * y[d];
    }
  }
  const int64_t S = dims_.shared_end - dims_.shared_begin;
  if (S > 0) {
    h1_.resize(T * S);
    h3_.resize(T * S);
    ye_.resize(T * D);
    backend_->Gemm({xb_.data(), lw.w1.data(), nullptr, h1_.data(), T, S, D, lw.w1.dtype});
    backend_->Gemm({xb_.data(), lw.w3.data(), nullptr, h3_.data(), T, S, D, lw.w3.dtype});
    backend_->SiluMul({h1_.data(), h3_.data(), h1_.data(), T * S});
    backend_->Gemm({h1_.data(), lw.w2.data(), nullptr, ye_.data(), T, D, S, lw.w2.dtype});
    for (int64_t i = 0; i < T * D; ++i) moe_out_[i] += ye_[i];
  }
  xb_.swap(moe_out_);
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
  if (!c.mla()) {
    q_.resize(T * qd);
    k_.resize(T * kvd);
    v_.resize(T * kvd);
    att_.resize(T * qd);
  }

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
    if (c.mla()) {
      RETURN_IF_ERROR(MlaAttention(b, l));
      sw = Stopwatch();
    } else {
      backend_->Gemm({xb_.data(), lw.wq.data(), lw.bq.empty() ? nullptr : lw.bq.data(), q_.data(),
                      T, qd, D, lw.wq.dtype});
      backend_->Gemm({xb_.data(), lw.wk.data(), lw.bk.empty() ? nullptr : lw.bk.data(), k_.data(),
                      T, kvd, D, lw.wk.dtype});
      backend_->Gemm({xb_.data(), lw.wv.data(), lw.bv.empty() ? nullptr : lw.bv.data(), v_.data(),
                      T, kvd, D, lw.wv.dtype});
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
      RETURN_IF_ERROR(CombineAttention(T, hd));
      sw.Lap(&tm.combine);
      // x += Wo · att: row-parallel over the N ranks (each holds Wo's columns for its heads).
      backend_->Gemm({att_.data(), lw.wo.data(), nullptr, xb_.data(), T, D, od, lw.wo.dtype});
      sw.Lap(&tm.gemm);
    }
    RETURN_IF_ERROR(AddRowParallel());
    // FFN: x += W2 · (silu(W1 · n) ⊙ (W3 · n)), column- then row-parallel over the N ranks;
    // an MoE layer adds its experts' and shared experts' partials instead.
    backend_->RmsNorm({x_.data(), nullptr, lw.ffn_norm.data(), xb_.data(), T, D, c.norm_eps});
    sw.Lap(&tm.other);
    if (c.IsMoeLayer(l)) {
      MoeFfn(l, T);
    } else {
      h1_.resize(T * F);
      h3_.resize(T * F);
      backend_->Gemm({xb_.data(), lw.w1.data(), nullptr, h1_.data(), T, F, D, lw.w1.dtype});
      backend_->Gemm({xb_.data(), lw.w3.data(), nullptr, h3_.data(), T, F, D, lw.w3.dtype});
      backend_->SiluMul({h1_.data(), h3_.data(), h1_.data(), T * F});
      backend_->Gemm({h1_.data(), lw.w2.data(), nullptr, xb_.data(), T, D, F, lw.w2.dtype});
    }
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
