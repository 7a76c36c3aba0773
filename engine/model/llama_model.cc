#include "engine/model/llama_model.h"

#include "engine/common/log.h"
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
  // 16-bit copies of GEMM inputs only on a device backend with some 16-bit weight matrix.
  bool any16 = model_->weights.classifier_dtype() != kernels::DType::kF32;
  for (const LayerWeights& lw : model_->weights.layers) {
    for (const WeightMatrix* m : {&lw.wq, &lw.wk, &lw.wv, &lw.w1, &lw.w2, &lw.w3}) {
      any16 = any16 || m->dtype != kernels::DType::kF32;
    }
  }
  lowp_inputs_ = !host_ && any16;
  if (model_->config.mla()) model_->config.RopeTables(&inv_freq_, &rope_mscale_);
  rope_kv_fused_ = backend->HasRopeWriteKv() && !model_->config.mla() &&
                   kv_.num_kv_heads == dims_.kv_heads && kv_.head_dim == model_->config.head_dim;
  packed_qkv_.assign(model_->weights.layers.size(), 0);  // UploadWeights packs (device backends)
  packed_ffn_.assign(model_->weights.layers.size(), 0);
  for (auto* a : {&x_,   &xb_,   &q_,       &k_,         &v_,           &att_,     &lse_,  &h1_,
                  &h3_,  &rows_, &parts_o_, &parts_lse_, &logits_dev_,  &send_,    &recv_, &cq_,
                  &kva_, &ckv_,  &qfull_,   &ov_,        &gate_logits_, &moe_out_, &xe_,   &ye_,
                  &he1_, &he3_,  &qkv_,     &h13_,       &full_logits_}) {
    a->Bind(backend, &scratch_moves_);
  }
  inv_freq_dev_.Bind(backend, &scratch_moves_);
  expert_dev_.Bind(backend, &scratch_moves_);
  expert_host_.Bind(backend, &scratch_moves_);
  workspace_.Bind(backend, &scratch_moves_);
  meta_.Bind(backend, &scratch_moves_);
  sample_dev_.Bind(backend, &scratch_moves_);
  sample_host_.Bind(backend, &scratch_moves_);
  meta_host_.Bind(backend, &scratch_moves_);
  // Sized by the block tables' width: they grow with the context (graph buckets).
  meta_.set_geometric();
  meta_host_.set_geometric();
  workspace_.set_geometric();
  stage_a_.Bind(backend, &scratch_moves_);
  stage_b_.Bind(backend, &scratch_moves_);
  xb_lowp_.Bind(backend, &scratch_moves_);
  h1_lowp_.Bind(backend, &scratch_moves_);
  norm_sums_.Bind(backend, &scratch_moves_);
}

kernels::DType LlamaModel::LowpIfRead(kernels::DType lowp, int64_t rows, int64_t k) const {
  return lowp_inputs_ && lowp != kernels::DType::kF32 && backend_->GemmReadsLowpX(rows, k, lowp)
             ? lowp
             : kernels::DType::kF32;
}

kernels::DType LlamaModel::AttnInputLowp(int64_t l, int64_t rows) const {
  const LayerWeights& lw = model_->weights.layers[l];
  const bool one_type =
      packed_qkv_[l] || (lw.wk.dtype == lw.wq.dtype && lw.wv.dtype == lw.wq.dtype);
  return !model_->config.mla() && one_type ? LowpIfRead(lw.wq.dtype, rows, model_->config.dim)
                                           : kernels::DType::kF32;
}

kernels::DType LlamaModel::FfnInputLowp(int64_t l, int64_t rows) const {
  const LayerWeights& lw = model_->weights.layers[l];
  const bool one_type = packed_ffn_[l] || lw.w3.dtype == lw.w1.dtype;
  return !model_->config.IsMoeLayer(l) && one_type
             ? LowpIfRead(lw.w1.dtype, rows, model_->config.dim)
             : kernels::DType::kF32;
}

kernels::DType LlamaModel::DownInputLowp(int64_t l, int64_t rows) const {
  return LowpIfRead(model_->weights.layers[l].w2.dtype, rows, dims_.ffn_end - dims_.ffn_begin);
}

kernels::DType LlamaModel::ClassifierInputLowp(int64_t rows) const {
  return LowpIfRead(model_->weights.classifier_dtype(), rows, model_->config.dim);
}

void LlamaModel::ClassifierGemm(float* out, int64_t rows, int64_t n) {
  const ModelWeights& w = model_->weights;
  kernels::GemmParams p{xb_.data(),         Dev(w.classifier_data()), nullptr, out, rows, n,
                        model_->config.dim, w.classifier_dtype()};
  if (ClassifierInputLowp(rows) != kernels::DType::kF32) p.x_lowp = xb_lowp_.data();
  backend_->Gemm(p);
}

LlamaModel::~LlamaModel() {
  for (void* dev : allocs_) backend_->Free(dev);
}

StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(std::unique_ptr<LoadedModel> model,
                                                         Backend* backend, kernels::KvPoolView kv,
                                                         ParallelContext parallel) {
  std::unique_ptr<LlamaModel> m(new LlamaModel(std::move(model), backend, kv, parallel));
  RETURN_IF_ERROR(m->UploadWeights());
  return m;
}

namespace {

// Calls fn(data, bytes) for every tensor the forward pass reads from backend memory.
template <typename F>
Status ForEachDeviceTensor(const ModelWeights& w, F&& fn) {
  const auto vec = [&](const std::vector<float>& v) {
    return fn(static_cast<const void*>(v.data()), v.size() * sizeof(float));
  };
  const auto mat = [&](const WeightMatrix& m) {
    return fn(m.data(), m.empty() ? size_t{0} : m.size_bytes());
  };
  RETURN_IF_ERROR(vec(w.token_embedding));
  RETURN_IF_ERROR(vec(w.final_norm));
  RETURN_IF_ERROR(mat(w.classifier));
  for (const LayerWeights& lw : w.layers) {
    for (const std::vector<float>* v : {&lw.attn_norm, &lw.bq, &lw.bk, &lw.bv, &lw.ffn_norm,
                                        &lw.q_a_norm, &lw.kv_a_norm, &lw.gate}) {
      RETURN_IF_ERROR(vec(*v));
    }
    for (const WeightMatrix* m : {&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.w1, &lw.w2, &lw.w3, &lw.wq_a,
                                  &lw.wkv_a, &lw.wuk_t, &lw.wuv}) {
      RETURN_IF_ERROR(mat(*m));
    }
    for (const LayerWeights::Expert& ex : lw.experts) {
      for (const WeightMatrix* m : {&ex.w1, &ex.w2, &ex.w3}) RETURN_IF_ERROR(mat(*m));
    }
  }
  return Status::Ok();
}

}  // namespace

int64_t LlamaModel::DeviceWeightBytes(const ModelWeights& w) {
  int64_t total = 0;
  (void)ForEachDeviceTensor(w, [&](const void* data, size_t bytes) {
    if (data != nullptr) total += static_cast<int64_t>(bytes);
    return Status::Ok();
  });
  return total;
}

