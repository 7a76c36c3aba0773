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
      dims_(ComputeShardDims(model_->config, par_.layout)),
      host_(backend->host_memory()) {
  if (model_->config.mla()) model_->config.RopeTables(&inv_freq_, &rope_mscale_);
  for (auto* a : {&x_, &xb_, &q_, &k_, &v_, &att_, &lse_, &h1_, &h3_, &rows_, &parts_o_,
                  &parts_lse_, &logits_dev_, &send_, &recv_}) {
    a->Bind(backend);
  }
  workspace_.Bind(backend);
  meta_.Bind(backend);
  meta_host_.Bind(backend);
  stage_a_.Bind(backend);
  stage_b_.Bind(backend);
}

LlamaModel::~LlamaModel() {
  for (auto& [host, dev] : device_) backend_->Free(dev);
}

StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(std::unique_ptr<LoadedModel> model,
                                                         Backend* backend, kernels::KvPoolView kv,
                                                         ParallelContext parallel) {
  if (!backend->host_memory() && model->config.mla()) {
    return Unimplemented(std::string("MLA models (") + model->config.architecture +
                         ") run on the CPU backend only; the " + backend->name() +
                         " backend runs Llama-family (GQA) models");
  }
  std::unique_ptr<LlamaModel> m(new LlamaModel(std::move(model), backend, kv, parallel));
  RETURN_IF_ERROR(m->UploadWeights());
  return m;
}

Status LlamaModel::UploadWeights() {
  if (host_) return Status::Ok();
  RETURN_IF_ERROR(backend_->Activate());
  const ModelWeights& w = model_->weights;
  const auto upload = [&](const void* data, size_t bytes) -> Status {
    if (data == nullptr || bytes == 0 || device_.count(data) != 0) return Status::Ok();
    void* dev = backend_->Alloc(bytes);
    if (dev == nullptr) {
      return ResourceExhausted(std::string(backend_->name()) + " backend: out of memory for the " +
                               "weights (" + std::to_string(bytes) + " more bytes)");
    }
    device_[data] = dev;
    backend_->CopyToDevice(dev, data, bytes);
    // Bounded staging: the copy reads the host tensor in place, so wait before the next one
    // may be freed or changed (they are not, but a sync per tensor keeps the rule simple).
    return backend_->Sync();
  };
  const auto vec = [&](const std::vector<float>& v) {
    return upload(v.data(), v.size() * sizeof(float));
  };
  const auto mat = [&](const WeightMatrix& m) {
    return upload(m.data(), m.empty() ? 0 : m.size_bytes());
  };
  RETURN_IF_ERROR(vec(w.token_embedding));
  RETURN_IF_ERROR(vec(w.final_norm));
  RETURN_IF_ERROR(mat(w.classifier));
  for (const LayerWeights& lw : w.layers) {
    for (const std::vector<float>* v : {&lw.attn_norm, &lw.bq, &lw.bk, &lw.bv, &lw.ffn_norm}) {
      RETURN_IF_ERROR(vec(*v));
    }
    for (const WeightMatrix* m : {&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.w1, &lw.w2, &lw.w3}) {
      RETURN_IF_ERROR(mat(*m));
    }
  }
  return Status::Ok();
}

const void* LlamaModel::Dev(const void* host) const {
  if (host_ || host == nullptr) return host;
  auto it = device_.find(host);
  return it == device_.end() ? nullptr : it->second;
}

StatusOr<LlamaModel::BatchMeta> LlamaModel::UploadBatch(const ForwardBatch& b) {
  const std::vector<int32_t>* parts[] = {&b.tokens,          &b.positions, &b.token_seq,
                                         &b.kv_block,        &b.kv_slot,   &b.block_tables,
                                         &b.block_first_pos, &b.kv_lens,   &b.logits_rows};
  const int32_t* ptr[9];
  if (host_) {
    for (int i = 0; i < 9; ++i) ptr[i] = parts[i]->data();
  } else {
    int64_t total = 0;
    for (const auto* v : parts) total += static_cast<int64_t>(v->size());
    // The staging area is rewritten below: the previous step's copy out of it must be done.
    RETURN_IF_ERROR(backend_->Sync());
    RETURN_IF_ERROR(meta_host_.Resize(std::max<int64_t>(total, 1)));
    RETURN_IF_ERROR(meta_.Resize(std::max<int64_t>(total, 1)));
    int64_t off = 0;
    for (int i = 0; i < 9; ++i) {
      std::copy(parts[i]->begin(), parts[i]->end(), meta_host_.data() + off);
      ptr[i] = meta_.data() + off;
      off += static_cast<int64_t>(parts[i]->size());
    }
    backend_->CopyToDevice(meta_.data(), meta_host_.data(), total * sizeof(int32_t));
  }
  return BatchMeta{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], ptr[7], ptr[8]};
}

