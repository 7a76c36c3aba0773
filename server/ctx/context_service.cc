#include "server/ctx/context_service.h"

#include "engine/common/log.h"
#include "helix/version.h"
#include "server/common/kv_proto.h"
#include "server/common/serve_setup.h"
#include "server/gen/generation_service.h"

namespace helix::server {

ContextService::ContextService(std::unique_ptr<Engine> engine, ContextServiceOptions options)
    : engine_(std::move(engine)),
      options_(std::move(options)),
      free_blocks_(engine_->kv_stats().free_blocks),
      kv_shape_(engine_->kv_stats()) {
  thread_ = std::thread([this] { Loop(); });
}

ContextService::~ContextService() { Stop(std::chrono::milliseconds(0)); }

void ContextService::Kick() {
  std::lock_guard<std::mutex> lock(mu_);
  kicked_ = true;
  cv_.notify_one();
}

void ContextService::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (stop_) break;
    }
    if (engine_->HasWork()) {
      const bool ran = engine_->Step();
      free_blocks_ = engine_->kv_stats().free_blocks;
      if (!ran) {
        // Queued requests wait for leases to free KV (or export-buffer) room: wait for a
        // release or a new request instead of spinning.
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(5), [&] { return kicked_ || stop_; });
        kicked_ = false;
      }
      continue;
    }
    engine_->ExpireLeases();  // an idle server still frees what nobody pulled
    free_blocks_ = engine_->kv_stats().free_blocks;
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return kicked_ || stop_; });
    kicked_ = false;
  }
  engine_->Close(Unavailable("the context server is shutting down"));  // (as the gen server)
  // The engine lives until the service is destroyed, after the gRPC server stopped: a Release or
  // GetKvExport that arrives meanwhile (generation servers finishing their pulls) may call it.
}