Status LlamaModel::UploadWeights() {
  if (host_) return Status::Ok();
  RETURN_IF_ERROR(backend_->Activate());
  const auto alloc = [&](size_t bytes) -> StatusOr<void*> {
    void* dev = backend_->Alloc(bytes);
    if (dev == nullptr) {
      return ResourceExhausted(std::string(backend_->name()) +
                               " backend: out of memory for the weights (" + std::to_string(bytes) +
                               " more bytes)");
    }
    allocs_.push_back(dev);
    return dev;
  };
  // Matrices one GEMM can compute together (same input, same dtype), packed back to
  // back: the rows of wq, wk, wv (w1, w3) form one [q + k + v][dim] ([2F][dim]) matrix. Only
  // where the backend fuses RoPE with the K/V write, which reads q, k and v out of the packed
  // GEMM's rows.
  const ModelConfig& c = model_->config;
  const ModelWeights& w = model_->weights;
  const auto packable = [&](std::initializer_list<const WeightMatrix*> ms) {
    for (const WeightMatrix* m : ms) {
      if (m->empty() || m->dtype != (*ms.begin())->dtype || device_.count(m->data()) != 0) {
        return false;
      }
    }
    return true;
  };
  const auto pack = [&](std::initializer_list<const WeightMatrix*> ms) -> Status {
    size_t total = 0;
    for (const WeightMatrix* m : ms) total += m->size_bytes();
    ASSIGN_OR_RETURN(void* dev, alloc(total));
    size_t off = 0;
    for (const WeightMatrix* m : ms) {
      device_[m->data()] = static_cast<char*>(dev) + off;
      backend_->CopyToDevice(static_cast<char*>(dev) + off, m->data(), m->size_bytes());
      off += m->size_bytes();
    }
    return Status::Ok();
  };
  if (rope_kv_fused_) {
    for (size_t l = 0; l < w.layers.size(); ++l) {
      const LayerWeights& lw = w.layers[l];
      // Biases (Qwen2) are packed the same way, or all absent.
      const bool no_bias = lw.bq.empty() && lw.bk.empty() && lw.bv.empty();
      const bool all_bias = !lw.bq.empty() && !lw.bk.empty() && !lw.bv.empty() &&
                            device_.count(lw.bq.data()) == 0 && device_.count(lw.bk.data()) == 0 &&
                            device_.count(lw.bv.data()) == 0;
      if ((no_bias || all_bias) && packable({&lw.wq, &lw.wk, &lw.wv})) {
        RETURN_IF_ERROR(pack({&lw.wq, &lw.wk, &lw.wv}));
        if (all_bias) {
          const size_t bytes = (lw.bq.size() + lw.bk.size() + lw.bv.size()) * sizeof(float);
          ASSIGN_OR_RETURN(void* dev, alloc(bytes));
          size_t off = 0;
          for (const std::vector<float>* b : {&lw.bq, &lw.bk, &lw.bv}) {
            device_[b->data()] = static_cast<char*>(dev) + off;
            backend_->CopyToDevice(static_cast<char*>(dev) + off, b->data(),
                                   b->size() * sizeof(float));
            off += b->size() * sizeof(float);
          }
        }
        packed_qkv_[l] = 1;
      }
      if (!c.IsMoeLayer(static_cast<int64_t>(l)) && packable({&lw.w1, &lw.w3})) {
        RETURN_IF_ERROR(pack({&lw.w1, &lw.w3}));
        packed_ffn_[l] = 1;
      }
    }
  }
  RETURN_IF_ERROR(
      ForEachDeviceTensor(model_->weights, [&](const void* data, size_t bytes) -> Status {
        if (data == nullptr || bytes == 0 || device_.count(data) != 0) return Status::Ok();
        ASSIGN_OR_RETURN(void* dev, alloc(bytes));
        device_[data] = dev;
        // The host tensors stay as they are for the model's life: one wait at the end will do.
        backend_->CopyToDevice(dev, data, bytes);
        return Status::Ok();
      }));
  if (!inv_freq_.empty()) {
    RETURN_IF_ERROR(inv_freq_dev_.Resize(static_cast<int64_t>(inv_freq_.size())));
    backend_->CopyToDevice(inv_freq_dev_.data(), inv_freq_.data(),
                           inv_freq_.size() * sizeof(double));
  }
  return backend_->Sync();
}

const void* LlamaModel::Dev(const void* host) const {
  if (host_ || host == nullptr) return host;
  auto it = device_.find(host);
  return it == device_.end() ? nullptr : it->second;
}

StatusOr<LlamaModel::BatchMeta> LlamaModel::UploadBatch(const ForwardBatch& b, bool copy) {
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
    meta_elems_ = total;
    if (copy) CopyBatch();
  }
  return BatchMeta{ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], ptr[7], ptr[8]};
}

void LlamaModel::CopyBatch() {
  backend_->CopyToDevice(meta_.data(), meta_host_.data(), meta_elems_ * sizeof(int32_t));
}

Status LlamaModel::AllReduceSum(float* p, int64_t n) {
  if (host_ || par_.world->device_memory()) return par_.world->AllReduceSum(p, n);
  RETURN_IF_ERROR(stage_a_.Resize(n));
  RETURN_IF_ERROR(backend_->CopyToHost(stage_a_.data(), p, n * sizeof(float)));
  RETURN_IF_ERROR(par_.world->AllReduceSum(stage_a_.data(), n));
  backend_->CopyToDevice(p, stage_a_.data(), n * sizeof(float));
  return Status::Ok();
}