Status LlamaModel::AllReduceSum(float* p, int64_t n) {
  if (host_ || par_.world->device_memory()) return par_.world->AllReduceSum(p, n);
  RETURN_IF_ERROR(stage_a_.Resize(n));
  RETURN_IF_ERROR(backend_->CopyToHost(stage_a_.data(), p, n * sizeof(float)));
  RETURN_IF_ERROR(par_.world->AllReduceSum(stage_a_.data(), n));
  backend_->CopyToDevice(p, stage_a_.data(), n * sizeof(float));
  return Status::Ok();
}

Status LlamaModel::CombineAttention(int64_t T, int64_t hd) {
  const int cp = par_.layout.cp;
  if (cp == 1) return Status::Ok();  // q_heads == out_heads: nothing to exchange
  const int64_t ho = dims_.out_heads, rows = T * ho;
  // Chunk for peer c: [T][ho][hd + 1] (the LSE rides after each head's output).
  const int64_t chunk = T * ho * (hd + 1);
  RETURN_IF_ERROR(send_.Resize(cp * chunk));
  RETURN_IF_ERROR(recv_.Resize(cp * chunk));
  backend_->PackCombine(att_.data(), lse_.data(), T, cp, ho, hd, send_.data());
  if (host_ || par_.cp->device_memory()) {
    RETURN_IF_ERROR(par_.cp->AllToAll(send_.data(), recv_.data(), chunk * sizeof(float)));
  } else {
    // Gloo between ranks of a device backend: through host memory.
    RETURN_IF_ERROR(stage_a_.Resize(cp * chunk));
    RETURN_IF_ERROR(stage_b_.Resize(cp * chunk));
    RETURN_IF_ERROR(
        backend_->CopyToHost(stage_a_.data(), send_.data(), cp * chunk * sizeof(float)));
    RETURN_IF_ERROR(par_.cp->AllToAll(stage_a_.data(), stage_b_.data(), chunk * sizeof(float)));
    backend_->CopyToDevice(recv_.data(), stage_b_.data(), cp * chunk * sizeof(float));
  }
  RETURN_IF_ERROR(parts_o_.Resize(cp * rows * hd));
  RETURN_IF_ERROR(parts_lse_.Resize(cp * rows));
  backend_->UnpackCombine(recv_.data(), cp, rows, hd, parts_o_.data(), parts_lse_.data());
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
  if (workspace_.size() < static_cast<int64_t>(ws)) workspace_.resize(ws);
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
  std::copy(moe_out_.begin(), moe_out_.end(), xb_.data());
}

