// The router's core, shared by its HTTP (OpenAI) and gRPC fronts: pools of context and
// generation servers with health polling, ejection and re-admission, routing policies, the
// pairing check, and Run(), which takes one tokenised request through a context server (KV
// hand-off) or straight to a generation server and streams the tokens back, detokenised here.
// Thread-safety: Router is thread-safe; Run blocks its caller's thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "engine/tokenizer/tokenizer.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "helix/v1/context.grpc.pb.h"
#include "helix/v1/generation.grpc.pb.h"
#include "server/config/router_config.h"
#include "server/router/chat_template.h"

namespace helix::router {

using Clock = std::chrono::system_clock;

// One server the router talks to.
struct Backend {
  std::string url;
  bool context = false;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::GenerationService::Stub> gen;
  std::unique_ptr<v1::ContextService::Stub> ctx;
  std::unique_ptr<grpc::health::v1::Health::Stub> health;
  std::atomic<bool> healthy{false};
  std::atomic<int64_t> outstanding_requests{0};
  std::atomic<int64_t> outstanding_tokens{0};  // prompt + max_tokens of requests in flight
  std::atomic<uint64_t> requests_total{0}, failures_total{0};
  mutable std::mutex mu;
  v1::ServerInfo info;     // GUARDED_BY(mu): the last GetServerInfo
  bool have_info = false;  // GUARDED_BY(mu)
};

// Chooses among healthy candidates; the interface leaves room for KV-aware routing (the
// request's prompt is passed along).
class RoutingPolicy {
 public:
  virtual ~RoutingPolicy() = default;
  virtual Backend* Pick(const std::vector<Backend*>& candidates,
                        const std::vector<int32_t>& prompt) = 0;
};
std::unique_ptr<RoutingPolicy> MakePolicy(const std::string& type);  // round_robin | load_balancing

struct RouteRequest {
  v1::GenerateRequest proto;  // token_ids prompt, sampling, max_tokens, stop ids, top_logprobs
  std::vector<std::string> stop;
  // Whether the client has gone away (optional; thread-safe: asked on the router's watcher
  // thread every ~100 ms while Run waits on a server). When it says so, the call in progress
  // (prefill or generation) is cancelled at once, so a client that leaves while no token is
  // coming (a long prefill, a non-streaming request) frees its server's work and KV.
  std::function<bool()> client_gone;
};

struct RouteEvent {
  int32_t token = -1;  // on the final event: the stop token that ended it, or -1
  std::string text;    // UTF-8 delta, stop strings cut
  // Characters (code points) of detokenised text this token produced before stop strings held
  // any back (the completion's text_offset advances by these, counted in characters as OpenAI
  // and vLLM count them; a stop string may delay `text` to a later event).
  size_t token_text_chars = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top_logprobs;
  bool finished = false;
  std::string finish_reason;  // stop | length (on the final event)
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

struct RouterStats {
  uint64_t requests = 0, disaggregated = 0, aggregated = 0, errors = 0, context_retries = 0;
  uint64_t prompt_tokens = 0, completion_tokens = 0;
  int64_t in_flight = 0;
};

class Router {
 public:
  Router(const config::RouterConfig& cfg, std::unique_ptr<Tokenizer> tokenizer);
  ~Router();

  const Tokenizer& tokenizer() const { return *tokenizer_; }
  ChatStyle chat_style() const { return chat_style_; }
  // The system message the chat template writes when a conversation has none (ChatML).
  const std::string& chat_default_system() const { return chat_default_system_; }
  const std::string& model_name() const { return model_name_; }

  // Takes the request through the servers, calling `sink` for every event (in order, on this
  // thread); `sink` returning false, or r.client_gone saying so, means the client is gone: the
  // request is cancelled (CANCELLED, not counted as an error). One deadline,
  // request_timeout_ms from the call, covers the prefill, the generation and any retries; a
  // request that runs out of it fails alone (DEADLINE_EXCEEDED): only an unreachable server
  // (UNAVAILABLE) is ejected and the request retried on another (when nothing was streamed yet).
  // Returns OK after the final event, else the error (gRPC codes: UNAVAILABLE when no server
  // can take it, RESOURCE_EXHAUSTED when they are full, INVALID_ARGUMENT / FAILED_PRECONDITION
  // from the servers, ...). Events may have been sent before an error.
  grpc::Status Run(const RouteRequest& r, const std::function<bool(const RouteEvent&)>& sink);