Status LlamaModel::CollectivesOk() {
  if (par_.layout.single()) return Status::Ok();
  RETURN_IF_ERROR(par_.world->Check());
  return par_.cp != nullptr ? par_.cp->Check() : Status::Ok();
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

// DeepSeek's q_a_layernorm and kv_a_layernorm are built with their RMSNorm's default eps,
// not config.rms_norm_eps.
constexpr float kLatentEps = 1e-6f;

Status LlamaModel::MlaAttention(const ForwardBatch& b, const BatchMeta& m, int64_t l) {
  const ModelConfig& c = model_->config;
  const LayerWeights& lw = model_->weights.layers[l];
  ForwardTimings& tm = timings_;
  Stopwatch sw;
  const int64_t T = b.num_tokens(), D = c.dim, Hq = dims_.q_heads, Ho = dims_.out_heads;
  const int64_t nope = c.qk_nope_head_dim, R = c.qk_rope_head_dim, L = c.kv_lora_rank;
  const int64_t V = c.v_head_dim, qh = nope + R, LR = L + R, QL = c.q_lora_rank;
  constexpr size_t kF = sizeof(float);
  // Queries: x -> (q_a -> RMSNorm ->) q_b, this TP shard's heads, each [nope | rope].
  const float* qin = xb_.data();
  int64_t qk = D;
  if (QL > 0) {
    RETURN_IF_ERROR(cq_.Resize(T * QL));
    backend_->Gemm({xb_.data(), Dev(lw.wq_a), nullptr, cq_.data(), T, QL, D, lw.wq_a.dtype});
    backend_->RmsNorm({cq_.data(), nullptr, Dev(lw.q_a_norm), cq_.data(), T, QL, kLatentEps});
    qin = cq_.data();
    qk = QL;
  }
  RETURN_IF_ERROR(q_.Resize(T * Hq * qh));
  backend_->Gemm({qin, Dev(lw.wq), nullptr, q_.data(), T, Hq * qh, qk, lw.wq.dtype});
  // The latent: x -> [c_kv | k_pe]; c_kv through its RMSNorm.
  RETURN_IF_ERROR(kva_.Resize(T * LR));
  backend_->Gemm({xb_.data(), Dev(lw.wkv_a), nullptr, kva_.data(), T, LR, D, lw.wkv_a.dtype});
  sw.Lap(&tm.gemm);
  RETURN_IF_ERROR(ckv_.Resize(T * L));
  backend_->CopyDevice2D(ckv_.data(), L * kF, kva_.data(), LR * kF, L * kF, T);
  backend_->RmsNorm({ckv_.data(), nullptr, Dev(lw.kv_a_norm), ckv_.data(), T, L, kLatentEps});
  backend_->CopyDevice2D(kva_.data(), LR * kF, ckv_.data(), L * kF, L * kF, T);
  // RoPE (yarn tables) on q_pe of every head and on k_pe, at global positions.
  kernels::RopeParams rq{q_.data() + nope, m.positions, T, Hq, qh, R, c.rope_theta, c.rope_style};
  rq.inv_freq = host_ ? inv_freq_.data() : inv_freq_dev_.data();
  rq.mscale = static_cast<float>(rope_mscale_);
  backend_->Rope(rq);
  kernels::RopeParams rk = rq;
  rk.x = kva_.data() + L;
  rk.heads = 1;
  rk.head_dim = LR;
  backend_->Rope(rk);
  // Only the owner of a position writes its latent row (one plane: no V).
  backend_->WriteKvBatch(kv_, l, kva_.data(), nullptr, m.kv_block, m.kv_slot, T);
  sw.Lap(&tm.other);
  // Absorption: per head q_lat = W_UK^T q_nope, one batched GEMM over the interleaved heads
  // written straight into the query [q_lat | q_pe]; q_pe copied beside it for every
  // (token, head) row at once.
  RETURN_IF_ERROR(qfull_.Resize(T * Hq * LR));
  backend_->GemmBatched({q_.data(), Hq * qh, qh, Dev(lw.wuk_t), L * nope, qfull_.data(), Hq * LR,
                         LR, T, L, nope, Hq, lw.wuk_t.dtype});
  backend_->CopyDevice2D(qfull_.data() + L, LR * kF, q_.data() + nope, qh * kF, R * kF, T * Hq);
  sw.Lap(&tm.gemm);
  kernels::MlaAttentionParams mp{};
  mp.q = qfull_.data();
  mp.q_seq = m.token_seq;
  mp.q_pos = m.positions;
  mp.kv = kv_;
  mp.layer = l;
  mp.block_tables = m.block_tables;
  mp.block_first_pos = m.block_first_pos;
  mp.kv_lens = m.kv_lens;
  mp.max_blocks_per_seq = b.max_blocks;
  mp.num_seqs = b.num_seqs;
  mp.num_q_tokens = T;
  mp.num_heads = Hq;
  mp.latent_dim = L;
  mp.rope_dim = R;
  mp.scale = static_cast<float>(c.SoftmaxScale());
  RETURN_IF_ERROR(att_.Resize(T * Hq * L));
  RETURN_IF_ERROR(lse_.Resize(T * Hq));
  mp.out = att_.data();
  mp.lse = lse_.data();
  // Long sequences are cut into ~1K-token chunks so that one sequence uses every thread.
  mp.kv_split_tokens = kv_.tokens_per_block * std::max<int64_t>(1, 1024 / kv_.tokens_per_block);
  const size_t ws = backend_->MlaAttentionWorkspaceBytes(mp);
  if (workspace_.size() < static_cast<int64_t>(ws)) RETURN_IF_ERROR(workspace_.Resize(ws));
  backend_->MlaAttention(mp, workspace_.data());
  sw.Lap(&tm.attention);
  if (par_.barrier_before_collectives && par_.cp != nullptr && par_.layout.cp > 1) {
    RETURN_IF_ERROR(par_.cp->Barrier());
    sw.Lap(&tm.wait);
  }
  // The Helix combine in the latent space: att_ [T][Ho][L].
  RETURN_IF_ERROR(CombineAttention(T, L));
  sw.Lap(&tm.combine);
  // Per combined head o = W_UV · o_lat (one batched GEMM), then this rank's row-parallel
  // slice of o_proj.
  RETURN_IF_ERROR(ov_.Resize(T * Ho * V));
  backend_->GemmBatched({att_.data(), Ho * L, L, Dev(lw.wuv), V * L, ov_.data(), Ho * V, V, T, V, L,
                         Ho, lw.wuv.dtype});
  backend_->Gemm({ov_.data(), Dev(lw.wo), nullptr, xb_.data(), T, D, Ho * V, lw.wo.dtype});
  sw.Lap(&tm.gemm);
  return Status::Ok();
}

Status LlamaModel::MoeFfn(int64_t l, int64_t T) {
  const ModelConfig& c = model_->config;
  const LayerWeights& lw = model_->weights.layers[l];
  const int64_t D = c.dim, E = c.n_routed_experts, K = c.experts_per_token, M = c.moe_hidden_dim;
  // The gate in fp32 on every rank (the same normed hidden state everywhere); routing on the
  // host.
  RETURN_IF_ERROR(gate_logits_.Resize(T * E));
  backend_->Gemm({xb_.data(), Dev(lw.gate), nullptr, gate_logits_.data(), T, E, D});
  const float* gate = gate_logits_.data();
  if (!host_) {
    gate_host_.resize(T * E);
    RETURN_IF_ERROR(backend_->CopyToHost(gate_host_.data(), gate, T * E * sizeof(float)));
    RETURN_IF_ERROR(CollectivesOk());  // the gate logits come from the all-reduced stream
    gate = gate_host_.data();
  }
  RouteTokens(c, gate, lw.gate_bias.empty() ? nullptr : lw.gate_bias.data(), T, &route_e_,
              &route_w_);
  RETURN_IF_ERROR(moe_out_.Resize(T * D));
  backend_->Zero(moe_out_.data(), T * D * sizeof(float));
  // Bucket the (token, choice) pairs by local expert in one pass (a counting sort, tokens in
  // order within each expert): expert i's pairs are [expert_start_[i], expert_start_[i + 1]).
  const int64_t E_local = static_cast<int64_t>(lw.experts.size());
  expert_start_.assign(E_local + 1, 0);
  for (int32_t e : route_e_) {
    const int64_t i = e - lw.expert_begin;
    if (i >= 0 && i < E_local) ++expert_start_[i + 1];
  }
  for (int64_t i = 0; i < E_local; ++i) expert_start_[i + 1] += expert_start_[i];
  const int64_t pairs = expert_start_[E_local];
  // Rows (int32) then weights (float) of every pair, one copy to the backend.
  RETURN_IF_ERROR(expert_host_.Resize(std::max<int64_t>(2 * pairs, 1)));
  auto* rows_h = reinterpret_cast<int32_t*>(expert_host_.data());
  float* w_h = reinterpret_cast<float*>(expert_host_.data() + pairs);
  expert_fill_.assign(expert_start_.begin(), expert_start_.end() - 1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = route_e_[t * K + k] - lw.expert_begin;
      if (i < 0 || i >= E_local) continue;  // another rank's expert
      rows_h[expert_fill_[i]] = static_cast<int32_t>(t);
      w_h[expert_fill_[i]++] = route_w_[t * K + k];
    }
  }
  const int32_t* rows_d = rows_h;
  const float* w_d = w_h;
  if (!host_ && pairs > 0) {
    RETURN_IF_ERROR(expert_dev_.Resize(2 * pairs));
    backend_->CopyToDevice(expert_dev_.data(), expert_host_.data(), 2 * pairs * sizeof(int32_t));
    rows_d = reinterpret_cast<const int32_t*>(expert_dev_.data());
    w_d = reinterpret_cast<const float*>(expert_dev_.data() + pairs);
  }
  for (int64_t i = 0; i < E_local; ++i) {
    const int64_t start = expert_start_[i];
    const int64_t n = expert_start_[i + 1] - start;
    if (n == 0) continue;
    const LayerWeights::Expert& ex = lw.experts[i];
    RETURN_IF_ERROR(xe_.Resize(n * D));
    RETURN_IF_ERROR(he1_.Resize(n * M));
    RETURN_IF_ERROR(he3_.Resize(n * M));
    RETURN_IF_ERROR(ye_.Resize(n * D));
    backend_->GatherRows(xb_.data(), D, rows_d + start, n, D, xe_.data());
    backend_->Gemm({xe_.data(), Dev(ex.w1), nullptr, he1_.data(), n, M, D, ex.w1.dtype});
    backend_->Gemm({xe_.data(), Dev(ex.w3), nullptr, he3_.data(), n, M, D, ex.w3.dtype});
    backend_->SiluMul({he1_.data(), he3_.data(), he1_.data(), n * M});
    backend_->Gemm({he1_.data(), Dev(ex.w2), nullptr, ye_.data(), n, D, M, ex.w2.dtype});
    backend_->ScatterAddRows(ye_.data(), rows_d + start, w_d + start, n, D, moe_out_.data());
  }
  const int64_t S = dims_.shared_end - dims_.shared_begin;
  if (S > 0) {
    RETURN_IF_ERROR(h1_.Resize(T * S));
    RETURN_IF_ERROR(h3_.Resize(T * S));
    RETURN_IF_ERROR(ye_.Resize(T * D));
    backend_->Gemm({xb_.data(), Dev(lw.w1), nullptr, h1_.data(), T, S, D, lw.w1.dtype});
    backend_->Gemm({xb_.data(), Dev(lw.w3), nullptr, h3_.data(), T, S, D, lw.w3.dtype});
    backend_->SiluMul({h1_.data(), h3_.data(), h1_.data(), T * S});
    backend_->Gemm({h1_.data(), Dev(lw.w2), nullptr, ye_.data(), T, D, S, lw.w2.dtype});
    backend_->Add(moe_out_.data(), ye_.data(), T * D);
  }
  backend_->CopyDevice(xb_.data(), moe_out_.data(), T * D * sizeof(float));
  return Status::Ok();
}