void ContextService::Stop(std::chrono::milliseconds drain) {
  accepting_ = false;
  const auto deadline = std::chrono::steady_clock::now() + drain;
  while (in_flight_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // The handles already given out are pulled and released through this server (its exported
  // memory, GetKvExport, Release): it serves them until they are released, within the drain.
  while (engine_->disagg_stats().retained_requests > 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    stop_ = true;
    cv_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
}

grpc::Status ContextService::CheckAuth(const grpc::CallbackServerContext* ctx) const {
  return CheckBearer(ctx->client_metadata(), options_.api_key);
}

// A prefill's reactor. When its call ends without the answer reaching the client (the
// client cancelled or its deadline passed just as the prefill finished, or the connection was
// lost), the KV it retained is released at once: nobody holds the handle, and the blocks
// would otherwise stay taken until the lease ends.
class ContextService::PrefillReactor final : public grpc::ServerUnaryReactor {
 public:
  PrefillReactor(ContextService* svc, grpc::CallbackServerContext* ctx) : svc_(svc), ctx_(ctx) {}
  // Finishes the call with `st`; `retained_id`: the engine request whose KV the answer hands
  // out.
  void Answer(const grpc::Status& st, std::string retained_id = "") {
    retained_id_ = std::move(retained_id);
    Finish(st);
  }
  // The client cancelled or its deadline passed: a prefill still queued or running ends now
  // (Engine::Cancel; one that already finished is not live and is left to OnDone), so a burst
  // of abandoned prefills does not hold the queue and compute.
  void OnCancel() override {
    std::string id;
    {
      std::lock_guard<std::mutex> lock(mu_);
      id = engine_id_;
    }
    if (!id.empty()) {
      svc_->engine_->Cancel(id);
      svc_->Kick();
    }
  }
  // The engine's id for the prefill, set before it is submitted: once submitted the reactor
  // may be gone (the answer can come first). A cancel before the submission finds no live id
  // and is dropped; that prefill runs, and OnDone releases its KV.
  void WillSubmit(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    engine_id_ = id;
  }
  void OnDone() override {
    if (!retained_id_.empty() && ctx_->IsCancelled() &&
        svc_->engine_->ReleaseRetained(retained_id_)) {
      HELIX_LOG(kInfo) << "ctx: prefill " << retained_id_
                       << " did not reach its client (cancelled or timed out): KV released";
      svc_->Kick();
    }
    delete this;
  }

 private:
  ContextService* svc_;
  grpc::CallbackServerContext* ctx_;
  std::string retained_id_;  // written before Finish, read in OnDone (after it)
  std::mutex mu_;
  std::string engine_id_;  // GUARDED_BY(mu_)
};

grpc::ServerUnaryReactor* ContextService::Prefill(grpc::CallbackServerContext* ctx,
                                                  const v1::PrefillRequest* request,
                                                  v1::PrefillResponse* response) {
  PrefillReactor* reactor = new PrefillReactor(this, ctx);
  if (grpc::Status auth = CheckAuth(ctx); !auth.ok()) {
    reactor->Answer(auth);
    return reactor;
  }
  StatusOr<GenerateRequest> r = FromProto(request->request());
  if (!r.ok()) {
    reactor->Answer(ToGrpc(r.status()));
    return reactor;
  }
  if (r->kv_source != nullptr) {
    reactor->Answer(
        ToGrpc(InvalidArgument("request.kv_handle: a context server prefills the "
                               "prompt itself; send the prompt alone")));
    return reactor;
  }
  if (!accepting_.load()) {
    reactor->Answer(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
    return reactor;
  }
  if (in_flight_.fetch_add(1) >= options_.max_in_flight) {
    in_flight_.fetch_sub(1);
    reactor->Answer(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                 "admission queue full: " + std::to_string(options_.max_in_flight) +
                                     " prefills already in flight; retry later"));
    return reactor;
  }
  // Prefill only: one token, whatever it is (the generation side applies the stop rules),
  // and the prompt's KV stays for the generation instance.
  // The id the handle carries: unique by the counter, with as much of the client's id as fits
  // the bound a generation server applies to handle ids (kMaxIdBytes).
  // (Built by appending: GCC 12 warns falsely, -Wrestrict, on "ctx" + std::string.)
  std::string handle_id = "ctx";
  handle_id += std::to_string(next_id_.fetch_add(1));
  if (!r->id.empty()) {
    handle_id += '-';
    handle_id.append(r->id, 0, kMaxIdBytes - std::min(kMaxIdBytes, handle_id.size()));
  }
  r->id = std::move(handle_id);
  r->max_tokens = 1;
  r->stop.clear();
  // With min_tokens the token may not be a stop token: the stop ids stay for the sampler's ban
  // (then they cannot end this one-token run).
  if (r->sampling.min_tokens == 0) {
    r->ignore_eos = true;
    r->stop_token_ids.clear();
  }
  r->retain_kv = true;
  const bool add_bos = r->add_bos;
  const std::string prompt_text = r->prompt;
  std::vector<int32_t> prompt_ids = r->prompt_tokens;
  if (prompt_ids.empty()) prompt_ids = engine_->tokenizer().Encode(prompt_text, add_bos);
  response->mutable_prompt_token_ids()->mutable_ids()->Assign(prompt_ids.begin(), prompt_ids.end());
  Engine* engine = engine_.get();
  const KvExport* ex = engine_->kv_export();
  ContextService* self = this;
  r->sink = [self, engine, ex, reactor, response, ctx, prompt_ids](const TokenEvent& ev) {
    if (ev.token >= 0) {
      response->set_first_token(ev.token);
      response->set_first_token_text(ev.text);
      response->set_first_token_logprob(ev.logprob);
      for (const auto& [id, lp] : ev.top_logprobs) {
        v1::TopLogprob* t = response->add_top_logprobs();
        t->set_token_id(id);
        t->set_logprob(lp);
      }
    }
    if (!ev.finished) return;
    // The engine thread (the sink runs inside Step): the free count GetServerInfo reports is
    // brought up to date before the answer, or an Info call right after it could still see the
    // count from before this prefill's blocks were taken (the loop refreshes it after Step).
    self->free_blocks_ = engine->kv_stats().free_blocks;
    response->mutable_first_token_text()->append(ev.text);
    self->in_flight_.fetch_sub(1);
    if (ev.finish_reason == FinishReason::kError) {
      reactor->Answer(ToGrpc(ev.error));
      return;
    }
    if (ev.finish_reason == FinishReason::kCancelled) {
      reactor->Answer(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
      return;
    }
    if (ctx->IsCancelled()) {  // nobody will pull it
      engine->ReleaseRetained(ev.request_id);
      reactor->Answer(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
      return;
    }
    response->set_request_id(ev.request_id);
    response->set_lease_ms(self->options_.lease_ms);
    transfer::KvSource src;
    src.server_id = ex->server_id;
    src.server_address = self->options_.address;
    src.request_id = ev.request_id;
    src.worker_address = ex->worker_address;
    src.listener_address = ex->listener_address;
    src.rkey = ex->rkey;
    src.block_addresses = ev.kv_block_addresses;
    src.token_count = static_cast<int64_t>(prompt_ids.size());
    src.layout = ex->layout;
    src.model_fingerprint = engine->model_fingerprint();
    src.lease_token = ev.kv_lease_token;
    src.checksum = transfer::HandleChecksum(src);
    ToProto(src, response->mutable_kv_handle());
    response->mutable_kv_handle()->set_lease_ms(self->options_.lease_ms);
    reactor->Answer(grpc::Status::OK, ev.request_id);
  };
  r->prompt_tokens = std::move(prompt_ids);
  reactor->WillSubmit(r->id);
  StatusOr<std::string> id = engine_->Submit(std::move(*r));
  if (!id.ok()) {
    in_flight_.fetch_sub(1);
    reactor->Answer(ToGrpc(id.status()));
    return reactor;
  }
  Kick();
  return reactor;
}

grpc::ServerUnaryReactor* ContextService::Release(grpc::CallbackServerContext* ctx,
                                                  const v1::ReleaseRequest* request,
                                                  v1::ReleaseResponse*) {
  // Not behind the API key: generation servers release what they pulled. The lease token is
  // known only to whoever got the handle, and must come with the handle's blocks.
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const Status st = engine_->ReleaseLease(
      request->request_id(), request->lease_token(),
      std::vector<uint64_t>(request->block_addresses().begin(), request->block_addresses().end()));
  if (st.ok()) Kick();
  reactor->Finish(ToGrpc(st));
  return reactor;
}

grpc::ServerUnaryReactor* ContextService::RenewLease(grpc::CallbackServerContext* ctx,
                                                     const v1::ReleaseRequest* request,
                                                     v1::RenewLeaseResponse* response) {
  // Not behind the API key, as Release: the lease token and the blocks must match.
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const Status st = engine_->RenewLease(
      request->request_id(), request->lease_token(),
      std::vector<uint64_t>(request->block_addresses().begin(), request->block_addresses().end()));
  if (st.ok()) response->set_lease_ms(options_.lease_ms);
  reactor->Finish(ToGrpc(st));
  return reactor;
}

grpc::ServerUnaryReactor* ContextService::GetKvExport(grpc::CallbackServerContext* ctx,
                                                      const v1::GetKvExportRequest*,
                                                      v1::KvExport* out) {
  // Not behind the API key: generation servers check the handles they are sent against it
  // (every client that prefills gets the same values in its handles anyway).
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const KvExport* ex = engine_->kv_export();
  out->set_server_id(ex->server_id);
  out->set_worker_address(ex->worker_address);
  out->set_ucx_listener(ex->listener_address);
  out->set_rkey(ex->rkey);
  out->set_region_base(ex->region_base);
  out->set_region_bytes(ex->region_bytes);
  out->set_block_bytes(ex->layout.block_bytes());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* ContextService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                        const v1::GetServerInfoRequest*,
                                                        v1::ServerInfo* info) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status auth = CheckAuth(ctx); !auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  const KvStats& kv = kv_shape_;
  const DisaggStats d = engine_->disagg_stats();
  info->set_model_name(options_.model_name);
  info->set_model_fingerprint(engine_->model_fingerprint());
  info->set_tensor_parallel_size(1);
  info->set_context_parallel_size(1);
  info->set_tokens_per_block(static_cast<int32_t>(kv.tokens_per_block));
  info->set_kv_total_blocks(kv.total_blocks);
  info->set_kv_free_blocks(free_blocks_.load());
  info->set_kv_block_bytes(kv.block_bytes);
  info->set_kv_dtype(options_.kv_dtype);
  info->set_max_seq_len(engine_->max_seq_len());
  info->set_version(kVersion);
  info->set_server_id(engine_->kv_export()->server_id);
  info->set_kv_retained_requests(d.retained_requests);
  info->set_kv_leases_expired(d.leases_expired);
  info->set_kv_export_total_blocks(d.export_blocks_total);
  info->set_kv_export_free_blocks(d.export_blocks_free);
  info->set_kv_ucx_connections(d.ucx_connections);
  const RequestCounts n = engine_->request_counts();
  info->set_num_requests_running(n.running);
  info->set_num_requests_waiting(n.waiting);
  ToProto(engine_->kv_layout(), info->mutable_kv_layout());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace helix::server
