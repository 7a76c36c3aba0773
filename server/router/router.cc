#include "server/router/router.h"

#include <algorithm>
#include <sstream>

#include "engine/common/log.h"
#include "engine/request/stop_matcher.h"
#include "server/common/kv_proto.h"

namespace helix::router {
namespace {

class RoundRobin final : public RoutingPolicy {
 public:
  Backend* Pick(const std::vector<Backend*>& c, const std::vector<int32_t>&) override {
    if (c.empty()) return nullptr;
    return c[next_++ % c.size()];
  }

 private:
  uint64_t next_ = 0;
};

// Least outstanding tokens (prompt + max_tokens of requests in flight), then least requests;
// ties go round robin so equal servers share the load.
class LoadBalancing final : public RoutingPolicy {
 public:
  Backend* Pick(const std::vector<Backend*>& c, const std::vector<int32_t>&) override {
    if (c.empty()) return nullptr;
    Backend* best = nullptr;
    const size_t start = next_++ % c.size();
    for (size_t k = 0; k < c.size(); ++k) {
      Backend* b = c[(start + k) % c.size()];
      if (best == nullptr ||
          std::make_pair(b->outstanding_tokens.load(), b->outstanding_requests.load()) <
              std::make_pair(best->outstanding_tokens.load(), best->outstanding_requests.load())) {
        best = b;
      }
    }
    return best;
  }

 private:
  uint64_t next_ = 0;
};

std::unique_ptr<Backend> MakeBackend(const std::string& url, bool context) {
  auto b = std::make_unique<Backend>();
  b->url = url;
  b->context = context;
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  b->channel = grpc::CreateCustomChannel(url, grpc::InsecureChannelCredentials(), args);
  if (context) {
    b->ctx = v1::ContextService::NewStub(b->channel);
  } else {
    b->gen = v1::GenerationService::NewStub(b->channel);
  }
  b->health = grpc::health::v1::Health::NewStub(b->channel);
  return b;
}

// RAII: a request counted against a backend's load.
class Load {
 public:
  Load(Backend* b, int64_t tokens) : b_(b), tokens_(tokens) {
    ++b_->outstanding_requests;
    b_->outstanding_tokens += tokens_;
    ++b_->requests_total;
  }
  ~Load() {
    --b_->outstanding_requests;
    b_->outstanding_tokens -= tokens_;
  }