Status LlamaModel::PackSample(const std::vector<DeviceSampleRow>& rows, int64_t R) {
  // One staging area: u [R] f64, temperature, top_k, top_p, min_p [R] each, then the outputs
  // greedy and sampled [R] i32.
  RETURN_IF_ERROR(sample_host_.Resize(32 * R));
  RETURN_IF_ERROR(sample_dev_.Resize(32 * R));
  uint8_t* h = sample_host_.data();
  auto* u = reinterpret_cast<double*>(h);
  auto* temp = reinterpret_cast<float*>(h + 8 * R);
  auto* top_k = reinterpret_cast<int32_t*>(h + 12 * R);
  auto* top_p = reinterpret_cast<float*>(h + 16 * R);
  auto* min_p = reinterpret_cast<float*>(h + 20 * R);
  for (int64_t r = 0; r < R; ++r) {
    const DeviceSampleRow& x = rows[r];
    u[r] = x.u;
    // A greedy row (its token is the argmax) has temperature 0: the sampling kernel skips it.
    // (Packed as 1 it ran the whole sampler on it: in a captured step, where every row is
    // sampled both ways, that was 2 of a 4.3 ms step at a 128K vocabulary.)
    temp[r] = x.temperature > 0 ? x.temperature : 0.0f;
    top_k[r] = x.top_k;
    top_p[r] = x.top_p;
    min_p[r] = x.min_p;
  }
  return Status::Ok();
}

bool LlamaModel::SampleQueued(const float* logits, int64_t R, int64_t V, bool greedy,
                              bool sampled) {
  uint8_t* h = sample_host_.data();
  uint8_t* d = sample_dev_.data();
  backend_->CopyToDevice(d, h, 24 * R);
  if (!backend_->SampleTokens(
          logits, R, V, reinterpret_cast<const float*>(d + 8 * R),
          reinterpret_cast<const int32_t*>(d + 12 * R), reinterpret_cast<const float*>(d + 16 * R),
          reinterpret_cast<const float*>(d + 20 * R), reinterpret_cast<const double*>(d),
          greedy ? reinterpret_cast<int32_t*>(d + 24 * R) : nullptr,
          sampled ? reinterpret_cast<int32_t*>(d + 28 * R) : nullptr)) {
    return false;
  }
  backend_->CopyToHostAsync(h + 24 * R, d + 24 * R, 8 * R);
  return true;
}

void LlamaModel::ReadSample(const std::vector<DeviceSampleRow>& rows, int64_t R, int64_t n,
                            std::vector<int32_t>* tokens) const {
  const uint8_t* h = sample_host_.data();
  const auto* hg = reinterpret_cast<const int32_t*>(h + 24 * R);
  const auto* hs = reinterpret_cast<const int32_t*>(h + 28 * R);
  tokens->assign(n, -1);
  for (int64_t r = 0; r < n; ++r) {
    if (rows[r].on_device) (*tokens)[r] = rows[r].temperature > 0 ? hs[r] : hg[r];
  }
}

StatusOr<bool> LlamaModel::SampleOnDevice(const std::vector<DeviceSampleRow>& rows,
                                          const float* logits, int64_t R, int64_t V,
                                          std::vector<int32_t>* tokens) {
  tokens->assign(R, -1);
  bool any_greedy = false, any_sampled = false, any_host = false;
  for (int64_t r = 0; r < R; ++r) {
    const DeviceSampleRow& d = rows[r];
    any_host |= !d.on_device;
    any_greedy |= d.on_device && d.temperature == 0;
    any_sampled |= d.on_device && d.temperature > 0;
  }
  if (!any_greedy && !any_sampled) return true;
  RETURN_IF_ERROR(PackSample(rows, R));
  if (!SampleQueued(logits, R, V, any_greedy, any_sampled)) {
    return true;  // this backend does not sample: the host does
  }
  RETURN_IF_ERROR(backend_->Sync());
  ReadSample(rows, R, R, tokens);
  return any_host;
}

