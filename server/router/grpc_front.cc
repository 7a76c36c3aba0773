#include "server/router/grpc_front.h"

#include <cstdio>
#include <random>

#include "server/common/kv_proto.h"
#include "server/common/serve_setup.h"

namespace helix::router {

std::string NewIdPrefix() {
  std::random_device rd;
  const uint64_t r = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(r));
  return std::string("rt-") + buf + "-";
}

grpc::Status RouterGrpcService::CheckAuth(const grpc::ServerContext* ctx) const {
  return server::CheckBearer(ctx->client_metadata(), api_key_);
}

grpc::Status RouterGrpcService::Generate(grpc::ServerContext* ctx,
                                         const v1::GenerateRequest* request,
                                         grpc::ServerWriter<v1::GenerateResponse>* writer) {
  if (grpc::Status a = CheckAuth(ctx); !a.ok()) return a;
  if (request->has_kv_handle() || request->has_first_token()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "kv_handle / first_token: the router does the hand-off itself; send the "
                        "prompt alone");
  }
  if (request->max_tokens() < 1) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "max_tokens must be >= 1");
  }
  RouteRequest r;
  r.proto = *request;
  const Tokenizer& tok = router_->tokenizer();
  if (request->has_text()) {
    const bool bos = request->has_add_bos() ? request->add_bos() : true;
    const std::vector<int32_t> ids = tok.Encode(request->text(), bos);
    if (ids.empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "prompt.text is empty");
    }
    r.proto.mutable_token_ids()->mutable_ids()->Assign(ids.begin(), ids.end());
  } else if (!request->has_token_ids() || request->token_ids().ids().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "prompt: give text or token_ids");
  }
  // The servers' context, checked here as the HTTP front does (a context server would
  // otherwise refuse the prompt with its own prefill-only max_tokens of 1 in the message).
  const int64_t prompt_len = r.proto.token_ids().ids_size();
  if (const int64_t max_seq_len = router_->max_seq_len();
      max_seq_len > 0 && prompt_len + request->max_tokens() > max_seq_len) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "the prompt (" + std::to_string(prompt_len) + " tokens) plus max_tokens (" +
                            std::to_string(request->max_tokens()) +
                            ") exceeds the model's context of " + std::to_string(max_seq_len) +
                            " tokens");
  }
  // Stop strings are matched here at every token: bounded as the generation servers bound them.
  if (Status st = server::CheckStops(*request); !st.ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, st.message());
  }
  r.stop.assign(request->stop().begin(), request->stop().end());
  // After the request's own checks, so that a malformed one is told so even at the limit.
  std::shared_ptr<void> slot = router_->Admit();  // until Run returns
  if (slot == nullptr) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "too many requests in flight (max_inflight_requests); retry later");
  }
  std::string id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Unique across router processes too: context servers key retained KV by request id.
    id = request->request_id().empty() ? id_prefix_ + std::to_string(next_id_++)
                                       : request->request_id();
    if (!active_.insert(id).second) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          "request_id '" + id + "' is already in flight");
    }
  }
  r.proto.set_request_id(id);
  r.client_gone = [&] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_.count(id)) return true;
    }
    return ctx->IsCancelled();
  };
  grpc::Status st = router_->Run(r, [&](const RouteEvent& ev) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cancelled_.count(id)) return false;
    }
    if (ctx->IsCancelled()) return false;
    v1::GenerateResponse m;
    m.set_request_id(id);
    m.set_token_id(ev.token);
    m.set_text(ev.text);
    m.set_logprob(ev.logprob);
    for (const auto& [t, lp] : ev.top_logprobs) {
      v1::TopLogprob* x = m.add_top_logprobs();
      x->set_token_id(t);
      x->set_logprob(lp);
    }
    if (ev.finished) {
      m.set_finish_reason(ev.finish_reason == "stop" ? v1::FINISH_REASON_STOP
                                                     : v1::FINISH_REASON_LENGTH);
      m.mutable_usage()->set_prompt_tokens(ev.prompt_tokens);
      m.mutable_usage()->set_completion_tokens(ev.completion_tokens);
    }
    return writer->Write(m);
  });
  {
    std::lock_guard<std::mutex> lock(mu_);
    active_.erase(id);
    cancelled_.erase(id);
  }
  return st;
}

grpc::Status RouterGrpcService::Cancel(grpc::ServerContext* ctx, const v1::CancelRequest* request,
                                       v1::CancelResponse*) {
  if (grpc::Status a = CheckAuth(ctx); !a.ok()) return a;
  std::lock_guard<std::mutex> lock(mu_);
  if (active_.count(request->request_id())) cancelled_.insert(request->request_id());
  return grpc::Status::OK;
}

grpc::Status RouterGrpcService::GetServerInfo(grpc::ServerContext* ctx,
                                              const v1::GetServerInfoRequest*,
                                              v1::ServerInfo* info) {
  if (grpc::Status a = CheckAuth(ctx); !a.ok()) return a;
  if (!router_->GenerationInfo(info)) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "no healthy generation server");
  }
  info->set_model_name(router_->model_name());
  return grpc::Status::OK;
}

}  // namespace helix::router