 private:
  Backend* b_;
  int64_t tokens_;
};

// An unreachable server: ejected, and the request tried on another. A deadline is the
// request's own (one covers all its calls): it fails that request alone. ABORTED from a
// generation server (a KV hand-off its context server failed) fails the request alone too: the
// generation server is not taken out of the pool for it.
bool Retryable(const grpc::Status& s) { return s.error_code() == grpc::StatusCode::UNAVAILABLE; }

grpc::Status ClientGone() {
  return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
}

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

std::unique_ptr<RoutingPolicy> MakePolicy(const std::string& type) {
  if (type == "load_balancing") return std::make_unique<LoadBalancing>();
  return std::make_unique<RoundRobin>();
}

Router::Router(const config::RouterConfig& cfg, std::unique_ptr<Tokenizer> tokenizer)
    : cfg_(cfg), tokenizer_(std::move(tokenizer)) {
  const std::string& t = cfg_.chat_template;
  chat_style_ = t == "chatml"   ? ChatStyle::kChatML
                : t == "llama3" ? ChatStyle::kLlama3
                : t == "llama2" ? ChatStyle::kLlama2
                : t.empty()     ? DetectChatStyle(tokenizer_->chat_template())
                                : DetectChatStyle(t);
  // A ChatML template's own default system message (the model's, unless the config gives a
  // whole template).
  const bool named = t.empty() || t == "chatml" || t == "llama3" || t == "llama2";
  if (chat_style_ == ChatStyle::kChatML) {
    chat_default_system_ = DefaultSystemPrompt(named ? tokenizer_->chat_template() : t);
  }
  if (chat_style_ == ChatStyle::kNone && !(t.empty() && tokenizer_->chat_template().empty())) {
    HELIX_LOG(kWarn) << "router: the chat template is not one the router can apply (ChatML, "
                        "Llama 3, Llama 2): chat requests will be refused";
  }
  model_name_ = cfg_.served_model_name;
  for (const std::string& u : cfg_.context_servers.urls) ctx_.push_back(MakeBackend(u, true));
  for (const std::string& u : cfg_.generation_servers.urls) gen_.push_back(MakeBackend(u, false));
  ctx_policy_ = MakePolicy(cfg_.context_servers.router_type);
  gen_policy_ = MakePolicy(cfg_.generation_servers.router_type);
  poller_ = std::thread([this] { PollLoop(); });
  watcher_ = std::thread([this] { WatchLoop(); });
}

Router::~Router() {
  {
    std::lock_guard<std::mutex> lock(stop_mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (poller_.joinable()) poller_.join();
  if (watcher_.joinable()) watcher_.join();
}

bool Router::Arm(Watched* w, grpc::ClientContext* cc) {
  if (w == nullptr) return true;
  std::lock_guard<std::mutex> lock(w->mu);
  w->call = cc;
  return !w->cancelled;
}

void Router::Disarm(Watched* w) {
  if (w == nullptr) return;
  std::lock_guard<std::mutex> lock(w->mu);
  w->call = nullptr;
}

bool Router::Cancelled(Watched* w) {
  if (w == nullptr) return false;
  std::lock_guard<std::mutex> lock(w->mu);
  return w->cancelled;
}

void Router::WatchLoop() {
  constexpr auto kEvery = std::chrono::milliseconds(100);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(watched_mu_);
      for (Watched* w : watched_) {
        if (Cancelled(w) || !w->gone()) continue;
        std::lock_guard<std::mutex> wl(w->mu);
        w->cancelled = true;
        if (w->call != nullptr) w->call->TryCancel();
      }
    }
    std::unique_lock<std::mutex> lock(stop_mu_);
    if (stop_cv_.wait_for(lock, kEvery, [&] { return stop_; })) return;
  }
}

void Router::PollLoop() {
  // Every backend each interval; an ejected one (a failed check, or a request that found it
  // down) also every kRecheck in between, so that one failed check does not keep a server out
  // for a long interval.
  constexpr auto kRecheck = std::chrono::milliseconds(1000);
  const auto interval = std::chrono::milliseconds(cfg_.health_check_interval_ms);
  auto next_full = std::chrono::steady_clock::now();
  for (;;) {
    if (std::chrono::steady_clock::now() >= next_full) {
      PollNow();
      next_full = std::chrono::steady_clock::now() + interval;
    } else {
      for (auto* pool : {&ctx_, &gen_}) {
        for (auto& b : *pool) {
          if (!b->healthy.load()) Poll(b.get());
        }
      }
    }
    const auto wake = std::min(next_full, std::chrono::steady_clock::now() + kRecheck);
    std::unique_lock<std::mutex> lock(stop_mu_);
    if (stop_cv_.wait_until(lock, wake, [&] { return stop_; })) {
      return;
    }
  }
}

void Router::PollNow() {
  for (auto& b : ctx_) Poll(b.get());
  for (auto& b : gen_) Poll(b.get());
}

void Router::Poll(Backend* b) {
  grpc::ClientContext hc;
  hc.set_deadline(Clock::now() + std::chrono::milliseconds(1000));
  grpc::health::v1::HealthCheckRequest hreq;
  grpc::health::v1::HealthCheckResponse hresp;
  grpc::Status st = b->health->Check(&hc, hreq, &hresp);
  std::string why;
  bool ok = st.ok() && hresp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  if (!st.ok()) {
    why = "health check failed: " + st.error_message();
  } else if (!ok) {
    why = "health says NOT_SERVING";
  }
  v1::ServerInfo info;
  if (ok) {
    grpc::ClientContext ic;
    ic.set_deadline(Clock::now() + std::chrono::milliseconds(1000));
    v1::GetServerInfoRequest ireq;
    st = b->context ? b->ctx->GetServerInfo(&ic, ireq, &info)
                    : b->gen->GetServerInfo(&ic, ireq, &info);
    if (!st.ok()) {
      ok = false;
      why = "GetServerInfo failed: " + st.error_message();
    }
  }
  if (ok) {
    std::lock_guard<std::mutex> lock(b->mu);
    b->info = info;
    b->have_info = true;
  }
  const bool was = b->healthy.exchange(ok);
  if (was != ok) {
    const std::string what = std::string("router: ") + (b->context ? "context" : "generation") +
                             " server " + b->url +
                             (ok ? " is healthy: admitted" : " ejected: " + why);
    if (ok) {
      HELIX_LOG(kInfo) << what;
    } else {
      HELIX_LOG(kWarn) << what;
    }
  }
}

void Router::MarkDown(Backend* b, const std::string& why) {
  ++b->failures_total;
  if (b->healthy.exchange(false)) {
    HELIX_LOG(kWarn) << "router: " << (b->context ? "context" : "generation") << " server "
                     << b->url << " ejected: " << why;
  }
}

std::vector<Backend*> Router::Healthy(const std::vector<std::unique_ptr<Backend>>& pool) const {
  std::vector<Backend*> out;
  for (const auto& b : pool) {
    if (b->healthy.load()) out.push_back(b.get());
  }
  return out;
}

bool Router::Compatible(Backend* ctx, Backend* gen) const {
  v1::ServerInfo ci, gi;
  {
    std::lock_guard<std::mutex> lock(ctx->mu);
    if (!ctx->have_info) return false;
    ci = ctx->info;
  }
  {
    std::lock_guard<std::mutex> lock(gen->mu);
    if (!gen->have_info) return false;
    gi = gen->info;
  }
  std::string why;
  if (ci.model_fingerprint() != gi.model_fingerprint()) {
    why = "model fingerprints differ (" + ci.model_fingerprint() + " vs " + gi.model_fingerprint() +
          ")";
  } else if (ci.tokens_per_block() != gi.tokens_per_block()) {
    why = "tokens_per_block differs (" + std::to_string(ci.tokens_per_block()) + " vs " +
          std::to_string(gi.tokens_per_block()) + ")";
  } else if (ci.kv_layout().dtype() != gi.kv_layout().dtype()) {
    why = "KV dtype differs (" + ci.kv_layout().dtype() + " vs " + gi.kv_layout().dtype() + ")";
  }
  if (why.empty()) return true;
  std::lock_guard<std::mutex> lock(log_mu_);
  if (refused_.insert(ctx->url + "|" + gen->url + "|" + why).second) {
    HELIX_LOG(kWarn) << "router: not pairing context server " << ctx->url
                     << " with generation server " << gen->url << ": " << why;
  }
  return false;
}

bool Router::Ready() const {
  for (Backend* g : Healthy(gen_)) {
    if (ctx_.empty() || cfg_.max_local_prefill_length > 0) return true;
    for (Backend* c : Healthy(ctx_)) {
      if (Compatible(c, g)) return true;
    }
  }
  return false;
}

int64_t Router::max_seq_len() const {
  int64_t best = 0;
  for (Backend* g : Healthy(gen_)) {
    std::lock_guard<std::mutex> lock(g->mu);
    if (g->have_info && (best == 0 || g->info.max_seq_len() < best)) best = g->info.max_seq_len();
  }
  return best;
}

int64_t Router::ChatDefaultMaxTokens(int64_t prompt_len, int64_t max_seq_len) const {
  if (max_seq_len <= prompt_len) return 16;
  int64_t pool = 0, pass = 0;
  bool all_preempt = true, known = false;
  for (Backend* g : Healthy(gen_)) {
    std::lock_guard<std::mutex> lock(g->mu);
    if (!g->have_info) {  // not heard from yet: take it for one that reserves everything
      all_preempt = false;
      continue;
    }
    const v1::ServerInfo& i = g->info;
    known = true;
    all_preempt = all_preempt && i.capacity_scheduler_policy() == "MAX_UTILIZATION";
    // A request stays preemptible while its recompute fits one pass.
    if (i.max_num_tokens() > 0 && (pass == 0 || i.max_num_tokens() < pass)) {
      pass = i.max_num_tokens();
    }
    // Positions one request can hold: CP rank 0 (the largest share) holds one block in cp.
    const int64_t cp = std::max<int64_t>(1, i.context_parallel_size());
    const int64_t hold = i.kv_total_blocks() * cp * i.tokens_per_block();
    if (hold > 0 && (pool == 0 || hold < pool)) pool = hold;
  }
  int64_t n = max_seq_len - prompt_len;
  if (!known || !all_preempt) n = std::min<int64_t>(n, 1024);
  // Past one pass a request would reserve its whole KV at admission even there.
  if (known && all_preempt && pass > 0) n = std::min<int64_t>(n, pass - prompt_len + 1);
  // A request holds the KV of its prompt and of every generated token but the last.
  if (pool > 0) n = std::min<int64_t>(n, pool - prompt_len + 1);
  return std::max<int64_t>(n, 1);
}

bool Router::GenerationInfo(v1::ServerInfo* out) const {
  for (Backend* g : Healthy(gen_)) {
    std::lock_guard<std::mutex> lock(g->mu);
    if (g->have_info) {
      *out = g->info;
      return true;
    }
  }
  return false;
}

grpc::Status Router::Prefill(const RouteRequest& r, Backend* gen, Clock::time_point deadline,
                             Watched* w, v1::PrefillResponse* out, Backend** used) {
  *used = nullptr;
  std::vector<Backend*> candidates;
  for (Backend* c : Healthy(ctx_)) {
    if (Compatible(c, gen)) candidates.push_back(c);
  }
  const std::vector<int32_t> prompt(r.proto.token_ids().ids().begin(),
                                    r.proto.token_ids().ids().end());
  grpc::Status last(grpc::StatusCode::UNAVAILABLE,
                    "no healthy context server is compatible with generation server " + gen->url);
  for (int64_t attempt = 0; attempt <= cfg_.max_retries && !candidates.empty(); ++attempt) {
    Backend* c;
    {
      std::lock_guard<std::mutex> lock(policy_mu_);
      c = ctx_policy_->Pick(candidates, prompt);
    }
    Load load(c, static_cast<int64_t>(prompt.size()));
    grpc::ClientContext cc;
    cc.set_deadline(deadline);
    v1::PrefillRequest pre;
    *pre.mutable_request() = r.proto;
    // The watcher does not cancel a prefill: one cancelled just as the context server answers
    // would leave KV there that nobody holds a handle for (until the lease ends); the context
    // server computes the prefill anyway. A client that left meanwhile has it released below.
    if (Cancelled(w)) return ClientGone();
    last = c->ctx->Prefill(&cc, pre, out);
    *used = last.ok() ? c : nullptr;  // holds KV now, even if the client left meanwhile
    if (Cancelled(w)) return ClientGone();
    // A full context server (RESOURCE_EXHAUSTED) is busy, not down: the next one is tried and
    // this one stays in the pool.
    const bool busy = last.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
    if (last.ok() || !(Retryable(last) || busy)) return last;
    if (!busy) MarkDown(c, "prefill failed: " + last.error_message());
    ++context_retries_;
    candidates.erase(std::find(candidates.begin(), candidates.end(), c));
  }
  return last;
}

std::shared_ptr<void> Router::Admit(int64_t places) {
  int64_t n = admitted_.load();
  do {
    if (n + places > cfg_.max_inflight_requests) return nullptr;
  } while (!admitted_.compare_exchange_weak(n, n + places));
  return std::shared_ptr<void>(this, [places](Router* self) { self->admitted_ -= places; });
}

grpc::Status Router::Run(const RouteRequest& r,
                         const std::function<bool(const RouteEvent&)>& sink) {
  ++requests_;
  ++in_flight_;
  Watched watched;
  Watched* w = nullptr;
  if (r.client_gone) {
    watched.gone = r.client_gone;
    w = &watched;
    std::lock_guard<std::mutex> lock(watched_mu_);
    watched_.insert(w);
  }
  struct Done {
    Router* self;
    Watched* w;
    ~Done() {
      if (w != nullptr) {
        std::lock_guard<std::mutex> lock(self->watched_mu_);
        self->watched_.erase(w);
      }
      --self->in_flight_;
    }
  } done{this, w};
  const auto deadline = Clock::now() + std::chrono::milliseconds(cfg_.request_timeout_ms);
  const std::vector<int32_t> prompt(r.proto.token_ids().ids().begin(),
                                    r.proto.token_ids().ids().end());
  const bool disagg =
      !ctx_.empty() && static_cast<int64_t>(prompt.size()) > cfg_.max_local_prefill_length;
  grpc::Status st;
  std::vector<Backend*> full;  // answered RESOURCE_EXHAUSTED: busy, not down
  for (int64_t attempt = 0; attempt <= cfg_.max_retries; ++attempt) {
    std::vector<Backend*> gens = Healthy(gen_);
    if (gens.empty()) {
      ++errors_;
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "no healthy generation server");
    }
    std::erase_if(gens,
                  [&](Backend* b) { return std::find(full.begin(), full.end(), b) != full.end(); });
    if (gens.empty()) break;  // every healthy one is full: st says so
    Backend* g;
    {
      std::lock_guard<std::mutex> lock(policy_mu_);
      g = gen_policy_->Pick(gens, prompt);
    }
    // Counted from the pick, so requests still in prefill weigh on the server they will use.
    Load load(g, static_cast<int64_t>(prompt.size()) + r.proto.max_tokens());
    v1::GenerateRequest req = r.proto;
    v1::PrefillResponse pre;
    Backend* prefilled_on = nullptr;
    // The KV the context server retains for this attempt, freed when the attempt fails (the
    // generation server may never have pulled it; the lease would free it later).
    auto release_kv = [&] {
      if (prefilled_on == nullptr) return;
      grpc::ClientContext rc;
      rc.set_deadline(Clock::now() + std::chrono::milliseconds(2000));
      v1::ReleaseRequest rel = server::ReleaseRequestFor(pre.kv_handle());
      v1::ReleaseResponse rr;
      (void)prefilled_on->ctx->Release(&rc, rel, &rr);
    };
    if (disagg) {
      st = Prefill(r, g, deadline, w, &pre, &prefilled_on);
      if (!st.ok()) {
        if (Cancelled(w)) {
          release_kv();  // the client may have left just as the prefill answered
          return st;
        }
        ++errors_;
        return st;
      }
      *req.mutable_token_ids() = pre.prompt_token_ids();
      req.set_first_token(pre.first_token());
      *req.mutable_kv_handle() = pre.kv_handle();
    }
    grpc::ClientContext gc;
    gc.set_deadline(deadline);
    if (!Arm(w, &gc)) {
      release_kv();
      return ClientGone();
    }
    // Disarmed before gc goes out of scope, whichever way this attempt ends.
    struct DisarmAtEnd {
      Watched* w;
      ~DisarmAtEnd() { Disarm(w); }
    } disarm{w};
    auto reader = g->gen->Generate(&gc, req);
    IncrementalDetokenizer detok(*tokenizer_, prompt.empty() ? -1 : prompt.back(),
                                 /*skip_control=*/true);  // as the generation server's text
    StopMatcher stops(r.stop, r.proto.include_stop_str_in_output());
    v1::GenerateResponse m;
    int64_t streamed = 0;
    bool ended = false;
    // The logprobs of message m's token; the first token's, when the context server sampled it,
    // travel with the prefill.
    auto take_logprobs = [&](RouteEvent* e) {
      const bool prefilled = streamed == 0 && disagg;
      e->logprob = prefilled ? pre.first_token_logprob() : m.logprob();
      for (const auto& t : prefilled ? pre.top_logprobs() : m.top_logprobs()) {
        e->top_logprobs.emplace_back(t.token_id(), t.logprob());
      }
    };
    while (!ended && reader->Read(&m)) {
      // The stop token that ended the request rides on the final message: it has logprobs
      // but no text.
      const bool stop_token = m.token_id() >= 0 && m.finish_reason() == v1::FINISH_REASON_STOP;
      if (m.token_id() >= 0 && !stop_token) {
        RouteEvent ev;
        ev.token = m.token_id();
        bool stopped = false;
        std::string piece = detok.Push(m.token_id());
        // Complete UTF-8 characters: one per byte that does not continue a character.
        ev.token_text_chars = static_cast<size_t>(
            std::count_if(piece.begin(), piece.end(), [](char c) { return (c & 0xC0) != 0x80; }));
        // Stop strings are matched after the first min_tokens tokens, as on the generation
        // server (one may start in their text).
        if (streamed + 1 <= req.sampling().min_tokens()) {
          ev.text = stops.PassThrough(piece);
        } else {
          ev.text = stops.Push(std::move(piece), &stopped);
        }
        take_logprobs(&ev);
        ++streamed;
        if (!sink(ev)) {
          gc.TryCancel();
          reader->Finish();
          release_kv();  // normally pulled and released by now: then this finds nothing
          return ClientGone();
        }
        if (stopped) {
          // A stop string completed here: the request ends now (the server would stop at the
          // same token).
          RouteEvent fin;
          fin.finished = true;
          fin.finish_reason = "stop";
          fin.prompt_tokens = static_cast<int64_t>(prompt.size());
          fin.completion_tokens = streamed;
          gc.TryCancel();
          reader->Finish();
          prompt_tokens_ += prompt.size();
          completion_tokens_ += streamed;
          (disagg ? disaggregated_ : aggregated_)++;
          sink(fin);
          return grpc::Status::OK;
        }
      }
      if (m.finish_reason() == v1::FINISH_REASON_STOP ||
          m.finish_reason() == v1::FINISH_REASON_LENGTH) {
        RouteEvent fin;
        fin.finished = true;
        fin.finish_reason = m.finish_reason() == v1::FINISH_REASON_STOP ? "stop" : "length";
        if (stop_token) {
          fin.token = m.token_id();
          take_logprobs(&fin);
        }
        bool stopped = false;
        // include_stop_str_in_output keeps the stop token's text too, as the server does.
        std::string last = stop_token && req.include_stop_str_in_output() ? detok.Push(m.token_id())
                                                                          : std::string();
        fin.text = stops.Push(last + detok.Flush(), &stopped);
        if (!stopped) fin.text += stops.Flush();
        fin.prompt_tokens = m.usage().prompt_tokens();
        fin.completion_tokens = m.usage().completion_tokens();
        prompt_tokens_ += fin.prompt_tokens;
        completion_tokens_ += fin.completion_tokens;
        (disagg ? disaggregated_ : aggregated_)++;
        ended = true;
        sink(fin);
      }
    }
    st = reader->Finish();
    if (ended) return grpc::Status::OK;
    if (Cancelled(w)) {
      release_kv();
      return ClientGone();
    }
    if (st.ok()) {
      st =
          grpc::Status(grpc::StatusCode::INTERNAL,
                       "generation server " + g->url + " ended the stream without a final message");
    }
    if (Retryable(st)) MarkDown(g, "generate failed: " + st.error_message());
    release_kv();
    // Retry on another generation server only when nothing reached the client yet: one that is
    // down (ejected), or one whose admission queue is full (left in the pool, not asked again
    // for this request).
    const bool busy = st.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
    if (streamed > 0 || !(Retryable(st) || busy)) break;
    if (busy) full.push_back(g);
  }
  ++errors_;
  return st;
}

RouterStats Router::stats() const {
  RouterStats s;
  s.requests = requests_.load();
  s.disaggregated = disaggregated_.load();
  s.aggregated = aggregated_.load();
  s.errors = errors_.load();
  s.context_retries = context_retries_.load();
  s.prompt_tokens = prompt_tokens_.load();
  s.completion_tokens = completion_tokens_.load();
  s.in_flight = in_flight_.load();
  return s;
}

std::string Router::MetricsText() const {
  std::ostringstream o;
  const RouterStats s = stats();
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " counter\n"
      << name << " " << v << "\n";
  };
  counter("helix_router_requests_total", "Requests routed.", s.requests);
  counter("helix_router_disaggregated_requests_total",
          "Requests completed through a context server (KV hand-off).", s.disaggregated);
  counter("helix_router_aggregated_requests_total",
          "Requests completed by a generation server alone.", s.aggregated);
  counter("helix_router_request_errors_total", "Requests that ended with an error.", s.errors);
  counter("helix_router_context_retries_total", "Prefills retried on another context server.",
          s.context_retries);
  counter("helix_router_prompt_tokens_total", "Prompt tokens of completed requests.",
          s.prompt_tokens);
  counter("helix_router_completion_tokens_total", "Tokens generated.", s.completion_tokens);
  o << "# HELP helix_router_requests_in_flight Requests being routed now.\n"
    << "# TYPE helix_router_requests_in_flight gauge\nhelix_router_requests_in_flight "
    << s.in_flight << "\n";
  o << "# HELP helix_router_backend_healthy Whether the router sends requests to the server.\n"
    << "# TYPE helix_router_backend_healthy gauge\n";
  auto each = [&](const std::function<void(const Backend&, const std::string&)>& f) {
    for (const auto& b : ctx_) f(*b, "role=\"context\",url=\"" + Escape(b->url) + "\"");
    for (const auto& b : gen_) f(*b, "role=\"generation\",url=\"" + Escape(b->url) + "\"");
  };
  each([&](const Backend& b, const std::string& l) {
    o << "helix_router_backend_healthy{" << l << "} " << (b.healthy.load() ? 1 : 0) << "\n";
  });
  o << "# HELP helix_router_backend_outstanding_requests Requests in flight per server.\n"
    << "# TYPE helix_router_backend_outstanding_requests gauge\n";
  each([&](const Backend& b, const std::string& l) {
    o << "helix_router_backend_outstanding_requests{" << l << "} " << b.outstanding_requests.load()
      << "\n";
  });
  o << "# HELP helix_router_backend_requests_total Requests sent per server.\n"
    << "# TYPE helix_router_backend_requests_total counter\n";
  each([&](const Backend& b, const std::string& l) {
    o << "helix_router_backend_requests_total{" << l << "} " << b.requests_total.load() << "\n";
  });
  o << "# HELP helix_router_backend_failures_total Failed calls per server.\n"
    << "# TYPE helix_router_backend_failures_total counter\n";
  each([&](const Backend& b, const std::string& l) {
    o << "helix_router_backend_failures_total{" << l << "} " << b.failures_total.load() << "\n";
  });
  // What each server last reported in its GetServerInfo (polled with the health checks): its
  // requests running and waiting, its KV pool; a server not reached yet has no sample.
  auto kv = [&](const char* name, const char* type, const char* help, bool context_only,
                const std::function<int64_t(const v1::ServerInfo&)>& value) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
    each([&](const Backend& b, const std::string& l) {
      if (context_only && !b.context) return;
      std::lock_guard<std::mutex> lock(b.mu);
      if (b.have_info) o << name << "{" << l << "} " << value(b.info) << "\n";
    });
  };
  kv("helix_router_backend_kv_total_blocks", "gauge",
     "KV cache blocks per server, as it reports them.", false,
     [](const v1::ServerInfo& i) { return i.kv_total_blocks(); });
  kv("helix_router_backend_kv_free_blocks", "gauge", "Free KV cache blocks per server.", false,
     [](const v1::ServerInfo& i) { return i.kv_free_blocks(); });
  kv("helix_router_backend_kv_retained_requests", "gauge",
     "Prefilled prompts whose KV a context server holds for a generation server.", true,
     [](const v1::ServerInfo& i) { return i.kv_retained_requests(); });
  kv("helix_router_backend_kv_leases_expired_total", "counter",
     "Prefilled KV a context server freed because nobody released it within its lease.", true,
     [](const v1::ServerInfo& i) { return static_cast<int64_t>(i.kv_leases_expired()); });
  kv("helix_router_backend_num_requests_running", "gauge",
     "Requests in a server's forward batch, as it last reported them.", false,
     [](const v1::ServerInfo& i) { return i.num_requests_running(); });
  kv("helix_router_backend_num_requests_waiting", "gauge",
     "Requests a server holds that are not in its batch yet (queued, or waiting for their KV).",
     false, [](const v1::ServerInfo& i) { return i.num_requests_waiting(); });
  kv("helix_router_backend_kv_export_total_blocks", "gauge",
     "Blocks of a context server's pinned KV export buffer (0: its KV pool is host memory and "
     "is exported as it is).",
     true, [](const v1::ServerInfo& i) { return i.kv_export_total_blocks(); });
  kv("helix_router_backend_kv_export_free_blocks", "gauge",
     "Free blocks of a context server's KV export buffer.", true,
     [](const v1::ServerInfo& i) { return i.kv_export_free_blocks(); });
  kv("helix_router_backend_kv_ucx_connections", "gauge",
     "Open connections to a context server's UCX listener (generation ranks that pulled from it "
     "and are still up).",
     true, [](const v1::ServerInfo& i) { return i.kv_ucx_connections(); });
  kv("helix_router_backend_kv_preemptions_total", "counter",
     "Requests a generation server preempted (recomputed) for KV blocks "
     "(capacity_scheduler_policy MAX_UTILIZATION).",
     false, [](const v1::ServerInfo& i) { return static_cast<int64_t>(i.kv_preemptions()); });
  return o.str();
}

}  // namespace helix::router