bool LlamaModel::GraphEligible(const ForwardBatch& b, const std::vector<DeviceSampleRow>* rows,
                               const std::vector<int32_t>* tokens) const {
  if (!use_graphs_ || graph_failed_ || host_ || !par_.layout.single() || rows == nullptr ||
      tokens == nullptr || !backend_->SupportsGraphs()) {
    return false;
  }
  const ModelConfig& c = model_->config;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    if (c.IsMoeLayer(l)) return false;  // routes on the host mid-step
  }
  // Decode-shaped: one new token per sequence, each sampled on the device.
  const int64_t T = b.num_tokens();
  if (T == 0 || T != b.num_seqs || static_cast<int64_t>(b.logits_rows.size()) != T ||
      static_cast<int64_t>(rows->size()) != T) {
    return false;
  }
  for (int64_t t = 0; t < T; ++t) {
    if (b.logits_rows[t] != t || b.token_seq[t] != t || !(*rows)[t].on_device) return false;
  }
  return true;
}

namespace {

int64_t NextPow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// A graph bucket's block-table width: max_blocks rounded up to a multiple of an eighth of its
// power of two, at least 4 (at most 1/8 over from 32 blocks on, instead of up to 2x: the
// attention's split is sized for the width, so a width twice the context left half of its
// thread blocks on empty parts). The scratch arrays sized by the width grow geometrically, so
// a new bucket seldom moves them (which would drop every captured graph).
int64_t WidthBucket(int64_t max_blocks) {
  const int64_t n = std::max<int64_t>(max_blocks, 1);
  const int64_t step = std::max<int64_t>(4, NextPow2(n) / 8);
  return (n + step - 1) / step * step;
}

}  // namespace

Status LlamaModel::ForwardGraph(const ForwardBatch& b, const std::vector<DeviceSampleRow>& rows,
                                std::vector<int32_t>* tokens) {
  const ModelConfig& c = model_->config;
  const int64_t T = b.num_tokens(), V = c.vocab_size;
  // Pad to the bucket: B sequences (padding ones have no KV, write nothing and sample greedily),
  // block tables W wide.
  const int64_t B = NextPow2(T), W = WidthBucket(b.max_blocks);
  ForwardBatch& p = padded_;
  p.tokens.assign(b.tokens.begin(), b.tokens.end());
  p.tokens.resize(B, 0);
  p.positions.assign(b.positions.begin(), b.positions.end());
  p.positions.resize(B, 0);
  p.token_seq.resize(B);
  p.logits_rows.resize(B);
  for (int64_t t = 0; t < B; ++t) p.token_seq[t] = p.logits_rows[t] = static_cast<int32_t>(t);
  p.kv_block.assign(b.kv_block.begin(), b.kv_block.end());
  p.kv_block.resize(B, -1);
  p.kv_slot.assign(b.kv_slot.begin(), b.kv_slot.end());
  p.kv_slot.resize(B, 0);
  p.kv_lens.assign(b.kv_lens.begin(), b.kv_lens.end());
  p.kv_lens.resize(B, 0);
  p.num_seqs = B;
  p.max_blocks = W;
  p.block_tables.assign(B * W, 0);
  p.block_first_pos.assign(B * W, 0);
  for (int64_t s = 0; s < T; ++s) {
    std::copy_n(b.block_tables.begin() + s * b.max_blocks, b.max_blocks,
                p.block_tables.begin() + s * W);
    std::copy_n(b.block_first_pos.begin() + s * b.max_blocks, b.max_blocks,
                p.block_first_pos.begin() + s * W);
  }
  padded_rows_.assign(rows.begin(), rows.end());
  DeviceSampleRow pad;
  pad.on_device = true;
  padded_rows_.resize(B, pad);

  GraphState& g = graphs_[{B, W}];
  // Host side: the batch's indices and the sampling inputs into their pinned staging (the
  // previous step is done: UploadBatch waits first).
  ASSIGN_OR_RETURN(const BatchMeta m, UploadBatch(p, false));
  RETURN_IF_ERROR(PackSample(padded_rows_, B));
  const auto moves = [&] { return scratch_moves_ + backend_->scratch_moves(); };
  if (g.graph >= 0 && g.moves != moves()) {
    // Scratch memory has moved since the capture: every graph points at old memory.
    backend_->DropGraphs();
    for (auto& [key, other] : graphs_) other.graph = -1;
  }
  // Device side: everything from the index copy to the tokens' copy back, as one graph.
  const auto device_part = [&]() -> Status {
    CopyBatch();
    RETURN_IF_ERROR(RunLayers(p, m));
    RETURN_IF_ERROR(logits_dev_.Resize(B * V));
    ClassifierGemm(logits_dev_.data(), B, V);
    if (!SampleQueued(logits_dev_.data(), B, V, true, true)) {
      return Internal(std::string(backend_->name()) + " backend: graphs but no SampleTokens");
    }
    return Status::Ok();
  };
  if (!g.warmed) {
    // The first step of a shape runs eagerly: it sizes every buffer the capture will use.
    RETURN_IF_ERROR(device_part());
    g.warmed = true;
  } else {
    if (g.graph < 0) {
      const uint64_t before = moves();
      RETURN_IF_ERROR(backend_->BeginCapture());
      const Status st = device_part();
      StatusOr<int> id = backend_->EndCapture();
      if (!st.ok() || !id.ok() || moves() != before) {
        graph_failed_ = true;
        backend_->DropGraphs();
        const std::string why = !st.ok()   ? st.ToString()
                                : !id.ok() ? id.status().ToString()
                                           : "a scratch array moved while capturing";
        HELIX_LOG(kWarn) << "model: capturing the decode step as a graph failed (" << why
                         << "); running without graphs from now on";
        return FailedPrecondition("graph capture failed: " + why);
      }
      g.graph = *id;
      g.moves = moves();
      ++timings_.graph_captures;
    }
    RETURN_IF_ERROR(backend_->Replay(g.graph));
    ++timings_.graph_replays;
  }
  RETURN_IF_ERROR(backend_->Sync());
  ReadSample(padded_rows_, B, T, tokens);
  ++timings_.calls;
  return Status::Ok();
}

