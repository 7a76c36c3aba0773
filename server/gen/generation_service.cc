#include "server/gen/generation_service.h"

#include <algorithm>

#include "server/common/serve_setup.h"

#include <cmath>
#include <deque>

#include "engine/common/log.h"
#include "helix/version.h"

namespace helix::server {

grpc::Status ToGrpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())), s.message());
}

// Far beyond any context this server can hold; the transport's own limit is 64 MiB.
constexpr size_t kMaxPromptBytes = 16u << 20;

StatusOr<GenerateRequest> FromProto(const v1::GenerateRequest& p) {
  GenerateRequest r;
  // Every message of the stream repeats it.
  if (p.request_id().size() > kMaxIdBytes) {
    return InvalidArgument("request_id is " + std::to_string(p.request_id().size()) +
                           " bytes; the limit is " + std::to_string(kMaxIdBytes));
  }
  r.id = p.request_id();
  switch (p.prompt_case()) {
    case v1::GenerateRequest::kText:
      if (p.text().empty()) return InvalidArgument("prompt.text is empty");
      if (p.text().size() > kMaxPromptBytes) {
        return InvalidArgument("prompt.text is " + std::to_string(p.text().size()) +
                               " bytes; the limit is " + std::to_string(kMaxPromptBytes));
      }
      r.prompt = p.text();
      break;
    case v1::GenerateRequest::kTokenIds:
      if (p.token_ids().ids().empty()) return InvalidArgument("prompt.token_ids is empty");
      r.prompt_tokens.assign(p.token_ids().ids().begin(), p.token_ids().ids().end());
      break;
    default:
      return InvalidArgument("prompt: give text or token_ids");
  }
  if (p.has_kv_handle()) {
    // Disaggregated: the prompt's KV comes from a context server.
    ASSIGN_OR_RETURN(transfer::KvSource src, FromProto(p.kv_handle()));
    if (!p.has_first_token()) {
      return InvalidArgument(
          "first_token: a request with a kv_handle needs the first token "
          "the context server sampled");
    }
    r.kv_source = std::make_shared<transfer::KvSource>(std::move(src));
    r.first_token = p.first_token();
  } else if (p.has_first_token()) {
    return InvalidArgument("first_token is only meaningful with a kv_handle");
  }
  if (p.max_tokens() < 1) {
    return InvalidArgument("max_tokens = " + std::to_string(p.max_tokens()) + ": expected >= 1");
  }
  r.max_tokens = p.max_tokens();
  const v1::SamplingParams& s = p.sampling();
  if (s.has_temperature()) r.sampling.temperature = s.temperature();
  if (s.has_top_p()) r.sampling.top_p = s.top_p();
  r.sampling.top_k = s.top_k();
  r.sampling.min_p = s.min_p();
  if (s.has_repetition_penalty()) r.sampling.repetition_penalty = s.repetition_penalty();
  r.sampling.presence_penalty = s.presence_penalty();
  r.sampling.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) r.sampling.seed = s.seed();
  if (s.min_tokens() < 0 || s.min_tokens() > p.max_tokens()) {
    return InvalidArgument("min_tokens = " + std::to_string(s.min_tokens()) +
                           ": expected 0..max_tokens (" + std::to_string(p.max_tokens()) + ")");
  }
  r.sampling.min_tokens = s.min_tokens();
  // (logit_bias's size is checked by Validate; this list is counted before duplicates go.)
  if (s.allowed_token_ids_size() > static_cast<int>(SamplingParams::kMaxLogitBias)) {
    return InvalidArgument("allowed_token_ids has " + std::to_string(s.allowed_token_ids_size()) +
                           " ids: at most " + std::to_string(SamplingParams::kMaxLogitBias));
  }
  r.sampling.allowed_token_ids.assign(s.allowed_token_ids().begin(), s.allowed_token_ids().end());
  std::sort(r.sampling.allowed_token_ids.begin(), r.sampling.allowed_token_ids.end());
  r.sampling.allowed_token_ids.erase(
      std::unique(r.sampling.allowed_token_ids.begin(), r.sampling.allowed_token_ids.end()),
      r.sampling.allowed_token_ids.end());
  // A map's keys are unique but come in no order; the sampler wants them sorted.
  r.sampling.logit_bias.assign(s.logit_bias().begin(), s.logit_bias().end());
  std::sort(r.sampling.logit_bias.begin(), r.sampling.logit_bias.end());
  if (p.has_top_logprobs()) {
    if (p.top_logprobs() < 0 || p.top_logprobs() > 20) {
      return InvalidArgument("top_logprobs = " + std::to_string(p.top_logprobs()) +
                             ": expected 0..20");
    }
    r.sampling.top_logprobs = p.top_logprobs();
  }
  RETURN_IF_ERROR(r.sampling.Validate());
  RETURN_IF_ERROR(CheckStops(p));
  r.stop.assign(p.stop().begin(), p.stop().end());
  r.include_stop_str = p.include_stop_str_in_output();
  r.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  r.ignore_eos = p.ignore_eos();
  if (p.has_add_bos()) r.add_bos = p.add_bos();
  return r;
}