  // A place among max_inflight_requests for one request, held (by both fronts) from its
  // admission until the returned handle is dropped: after Run, or when a stream's provider is
  // done. nullptr when every place is taken (answer 429 / RESOURCE_EXHAUSTED).
  // `places`: a request running several choices at once takes one place for each.
  std::shared_ptr<void> Admit(int64_t places = 1);
  int64_t max_inflight_requests() const { return cfg_.max_inflight_requests; }

  // At least one generation server is healthy and, with context servers configured, paired
  // with a healthy compatible context server.
  bool Ready() const;
  bool has_context_servers() const { return !ctx_.empty(); }
  // The smallest max_seq_len among the healthy generation servers (0 when none is known).
  int64_t max_seq_len() const;
  // Chat's max_tokens when the request names none: what the context leaves after the prompt
  // (vLLM's default), at most 1024 unless every healthy generation server known preempts
  // (capacity_scheduler_policy MAX_UTILIZATION, which reserves KV as it is used; then at most
  // what keeps the request preemptible: prompt + max_tokens - 1 within max_num_tokens), and at
  // most what the smallest of their KV pools can hold for one request.
  // max_seq_len: the context (max_seq_len() above, as the caller read it).
  int64_t ChatDefaultMaxTokens(int64_t prompt_len, int64_t max_seq_len) const;
  // A healthy generation server's ServerInfo (GetServerInfo of the router's gRPC front).
  bool GenerationInfo(v1::ServerInfo* out) const;
  RouterStats stats() const;
  // Prometheus text exposition of the router's counters and each backend's state.
  std::string MetricsText() const;
  // Polls every backend once now (tests; the poller does it every interval).
  void PollNow();

 private:
  void PollLoop();
  void Poll(Backend* b);
  void MarkDown(Backend* b, const std::string& why);
  std::vector<Backend*> Healthy(const std::vector<std::unique_ptr<Backend>>& pool) const;
  // Whether a context server's KV can go to a generation server (logs a refusal once).
  bool Compatible(Backend* ctx, Backend* gen) const;
  // A Run in progress whose client can go away: the watcher asks `gone` and cancels `call`.
  struct Watched {
    std::function<bool()> gone;
    std::mutex mu;
    grpc::ClientContext* call = nullptr;  // GUARDED_BY(mu): the RPC in progress
    bool cancelled = false;               // GUARDED_BY(mu)
  };
  // Makes `cc` the call the watcher cancels (false: already cancelled; do not start it); then
  // Disarm before cc goes away.
  static bool Arm(Watched* w, grpc::ClientContext* cc);
  static void Disarm(Watched* w);
  static bool Cancelled(Watched* w);
  void WatchLoop();
  // used: the context server that answered (or nullptr).
  grpc::Status Prefill(const RouteRequest& r, Backend* gen, Clock::time_point deadline, Watched* w,
                       v1::PrefillResponse* out, Backend** used);

  config::RouterConfig cfg_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ChatStyle chat_style_ = ChatStyle::kNone;
  std::string chat_default_system_;
  std::string model_name_;
  std::vector<std::unique_ptr<Backend>> ctx_, gen_;
  std::unique_ptr<RoutingPolicy> ctx_policy_, gen_policy_;
  mutable std::mutex policy_mu_;  // policies are not thread-safe themselves
  mutable std::mutex log_mu_;
  mutable std::set<std::string> refused_;  // GUARDED_BY(log_mu_): pairs already logged
  std::atomic<uint64_t> requests_{0}, disaggregated_{0}, aggregated_{0}, errors_{0};
  std::atomic<uint64_t> context_retries_{0}, prompt_tokens_{0}, completion_tokens_{0};
  std::atomic<int64_t> in_flight_{0};
  std::atomic<int64_t> admitted_{0};  // Admit's places taken
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  bool stop_ = false;  // GUARDED_BY(stop_mu_)
  std::thread poller_;
  std::mutex watched_mu_;
  std::set<Watched*> watched_;  // GUARDED_BY(watched_mu_)
  std::thread watcher_;
};

}  // namespace helix::router