Status LlamaModel::RunLayers(const ForwardBatch& b, const BatchMeta& m) {
  const ModelConfig& c = model_->config;
  const ModelWeights& w = model_->weights;
  const int64_t T = b.num_tokens(), D = c.dim, hd = c.head_dim;
  const int64_t F = dims_.ffn_end - dims_.ffn_begin;
  const int64_t qd = dims_.q_heads * hd, kvd = dims_.kv_heads * hd, od = dims_.out_heads * hd;
  parallel::Communicator* world = par_.layout.single() ? nullptr : par_.world;
  RETURN_IF_ERROR(x_.Resize(T * D));
  RETURN_IF_ERROR(xb_.Resize(T * D));
  if (lowp_inputs_) {
    RETURN_IF_ERROR(
        xb_lowp_.Resize(std::max<int64_t>(T, static_cast<int64_t>(b.logits_rows.size())) * D));
  }
  if (!c.mla()) {
    RETURN_IF_ERROR(q_.Resize(T * qd));
    RETURN_IF_ERROR(k_.Resize(T * kvd));
    RETURN_IF_ERROR(v_.Resize(T * kvd));
    RETURN_IF_ERROR(att_.Resize(T * qd));
  }

  ForwardTimings& tm = timings_;
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
  // Decode (one query token per sequence): the rows below each query were written by earlier
  // steps and the metadata uploaded before the step; only q and the token's own K/V row come
  // from the kernels just before the attention (a GPU kernel may start reading the rest early).
  ap.kv_settled_below_q = T == b.num_seqs;
  for (int64_t t = 0; t < T && ap.kv_settled_below_q; ++t) {
    ap.kv_settled_below_q = b.token_seq[t] == t;  // with T == num_seqs: each sequence once
  }
  const size_t ws = backend_->PagedAttentionWorkspaceBytes(ap);
  if (workspace_.size() < static_cast<int64_t>(ws)) RETURN_IF_ERROR(workspace_.Resize(ws));

  const auto F32 = [&](const std::vector<float>& v) { return Dev(v); };
  constexpr kernels::DType kF32 = kernels::DType::kF32;
  // RMSNorm into xb_, and into xb_lowp_ rounded to `lowp` unless that is kF32.
  const auto Norm = [&](const float* x, float* residual, const std::vector<float>& weight,
                        int64_t rows, kernels::DType lowp) {
    kernels::RmsNormParams p{x, residual, F32(weight), xb_.data(), rows, D, c.norm_eps};
    if (lowp != kF32) {
      p.out_lowp = xb_lowp_.data();
      p.out_lowp_dtype = lowp;
    }
    backend_->RmsNorm(p);
  };
  // A GEMM of xb_ (or h1_), reading its 16-bit copy when `lowp` says the norm (SiLU·mul)
  // wrote one.
  const auto GemmIn = [&](kernels::GemmParams p, kernels::DType lowp, const void* copy) {
    if (lowp != kF32) p.x_lowp = copy;
    backend_->Gemm(p);
  };
  // x += the sum over ranks of each rank's row-parallel partial in xb_. With `norm`, the same
  // kernel then writes the next sublayer's input xb_ = RMSNorm(x) * norm (one launch, not two),
  // and its 16-bit copy for a `lowp` GEMM.
  const auto AddRowParallel = [&](const std::vector<float>* norm, kernels::DType lowp) -> Status {
    if (world != nullptr && par_.barrier_before_collectives) {
      RETURN_IF_ERROR(world->Barrier());
      sw.Lap(&tm.wait);
    }
    if (world != nullptr) RETURN_IF_ERROR(AllReduceSum(xb_.data(), T * D));
    sw.Lap(&tm.all_reduce);
    if (norm != nullptr) {
      Norm(xb_.data(), x_.data(), *norm, T, lowp);
      sw.Lap(&tm.other);
    } else {
      backend_->Add(x_.data(), xb_.data(), T * D);
    }
    return Status::Ok();
  };
  // One rank: a backend may fold each residual add into the product that makes it
  // (GemmFusion::accumulate into x_) and each RMSNorm into the product that reads it
  // (norm_weight). Then x_ holds the residual stream and `pending` is the norm its next reader
  // still owes; where the backend declines a fusion (a shape it does not take), Normed runs
  // that norm as its own op into xb_ (and its 16-bit copy).
  // A backend may also have the product that adds into x_ leave its rows' sums of squares
  // (GemmFusion::norm_sums_out into norm_sums_, pending_parts of them a row), so that the norm
  // folded into the next product needs no pass over x_ (norm_sums_in).
  const bool fuse = world == nullptr;
  const std::vector<float>* pending = nullptr;
  kernels::DType pending_lowp = kF32;
  int64_t pending_parts = 0;
  const auto Owe = [&](const std::vector<float>& norm, kernels::DType lowp, int64_t parts = 0) {
    pending = &norm;
    pending_lowp = lowp;
    pending_parts = parts;
  };
  const auto Normed = [&] {
    if (pending != nullptr) Norm(x_.data(), nullptr, *pending, T, pending_lowp);
    pending = nullptr;
  };
  // The fusion of a product reading x_ with this norm folded in: summed by the product, or
  // (parts > 0) from that many partial sums of squares a row in norm_sums_.
  const auto NormOf = [&](const std::vector<float>& weight, int64_t parts = 0) {
    kernels::GemmFusion f;
    f.norm_weight = F32(weight);
    f.norm_eps = c.norm_eps;
    if (parts > 0) {
      f.norm_sums_in = norm_sums_.data();
      f.norm_sum_parts = parts;
    }
    return f;
  };
  kernels::GemmFusion add_into;
  add_into.accumulate = true;
  // Layer l's packed q|k|v and gate|up products of the rows x (xb_, or x_ with the norm folded).
  const auto QkvGemm = [&](int64_t l, const float* x) -> kernels::GemmParams {
    const LayerWeights& lw = w.layers[l];
    return {x, Dev(lw.wq), F32(lw.bq), qkv_.data(), T, qd + 2 * kvd, D, lw.wq.dtype};
  };
  const auto GateUpGemm = [&](int64_t l, const float* x) -> kernels::GemmParams {
    const LayerWeights& lw = w.layers[l];
    return {x, Dev(lw.w1), nullptr, h13_.data(), T, 2 * F, D, lw.w1.dtype};
  };
  // Whether the backend folds the norm into the product that reads it next: layer l's packed
  // gate|up (ffn) or q|k|v. A residual add is folded into its product only then (or after the
  // last layer, where it replaces the plain add): otherwise the norm with the residual add
  // built in is one kernel either way, and the add inside the product would only cost.
  // (parts > 0: the norm from that many partial sums of squares a row.)
  const auto NormFolds = [&](int64_t l, bool ffn, int64_t parts = 0) {
    const LayerWeights& lw = w.layers[l];
    if (ffn) {
      return !c.IsMoeLayer(l) && packed_ffn_[l] &&
             backend_->TakesFusion(GateUpGemm(l, x_.data()), NormOf(lw.ffn_norm, parts), true);
    }
    return !c.mla() && packed_qkv_[l] &&
           backend_->TakesFusion(QkvGemm(l, x_.data()), NormOf(lw.attn_norm, parts), false);
  };
  // The product `adding` into x_, as it runs: with the partial sums of squares for layer l's
  // packed gate|up (ffn) or q|k|v where the backend leaves them and that product takes its
  // norm from them; *parts = their count a row (0: none).
  const auto AddInto = [&](const kernels::GemmParams& adding, int64_t l, bool ffn,
                           int64_t* parts) -> StatusOr<kernels::GemmFusion> {
    kernels::GemmFusion f = add_into;
    *parts = 0;
    const int64_t n = backend_->NormSumParts(adding);
    if (n <= 0 || n > D) return f;              // (at most one part per output)
    RETURN_IF_ERROR(norm_sums_.Resize(T * D));  // every producer's fits: the first call sizes it
    if (NormFolds(l, ffn, n)) {
      f.norm_sums_out = norm_sums_.data();
      *parts = n;
    }
    return f;
  };
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    const kernels::DType attn_lowp = AttnInputLowp(l, T), ffn_lowp = FfnInputLowp(l, T);
    if (l == 0) {  // later layers' attention norm comes with the previous layer's last add
      if (fuse) {
        Owe(lw.attn_norm, attn_lowp);
      } else {
        Norm(x_.data(), nullptr, lw.attn_norm, T, attn_lowp);
      }
    }
    sw.Lap(&tm.other);
    if (c.mla()) {
      Normed();
      RETURN_IF_ERROR(MlaAttention(b, m, l));
      sw = Stopwatch();
    } else {
      // RoPE at global positions; only the owner of a position writes its K/V. One op where the
      // backend fuses them (then q, k and v may be slices of one packed GEMM's rows).
      kernels::RopeWriteKvParams rk{};
      rk.positions = m.positions;
      rk.tokens = T;
      rk.num_q_heads = dims_.q_heads;
      rk.rotary_dim = hd;
      rk.theta = c.rope_theta;
      rk.style = c.rope_style;
      rk.kv = kv_;
      rk.layer = l;
      rk.block = m.kv_block;
      rk.token_in_block = m.kv_slot;
      bool roped = false;  // done with the q|k|v product
      if (packed_qkv_[l]) {
        // One GEMM for q|k|v (and their packed biases) per token; the rotated q into q_.
        // A backend may run the RoPE and K/V write in the GEMM's epilogue (roped).
        const int64_t n = qd + 2 * kvd;
        RETURN_IF_ERROR(qkv_.Resize(T * n));
        rk.q = qkv_.data();
        rk.k = qkv_.data() + qd;
        rk.v = qkv_.data() + qd + kvd;
        rk.row_stride = n;
        rk.q_out = q_.data();
        bool done = false;
        if (pending != nullptr) {
          const kernels::GemmFusion pf = NormOf(*pending, pending_parts);
          roped = rope_kv_fused_ && backend_->GemmRopeWriteKv(QkvGemm(l, x_.data()), pf, rk);
          done = roped || backend_->GemmFused(QkvGemm(l, x_.data()), pf);
          if (done) pending = nullptr;
        }
        if (!done) {
          Normed();
          roped = rope_kv_fused_ && backend_->GemmRopeWriteKv(QkvGemm(l, xb_.data()), {}, rk);
          if (!roped) GemmIn(QkvGemm(l, xb_.data()), attn_lowp, xb_lowp_.data());
        }
      } else {
        Normed();
        GemmIn({xb_.data(), Dev(lw.wq), F32(lw.bq), q_.data(), T, qd, D, lw.wq.dtype}, attn_lowp,
               xb_lowp_.data());
        // k and v read the same xb_ as q (same_x: a backend may reuse q's conversion of it).
        GemmIn({xb_.data(), Dev(lw.wk), F32(lw.bk), k_.data(), T, kvd, D, lw.wk.dtype, true},
               attn_lowp, xb_lowp_.data());
        GemmIn({xb_.data(), Dev(lw.wv), F32(lw.bv), v_.data(), T, kvd, D, lw.wv.dtype, true},
               attn_lowp, xb_lowp_.data());
        rk.q = q_.data();
        rk.k = k_.data();
        rk.v = v_.data();
      }
      sw.Lap(&tm.gemm);
      if (!roped && (!rope_kv_fused_ || !backend_->RopeWriteKv(rk))) {
        if (packed_qkv_[l]) {
          return Internal(std::string(backend_->name()) +
                          " backend: packed q/k/v weights but no RopeWriteKv");
        }
        backend_->Rope(
            {q_.data(), m.positions, T, dims_.q_heads, hd, hd, c.rope_theta, c.rope_style});
        backend_->Rope(
            {k_.data(), m.positions, T, dims_.kv_heads, hd, hd, c.rope_theta, c.rope_style});
        backend_->WriteKvBatch(kv_, l, k_.data(), v_.data(), m.kv_block, m.kv_slot, T);
      }
      ap.layer = l;
      // A hint for the backend (not read by the attention): the weights of the products after
      // it, Wo and the packed gate|up, which a GPU may prefetch into its L2 meanwhile.
      const bool gate_up_next = packed_ffn_[l] && !c.IsMoeLayer(l);
      ap.l2_prefetch[0] = Dev(lw.wo);
      ap.l2_prefetch_bytes[0] = D * od * static_cast<int64_t>(kernels::DTypeSize(lw.wo.dtype));
      ap.l2_prefetch[1] = gate_up_next ? Dev(lw.w1) : nullptr;
      ap.l2_prefetch_bytes[1] =
          gate_up_next ? 2 * F * D * static_cast<int64_t>(kernels::DTypeSize(lw.w1.dtype)) : 0;
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
      const kernels::GemmParams wo{att_.data(), Dev(lw.wo), nullptr, x_.data(),
                                   T,           D,          od,      lw.wo.dtype};
      int64_t parts = 0;
      kernels::GemmFusion wo_fusion = add_into;
      if (fuse) {
        ASSIGN_OR_RETURN(wo_fusion, AddInto(wo, l, true, &parts));
      }
      if (fuse && (parts > 0 || NormFolds(l, true)) && backend_->GemmFused(wo, wo_fusion)) {
        Owe(lw.ffn_norm, ffn_lowp, parts);  // x_ has the attention's output added
      } else {
        backend_->Gemm({att_.data(), Dev(lw.wo), nullptr, xb_.data(), T, D, od, lw.wo.dtype});
      }
      sw.Lap(&tm.gemm);
    }
    // (Nothing else is owed here: the attention's input norm was folded or run.)
    if (pending == nullptr) RETURN_IF_ERROR(AddRowParallel(&lw.ffn_norm, ffn_lowp));
    bool next_norm_pending = false;  // the FFN's output was added into x_ by its product
    int64_t next_parts = 0;          // and left its partial sums of squares (AddInto)
    // FFN: x += W2 · (silu(W1 · n) ⊙ (W3 · n)), column- then row-parallel over the N ranks;
    // an MoE layer adds its experts' and shared experts' partials instead.
    if (c.IsMoeLayer(l)) {
      Normed();
      RETURN_IF_ERROR(MoeFfn(l, T));
    } else {
      RETURN_IF_ERROR(h1_.Resize(T * F));
      RETURN_IF_ERROR(h3_.Resize(T * F));
      const kernels::DType down_lowp = DownInputLowp(l, T);
      if (down_lowp != kF32) RETURN_IF_ERROR(h1_lowp_.Resize(T * F));
      kernels::SiluMulParams act{h1_.data(), h3_.data(), h1_.data(), T * F};
      if (down_lowp != kF32) {
        act.out_lowp = h1_lowp_.data();
        act.out_lowp_dtype = down_lowp;
      }
      if (packed_ffn_[l]) {
        // One GEMM for gate|up per token; SiluMul reads the halves of each row (one op where
        // the backend fuses them).
        RETURN_IF_ERROR(h13_.Resize(T * 2 * F));
        act.gate = h13_.data();
        act.up = h13_.data() + F;
        act.cols = F;
        act.ld = 2 * F;
        if (pending != nullptr &&
            backend_->GemmSiluMul(GateUpGemm(l, x_.data()), act, NormOf(*pending, pending_parts))) {
          pending = nullptr;
        } else {
          Normed();
          kernels::GemmParams gu = GateUpGemm(l, xb_.data());
          if (ffn_lowp != kF32) gu.x_lowp = xb_lowp_.data();
          if (!backend_->GemmSiluMul(gu, act, {})) {
            backend_->Gemm(gu);
            backend_->SiluMul(act);
          }
        }
      } else {
        Normed();
        GemmIn({xb_.data(), Dev(lw.w1), nullptr, h1_.data(), T, F, D, lw.w1.dtype}, ffn_lowp,
               xb_lowp_.data());
        GemmIn({xb_.data(), Dev(lw.w3), nullptr, h3_.data(), T, F, D, lw.w3.dtype, true}, ffn_lowp,
               xb_lowp_.data());
        backend_->SiluMul(act);
      }
      const kernels::GemmParams down{h1_.data(), Dev(lw.w2), nullptr, x_.data(),
                                     T,          D,          F,       lw.w2.dtype};
      kernels::GemmFusion down_fusion = add_into;
      if (fuse && l + 1 < c.n_layers) {
        ASSIGN_OR_RETURN(down_fusion, AddInto(down, l + 1, false, &next_parts));
      }
      if (fuse && (l + 1 == c.n_layers || next_parts > 0 || NormFolds(l + 1, false)) &&
          backend_->GemmFused(down, down_fusion)) {
        next_norm_pending = true;
      } else {
        GemmIn({h1_.data(), Dev(lw.w2), nullptr, xb_.data(), T, D, F, lw.w2.dtype}, down_lowp,
               h1_lowp_.data());
      }
    }
    sw.Lap(&tm.gemm);
    if (next_norm_pending) {
      // x_ is complete; the next layer's attention norm is owed (none after the last layer:
      // the final norm below reads x_).
      if (l + 1 < c.n_layers) {
        Owe(w.layers[l + 1].attn_norm, AttnInputLowp(l + 1, T), next_parts);
      }
    } else {
      RETURN_IF_ERROR(l + 1 < c.n_layers
                          ? AddRowParallel(&w.layers[l + 1].attn_norm, AttnInputLowp(l + 1, T))
                          : AddRowParallel(nullptr, kF32));
    }
  }
  sw.Lap(&tm.other);

  // Final norm for the rows that sample (the classifier follows in the caller).
  const int64_t R = static_cast<int64_t>(b.logits_rows.size());
  RETURN_IF_ERROR(rows_.Resize(R * D));
  backend_->GatherRows(x_.data(), D, m.logits_rows, R, D, rows_.data());
  RETURN_IF_ERROR(xb_.Resize(std::max(T, R) * D));
  Norm(rows_.data(), nullptr, w.final_norm, R, ClassifierInputLowp(R));
  return Status::Ok();
}