namespace {

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kError:
      return v1::FINISH_REASON_ERROR;
    case FinishReason::kNone:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// What a stream's sink (engine thread) and its reactor (gRPC threads) share. The reactor
// pointer is cleared when gRPC is done with the stream; events after that are dropped.
struct StreamShared {
  std::mutex mu;
  grpc::ServerWriteReactor<v1::GenerateResponse>* reactor = nullptr;  // GUARDED_BY(mu)
  std::deque<v1::GenerateResponse> queue;                             // GUARDED_BY(mu)
  bool writing = false;                                               // GUARDED_BY(mu)
  bool finished = false;       // the final event is queued; GUARDED_BY(mu)
  grpc::Status final_status;   // GUARDED_BY(mu)
  bool finish_called = false;  // GUARDED_BY(mu)

  // Under mu: what to do next (start a write of queue.front(), or finish).
  enum class Next { kNothing, kWrite, kFinish };
  Next DecideLocked() {
    if (reactor == nullptr || writing || finish_called) return Next::kNothing;
    if (!queue.empty()) {
      writing = true;
      return Next::kWrite;
    }
    if (finished) {
      finish_called = true;
      return Next::kFinish;
    }
    return Next::kNothing;
  }
  void Act(Next n) {
    // gRPC may run reactions inline: never call into it with mu held.
    grpc::ServerWriteReactor<v1::GenerateResponse>* r;
    const v1::GenerateResponse* msg = nullptr;
    grpc::Status st;
    {
      std::lock_guard<std::mutex> lock(mu);
      r = reactor;
      if (r == nullptr) return;
      if (n == Next::kWrite) msg = &queue.front();
      st = final_status;
    }
    if (n == Next::kWrite) r->StartWrite(msg);
    if (n == Next::kFinish) r->Finish(st);
  }
};

}  // namespace