Status LlamaModel::Forward(const ForwardBatch& b, std::vector<float>* logits) {
  const ModelConfig& c = model_->config;
  const ModelWeights& w = model_->weights;
  const int64_t T = b.num_tokens(), D = c.dim, hd = c.head_dim;
  const int64_t F = dims_.ffn_end - dims_.ffn_begin;
  const int64_t qd = dims_.q_heads * hd, kvd = dims_.kv_heads * hd, od = dims_.out_heads * hd;
  parallel::Communicator* world = par_.layout.single() ? nullptr : par_.world;
  RETURN_IF_ERROR(backend_->Activate());
  ASSIGN_OR_RETURN(const BatchMeta m, UploadBatch(b));
  RETURN_IF_ERROR(x_.Resize(T * D));
  RETURN_IF_ERROR(xb_.Resize(T * D));
  if (!c.mla()) {
    RETURN_IF_ERROR(q_.Resize(T * qd));
    RETURN_IF_ERROR(k_.Resize(T * kvd));
    RETURN_IF_ERROR(v_.Resize(T * kvd));
    RETURN_IF_ERROR(att_.Resize(T * qd));
  }

  ForwardTimings& tm = timings_;
  ++tm.calls;
  Stopwatch sw;
  backend_->Embedding(Dev(w.token_embedding), c.vocab_size, m.tokens, T, D, x_.data());

  kernels::PagedAttentionParams ap{};
  ap.q = q_.data();
  ap.q_seq = m.token_seq;
  ap.q_pos = m.positions;
  ap.kv = kv_;
  ap.block_tables = m.block_tables;
  ap.block_first_pos = m.block_first_pos;
  ap.kv_lens = m.kv_lens;
  ap.max_blocks_per_seq = b.max_blocks;
  ap.num_seqs = b.num_seqs;
  ap.num_q_tokens = T;
  ap.num_q_heads = dims_.q_heads;
  ap.num_kv_heads = dims_.kv_heads;
  ap.head_dim = hd;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ap.out = att_.data();
  RETURN_IF_ERROR(lse_.Resize(T * dims_.q_heads));
  ap.lse = lse_.data();
  ap.kv_split_tokens = 0;  // the backend picks its split
  const size_t ws = backend_->PagedAttentionWorkspaceBytes(ap);
  if (workspace_.size() < static_cast<int64_t>(ws)) RETURN_IF_ERROR(workspace_.Resize(ws));

  // x += the sum over ranks of each rank's row-parallel partial in xb_.
  const auto AddRowParallel = [&]() -> Status {
    if (world != nullptr && par_.barrier_before_collectives) {
      RETURN_IF_ERROR(world->Barrier());
      sw.Lap(&tm.wait);
    }
    if (world != nullptr) RETURN_IF_ERROR(AllReduceSum(xb_.data(), T * D));
    sw.Lap(&tm.all_reduce);
    backend_->Add(x_.data(), xb_.data(), T * D);
    return Status::Ok();
  };
  const auto F32 = [&](const std::vector<float>& v) { return Dev(v); };
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    backend_->RmsNorm({x_.data(), nullptr, F32(lw.attn_norm), xb_.data(), T, D, c.norm_eps});
    sw.Lap(&tm.other);
    if (c.mla()) {
      RETURN_IF_ERROR(MlaAttention(b, l));
      sw = Stopwatch();
    } else {
      backend_->Gemm({xb_.data(), Dev(lw.wq), F32(lw.bq), q_.data(), T, qd, D, lw.wq.dtype});
      backend_->Gemm({xb_.data(), Dev(lw.wk), F32(lw.bk), k_.data(), T, kvd, D, lw.wk.dtype});
      backend_->Gemm({xb_.data(), Dev(lw.wv), F32(lw.bv), v_.data(), T, kvd, D, lw.wv.dtype});
      sw.Lap(&tm.gemm);
      // RoPE at global positions; only the owner of a position writes its K/V.
      backend_->Rope(
          {q_.data(), m.positions, T, dims_.q_heads, hd, hd, c.rope_theta, c.rope_style});
      backend_->Rope(
          {k_.data(), m.positions, T, dims_.kv_heads, hd, hd, c.rope_theta, c.rope_style});
      backend_->WriteKvBatch(kv_, l, k_.data(), v_.data(), m.kv_block, m.kv_slot, T);
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
      backend_->Gemm({att_.data(), Dev(lw.wo), nullptr, xb_.data(), T, D, od, lw.wo.dtype});
      sw.Lap(&tm.gemm);
    }
    RETURN_IF_ERROR(AddRowParallel());
    // FFN: x += W2 · (silu(W1 · n) ⊙ (W3 · n)), column- then row-parallel over the N ranks;
    // an MoE layer adds its experts' and shared experts' partials instead.
    backend_->RmsNorm({x_.data(), nullptr, F32(lw.ffn_norm), xb_.data(), T, D, c.norm_eps});
    sw.Lap(&tm.other);
    if (c.IsMoeLayer(l)) {
      MoeFfn(l, T);
    } else {
      RETURN_IF_ERROR(h1_.Resize(T * F));
      RETURN_IF_ERROR(h3_.Resize(T * F));
      backend_->Gemm({xb_.data(), Dev(lw.w1), nullptr, h1_.data(), T, F, D, lw.w1.dtype});
      backend_->Gemm({xb_.data(), Dev(lw.w3), nullptr, h3_.data(), T, F, D, lw.w3.dtype});
      backend_->SiluMul({h1_.data(), h3_.data(), h1_.data(), T * F});
      backend_->Gemm({h1_.data(), Dev(lw.w2), nullptr, xb_.data(), T, D, F, lw.w2.dtype});
    }
    sw.Lap(&tm.gemm);
    RETURN_IF_ERROR(AddRowParallel());
  }
  sw.Lap(&tm.other);

  // Final norm and the classifier, only for the rows that sample; vocab-parallel, gathered.
  const int64_t R = static_cast<int64_t>(b.logits_rows.size());
  const int64_t V = c.vocab_size, Vl = dims_.vocab_end - dims_.vocab_begin;
  RETURN_IF_ERROR(rows_.Resize(R * D));
  backend_->GatherRows(x_.data(), D, m.logits_rows, R, D, rows_.data());
  RETURN_IF_ERROR(xb_.Resize(std::max(T, R) * D));
  backend_->RmsNorm({rows_.data(), nullptr, F32(w.final_norm), xb_.data(), R, D, c.norm_eps});
  const void* classifier = Dev(w.classifier_data());
  if (world == nullptr) {
    logits->resize(R * V);
    float* out = logits->data();
    if (!host_) {
      RETURN_IF_ERROR(logits_dev_.Resize(R * V));
      out = logits_dev_.data();
    }
    backend_->Gemm({xb_.data(), classifier, nullptr, out, R, V, D, w.classifier_dtype()});
    if (!host_) {
      RETURN_IF_ERROR(backend_->CopyToHost(logits->data(), out, R * V * sizeof(float)));
    }
    sw.Lap(&tm.logits);
    return backend_->Sync();
  }
  // Every rank's slice padded to the largest, so the all-gather moves equal chunks.
  const int n = par_.layout.world();
  const int64_t vmax = parallel::SplitRange(V, n, 0).second;
  const float* gathered = nullptr;
  if (!host_ && world->device_memory()) {
    // NCCL: pad and gather on the device, one copy of the gathered rows to the host.
    RETURN_IF_ERROR(logits_dev_.Resize(R * Vl));
    RETURN_IF_ERROR(send_.Resize(std::max<int64_t>(R * vmax, 1)));
    RETURN_IF_ERROR(recv_.Resize(std::max<int64_t>(n * R * vmax, 1)));
    if (R > 0) {
      backend_->Gemm(
          {xb_.data(), classifier, nullptr, logits_dev_.data(), R, Vl, D, w.classifier_dtype()});
      backend_->CopyDevice2D(send_.data(), vmax * sizeof(float), logits_dev_.data(),
                             Vl * sizeof(float), Vl * sizeof(float), R);
    }
    RETURN_IF_ERROR(world->AllGather(send_.data(), recv_.data(), R * vmax * sizeof(float)));
    gathered_.resize(n * R * vmax);
    RETURN_IF_ERROR(
        backend_->CopyToHost(gathered_.data(), recv_.data(), n * R * vmax * sizeof(float)));
    gathered = gathered_.data();
  } else {
    local_logits_.assign(R * vmax, 0.0f);
    if (R > 0) {
      RETURN_IF_ERROR(logits_dev_.Resize(R * Vl));
      backend_->Gemm(
          {xb_.data(), classifier, nullptr, logits_dev_.data(), R, Vl, D, w.classifier_dtype()});
      const float* lg = logits_dev_.data();
      if (!host_) {
        RETURN_IF_ERROR(stage_a_.Resize(R * Vl));
        RETURN_IF_ERROR(backend_->CopyToHost(stage_a_.data(), lg, R * Vl * sizeof(float)));
        lg = stage_a_.data();
      }
      for (int64_t r = 0; r < R; ++r) {
        std::copy_n(lg + r * Vl, Vl, local_logits_.data() + r * vmax);
      }
    }
    RETURN_IF_ERROR(backend_->Sync());
    gathered_.resize(n * R * vmax);
    RETURN_IF_ERROR(
        world->AllGather(local_logits_.data(), gathered_.data(), R * vmax * sizeof(float)));
    gathered = gathered_.data();
  }
  logits->resize(R * V);
  for (int i = 0; i < n; ++i) {
    const auto [v0, v1] = parallel::SplitRange(V, n, i);
    for (int64_t r = 0; r < R; ++r) {
      std::copy_n(gathered + (i * R + r) * vmax, v1 - v0, logits->data() + r * V + v0);
    }
  }
  sw.Lap(&tm.logits);
  return Status::Ok();
}

}  // namespace helix