Status LlamaModel::Forward(const ForwardBatch& b, std::vector<float>* logits,
                           const std::vector<DeviceSampleRow>* sample_rows,
                           std::vector<int32_t>* tokens) {
  const ModelConfig& c = model_->config;
  parallel::Communicator* world = par_.layout.single() ? nullptr : par_.world;
  RETURN_IF_ERROR(backend_->Activate());
  if (GraphEligible(b, sample_rows, tokens)) {
    Status st = ForwardGraph(b, *sample_rows, tokens);
    if (st.ok() || !graph_failed_) return st;
    // The capture failed (not the step): graphs are off from now on, run this step eagerly.
  }
  ForwardTimings& tm = timings_;
  ++tm.calls;
  Stopwatch sw;
  ASSIGN_OR_RETURN(const BatchMeta m, UploadBatch(b, true));
  RETURN_IF_ERROR(RunLayers(b, m));
  sw = Stopwatch();
  // The classifier, only for the rows that sample; vocab-parallel and gathered on several ranks.
  const int64_t R = static_cast<int64_t>(b.logits_rows.size());
  const int64_t V = c.vocab_size, Vl = dims_.vocab_end - dims_.vocab_begin;
  if (tokens != nullptr) tokens->assign(R, -1);
  if (world == nullptr) {
    if (host_) {
      if (logits != nullptr) {  // (one rank is the leader: it always asks for them)
        logits->resize(R * V);
        ClassifierGemm(logits->data(), R, V);
      }
    } else {
      RETURN_IF_ERROR(logits_dev_.Resize(R * V));
      float* out = logits_dev_.data();
      ClassifierGemm(out, R, V);
      bool need_logits = true;
      if (sample_rows != nullptr && tokens != nullptr && R > 0) {
        ASSIGN_OR_RETURN(need_logits, SampleOnDevice(*sample_rows, out, R, V, tokens));
      }
      if (need_logits && logits != nullptr) {
        logits->resize(R * V);
        RETURN_IF_ERROR(backend_->CopyToHost(logits->data(), out, R * V * sizeof(float)));
      }
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
      ClassifierGemm(logits_dev_.data(), R, Vl);
      backend_->CopyDevice2D(send_.data(), vmax * sizeof(float), logits_dev_.data(),
                             Vl * sizeof(float), Vl * sizeof(float), R);
    }
    RETURN_IF_ERROR(world->AllGather(send_.data(), recv_.data(), R * vmax * sizeof(float)));
    // The leader (a rank asking for the logits): unpadded into [R][V] on the device, the
    // sampled rows' tokens picked there, and only what the host must sample copied back.
    bool need_logits = logits != nullptr;
    if (need_logits) {
      RETURN_IF_ERROR(full_logits_.Resize(std::max<int64_t>(R * V, 1)));
      for (int i = 0; i < n && R > 0; ++i) {
        const auto [v0, v1] = parallel::SplitRange(V, n, i);
        if (v1 > v0) {
          backend_->CopyDevice2D(full_logits_.data() + v0, V * sizeof(float),
                                 recv_.data() + i * R * vmax, vmax * sizeof(float),
                                 (v1 - v0) * sizeof(float), R);
        }
      }
    }
    if (need_logits && sample_rows != nullptr && tokens != nullptr && R > 0) {
      ASSIGN_OR_RETURN(need_logits,
                       SampleOnDevice(*sample_rows, full_logits_.data(), R, V, tokens));
    }
    if (need_logits) {
      logits->resize(R * V);
      RETURN_IF_ERROR(
          backend_->CopyToHost(logits->data(), full_logits_.data(), R * V * sizeof(float)));
    }
    RETURN_IF_ERROR(backend_->Sync());
    RETURN_IF_ERROR(CollectivesOk());
    sw.Lap(&tm.logits);
    return Status::Ok();
  } else {
    local_logits_.assign(R * vmax, 0.0f);
    if (R > 0) {
      RETURN_IF_ERROR(logits_dev_.Resize(R * Vl));
      ClassifierGemm(logits_dev_.data(), R, Vl);
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
  if (logits != nullptr) {
    logits->resize(R * V);
    for (int i = 0; i < n; ++i) {
      const auto [v0, v1] = parallel::SplitRange(V, n, i);
      for (int64_t r = 0; r < R; ++r) {
        std::copy_n(gathered + (i * R + r) * vmax, v1 - v0, logits->data() + r * V + v0);
      }
    }
  }
  sw.Lap(&tm.logits);
  return Status::Ok();
}

}  // namespace helix