class GenerationService::Stream final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  Stream(GenerationService* svc, grpc::CallbackServerContext* ctx,
         const v1::GenerateRequest* request)
      : svc_(svc), shared_(std::make_shared<StreamShared>()) {
    shared_->reactor = this;
    Start(ctx, *request);
  }

  void OnWriteDone(bool ok) override {
    StreamShared::Next n;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->writing = false;
      if (!shared_->queue.empty()) shared_->queue.pop_front();
      if (!ok) {
        // The client is gone: nothing more can be written.
        shared_->queue.clear();
        shared_->finished = true;
        shared_->final_status = grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      }
      n = shared_->DecideLocked();
    }
    if (!ok) CancelInEngine();
    shared_->Act(n);
  }

  // Client cancel, disconnect or deadline: the engine frees the request at its next step and
  // sends the final (cancelled) event, which finishes the stream.
  void OnCancel() override { CancelInEngine(); }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->reactor = nullptr;
    }
    delete this;
  }

 private:
  void FinishNow(const grpc::Status& s) {
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->finished = true;
      shared_->finish_called = true;
    }
    Finish(s);
  }

  void CancelInEngine() {
    if (!request_id_.empty()) {
      svc_->engine_->Cancel(request_id_);
      svc_->Kick();
    }
  }

  void Start(grpc::CallbackServerContext* ctx, const v1::GenerateRequest& p) {
    if (grpc::Status auth = svc_->CheckAuth(ctx); !auth.ok()) return FinishNow(auth);
    GenerationService* svc = svc_;
    // A refused request with a KV handle hands the context server its KV back at once (the
    // lease would free it only at its end).
    auto release_refused = [svc, &p] {
      // Not a handle whose strings are past the limits: nothing is kept or called for it.
      const v1::KvHandle& h = p.kv_handle();
      if (p.has_kv_handle() && !h.server_address().empty() && !h.request_id().empty() &&
          h.server_address().size() <= kMaxIdBytes && h.request_id().size() <= kMaxIdBytes &&
          h.lease_token().size() <= kMaxIdBytes) {
        svc->context_.Release(p.kv_handle().server_address(), ReleaseRequestFor(p.kv_handle()));
      }
    };
    // A handle naming a server off the allow list is refused before anything is contacted,
    // and nothing is released there either, whether the rest of the request is valid or not.
    const auto& allowed = svc_->options_.allowed_context_servers;
    if (p.has_kv_handle() && !allowed.empty() &&
        std::find(allowed.begin(), allowed.end(), p.kv_handle().server_address()) ==
            allowed.end()) {
      return FinishNow(
          grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                       "kv_handle names context server '" + Clip(p.kv_handle().server_address()) +
                           "', which is not in cache_transceiver_config.allowed_context_servers"));
    }
    StatusOr<GenerateRequest> r = FromProto(p);
    if (!r.ok()) {
      release_refused();
      return FinishNow(ToGrpc(r.status()));
    }
    if (!svc_->accepting_.load()) {
      release_refused();
      return FinishNow(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
    }
    if (svc_->in_flight_.fetch_add(1) >= svc_->options_.max_in_flight) {
      svc_->in_flight_.fetch_sub(1);
      release_refused();
      return FinishNow(
          grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                       "admission queue full: " + std::to_string(svc_->options_.max_in_flight) +
                           " requests already in flight; retry later"));
    }
    std::shared_ptr<StreamShared> shared = shared_;
    r->sink = [svc, shared](const TokenEvent& ev) {
      // A lost rank: health turns NOT_SERVING before any stream sees the error.
      if (ev.finished && ev.finish_reason == FinishReason::kError) svc->UpdateHealth();
      // The engine thread (the sink runs inside Step), with the request's blocks freed: the
      // free count GetServerInfo reports is current before the client sees the end (the loop
      // refreshes it only after Step).
      if (ev.finished) svc->free_blocks_ = svc->engine_->kv_stats().free_blocks;
      v1::GenerateResponse m;
      m.set_request_id(ev.request_id);
      m.set_token_id(ev.token);
      m.set_text(ev.text);
      m.set_logprob(ev.logprob);
      for (const auto& [id, lp] : ev.top_logprobs) {
        v1::TopLogprob* t = m.add_top_logprobs();
        t->set_token_id(id);
        t->set_logprob(lp);
      }
      StreamShared::Next n;
      {
        std::lock_guard<std::mutex> lock(shared->mu);
        if (ev.finished) {
          m.set_finish_reason(ToProto(ev.finish_reason));
          m.mutable_usage()->set_prompt_tokens(ev.prompt_tokens);
          m.mutable_usage()->set_completion_tokens(ev.completion_tokens);
          shared->finished = true;
          if (ev.finish_reason == FinishReason::kError) {
            m.set_error(ev.error.message());
            shared->final_status = ToGrpc(ev.error);
          } else if (ev.finish_reason == FinishReason::kCancelled) {
            shared->final_status = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
          }
        }
        if (shared->reactor != nullptr && !shared->finish_called) {
          shared->queue.push_back(std::move(m));
        }
        n = shared->DecideLocked();
      }
      if (ev.finished) svc->in_flight_.fetch_sub(1);
      shared->Act(n);
    };
    if (r->kv_source != nullptr) {
      // The handle's release (its id, lease token and blocks), for on_kv_done and confirm_kv.
      const v1::ReleaseRequest rel = ReleaseRequestFor(p.kv_handle());
      // The lease runs from the prefill: renewed while the request waits here, until its KV
      // has been pulled (confirm_kv) or it ends without a pull (on_kv_done).
      const uint64_t kept =
          svc->context_.KeepLease(r->kv_source->server_address, rel, p.kv_handle().lease_ms());
      // Once no rank touches the blocks any more, the context server may free them.
      r->on_kv_done = [svc, address = r->kv_source->server_address, rel, kept](const Status&) {
        svc->context_.DropLease(kept);
        svc->context_.Release(address, rel);
      };
      // Before any rank pulls: the handle must be one its context server gave out (its rkey,
      // worker address and block addresses go to UCX, which aborts on a bad rkey and reads
      // any address it is given). Asked without blocking a gRPC thread.
      r->check_kv_source = [svc, src = r->kv_source](std::function<void(const Status&)> verdict) {
        svc->context_.CheckExport(*src, [svc, verdict](const Status& v) {
          verdict(v);
          svc->Kick();
        });
      };
      // After a pull that landed: the release also confirms the context server still held
      // the KV (an expired lease may have let another prompt overwrite it mid-pull).
      r->confirm_kv = [svc, address = r->kv_source->server_address, rel,
                       kept](std::function<void(const Status&)> verdict) {
        svc->context_.DropLease(kept);
        svc->context_.Confirm(address, rel, [svc, verdict](const Status& v) {
          verdict(v);
          svc->Kick();
        });
      };
    }
    std::function<void(const Status&)> release = r->on_kv_done;
    StatusOr<std::string> id = svc_->engine_->Submit(std::move(*r));
    if (!id.ok()) {
      if (release) release(id.status());  // refused: the context server may free the KV now
      svc_->in_flight_.fetch_sub(1);
      return FinishNow(ToGrpc(id.status()));
    }
    request_id_ = *id;
    svc_->Kick();
  }

  GenerationService* svc_;
  std::shared_ptr<StreamShared> shared_;
  std::string request_id_;
};

