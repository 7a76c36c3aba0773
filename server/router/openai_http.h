// The router's OpenAI-compatible HTTP front (cpp-httplib): POST /v1/completions and
// /v1/chat/completions (JSON or SSE streaming), GET /v1/models, /health, /ready, /metrics;
// vLLM's POST /tokenize, /detokenize and GET /version.
// Requests are validated here (400 with an OpenAI error object naming the parameter),
// tokenised (chat templates applied), and run through the Router on the connection's thread.
// Thread-safety: one instance serves many connections concurrently.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "server/config/router_config.h"
#include "server/router/router.h"

namespace httplib {
class Server;
}

namespace helix::router {

// A request body turned into what the router runs, or the OpenAI-style error to answer.
struct ParsedRequest {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  bool continuous_usage = false;  // vLLM's stream_options.continuous_usage_stats
  bool logprobs = false;          // return logprobs (completions: "logprobs" >= 0; chat: true)
  int top_logprobs = 0;
  int n = 1;  // choices per prompt, each its own run of `route`
  // Completions given several prompts: each prompt's token ids (route holds the first's);
  // choice index = prompt × n + sample, as vLLM and OpenAI number them.
  std::vector<std::vector<int32_t>> batch;
  int runs() const { return n * static_cast<int>(batch.empty() ? 1 : batch.size()); }
  // Completions with echo: each prompt's text, put before its choices' text.
  std::vector<std::string> echo;
  RouteRequest route;
};
struct HttpError {
  int status = 400;
  std::string message, type = "invalid_request_error", param, code;
};
// Parses and validates a /v1/completions (chat = false) or /v1/chat/completions body.
StatusOr<ParsedRequest> ParseOpenAiRequest(const std::string& body, bool chat, const Router& router,
                                           int64_t max_seq_len, HttpError* error);
nlohmann::json ErrorJson(const HttpError& e);

class OpenAiHttp {
 public:
  OpenAiHttp(Router* router, const config::RouterConfig& cfg);
  ~OpenAiHttp();
  // Binds host:port (0 = any free port) and serves on a background thread. Returns the port,
  // or an error.
  StatusOr<int> Start();
  void Stop();

 private:
  void Count(const std::string& route, int status);
  std::string MetricsText() const;

  // A stream counts from its start until its SSE body starts (or it ends without one). httplib
  // never starts the body of a response once it is stopping, so Stop waits for these first;
  // a body already started runs to its end. New streams are refused while stopping.
  bool BeginStream();    // false: the router is stopping
  void StreamStarted();  // the body started, or the response ended without one
  std::mutex streams_mu_;
  std::condition_variable streams_cv_;
  int64_t streams_starting_ = 0;  // GUARDED_BY(streams_mu_)
  bool stopping_ = false;         // GUARDED_BY(streams_mu_)

  Router* router_;
  config::RouterConfig cfg_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  std::atomic<bool> listening_done_{false};  // listen_after_bind returned
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> responses_;  // GUARDED_BY(mu_)
};

}  // namespace helix::router