GenerationService::GenerationService(std::unique_ptr<Engine> engine,
                                     GenerationServiceOptions options)
    : context_(std::chrono::milliseconds(5000), options.kv_check_timeout),
      engine_(std::move(engine)),
      options_(std::move(options)),
      total_blocks_(engine_->kv_stats().total_blocks),
      block_bytes_(engine_->kv_stats().block_bytes),
      tokens_per_block_(engine_->kv_stats().tokens_per_block),
      free_blocks_(engine_->kv_stats().free_blocks) {
  thread_ = std::thread([this] { Loop(); });
}

GenerationService::~GenerationService() { Stop(std::chrono::milliseconds(0)); }

void GenerationService::Kick() {
  std::lock_guard<std::mutex> lock(mu_);
  kicked_ = true;
  cv_.notify_one();
}

void GenerationService::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (stop_) break;
    }
    // Also while requests only wait for verdicts (Step runs nothing then).
    if (!engine_->Heartbeat(options_.heartbeat).ok()) UpdateHealth();
    if (engine_->HasWork()) {
      const bool ran = engine_->Step();
      free_blocks_ = engine_->kv_stats().free_blocks;
      UpdateHealth();
      if (!ran) {
        // Queued requests wait for batch slots held by requests awaiting a verdict (handle
        // check, release): wait for a kick instead of spinning.
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(5), [&] { return kicked_ || stop_; });
        kicked_ = false;
      }
      continue;
    }
    std::unique_lock<std::mutex> lock(mu_);
    // Woken often enough for the heartbeat to go out on time.
    cv_.wait_for(
        lock,
        std::min<std::chrono::milliseconds>(std::chrono::milliseconds(100), options_.heartbeat / 4),
        [&] { return kicked_ || stop_; });
    kicked_ = false;
  }
  // Whatever is still queued or running ends now, with a clear status, and so does any request
  // a stream admitted before Stop but submits only now (Close refuses it).
  engine_->Close(Unavailable("the server is shutting down"));
  // The engine itself lives until the service is destroyed (a leader's destructor then tells
  // its worker ranks to exit): RPCs that arrive while the gRPC server shuts down may still
  // call it.
}

void GenerationService::UpdateHealth() {
  const bool ok = engine_->broken().ok();
  if (ok == healthy_.load()) return;
  healthy_ = ok;
  if (!ok) {
    HELIX_LOG(kError) << "gen: the instance lost a rank; health is NOT_SERVING";
  }
  if (health_listener_) health_listener_(ok);
}

void GenerationService::Stop(std::chrono::milliseconds drain) {
  accepting_ = false;
  const auto deadline = std::chrono::steady_clock::now() + drain;
  while (in_flight_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
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

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  return new Stream(this, ctx, request);
}

grpc::Status GenerationService::CheckAuth(const grpc::CallbackServerContext* ctx) const {
  return CheckBearer(ctx->client_metadata(), options_.api_key);
}

grpc::ServerUnaryReactor* GenerationService::Cancel(grpc::CallbackServerContext* ctx,
                                                    const v1::CancelRequest* request,
                                                    v1::CancelResponse* /*response*/) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  if (grpc::Status auth = CheckAuth(ctx); !auth.ok()) {
    r->Finish(auth);
    return r;
  }
  if (request->request_id().empty()) {
    r->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id is empty"));
    return r;
  }
  engine_->Cancel(request->request_id());
  Kick();
  r->Finish(grpc::Status::OK);
  return r;
}

grpc::ServerUnaryReactor* GenerationService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                           const v1::GetServerInfoRequest*,
                                                           v1::ServerInfo* info) {
  if (grpc::Status auth = CheckAuth(ctx); !auth.ok()) {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    r->Finish(auth);
    return r;
  }
  const parallel::HelixLayout& l = engine_->layout();
  info->set_model_name(options_.model_name);
  info->set_model_fingerprint(engine_->model_fingerprint());
  info->set_tensor_parallel_size(l.tp);
  info->set_context_parallel_size(l.cp);
  info->set_cp_type(l.cp > 1 ? "HELIX" : "");
  info->set_tokens_per_block(static_cast<int32_t>(tokens_per_block_));
  info->set_kv_total_blocks(total_blocks_);
  info->set_kv_free_blocks(free_blocks_.load());
  info->set_kv_block_bytes(block_bytes_);
  info->set_kv_dtype(options_.kv_dtype);
  info->set_max_seq_len(engine_->max_seq_len());
  info->set_version(kVersion);
  const DisaggStats d = engine_->disagg_stats();
  info->set_kv_transfers_done(static_cast<int64_t>(d.transfers_done));
  info->set_kv_transfers_failed(static_cast<int64_t>(d.transfers_failed));
  info->set_kv_transfers_cancelled(static_cast<int64_t>(d.transfers_cancelled));
  const RequestCounts n = engine_->request_counts();
  info->set_num_requests_running(n.running);
  info->set_num_requests_waiting(n.waiting);
  ToProto(engine_->kv_layout(), info->mutable_kv_layout());
  info->set_kv_preemptions(engine_->preemptions());
  info->set_max_num_tokens(engine_->max_num_tokens());
  info->set_capacity_scheduler_policy(engine_->kv_preemption() ? "MAX_UTILIZATION"
                                                               : "GUARANTEED_NO_EVICT");
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  r->Finish(grpc::Status::OK);
  return r;
}

}  // namespace helix::server
