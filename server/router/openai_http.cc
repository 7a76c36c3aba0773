#include "server/router/openai_http.h"

#include <httplib.h>
#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <system_error>
#include <thread>

#include "engine/common/json_nesting.h"
#include "engine/common/log.h"
#include "engine/sampler/sampling_params.h"
#include "helix/version.h"
#include "server/common/kv_proto.h"
#include "server/router/client_socket.h"

namespace helix::router {
namespace {

using json = nlohmann::json;

std::string NewId(const char* prefix) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(rng()));
  return std::string(prefix) + buf;
}

// A token's bytes may be part of a UTF-8 character (logprobs show single tokens): serialise
// with U+FFFD for ill-formed bytes instead of throwing.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

int64_t Now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Status Bad(HttpError* e, const std::string& param, const std::string& message, int status = 400,
           const std::string& code = "") {
  e->status = status;
  e->param = param;
  e->message = message;
  e->code = code;
  if (status == 404) e->type = "invalid_request_error";
  return InvalidArgument(message);
}

// Reads an optional number in [lo, hi] into *out.
Status Number(const json& j, const char* key, double lo, double hi, double* out, HttpError* e) {
  if (!j.contains(key) || j[key].is_null()) return Status::Ok();
  if (!j[key].is_number()) return Bad(e, key, std::string("'") + key + "' must be a number");
  const double v = j[key].get<double>();
  if (!(v >= lo && v <= hi)) {
    std::ostringstream m;
    m << "'" << key << "' = " << v << " is out of range [" << lo << ", " << hi << "]";
    return Bad(e, key, m.str());
  }
  *out = v;
  return Status::Ok();
}

// A number without a fractional part (8.0), which vLLM's schema (pydantic, lax) takes for an
// integer; nullopt for anything else.
std::optional<double> IntegralFloat(const json& v) {
  if (!v.is_number_float()) return std::nullopt;
  const double d = v.get<double>();
  if (!std::isfinite(d) || std::trunc(d) != d) return std::nullopt;
  return d;
}

Status Integer(const json& j, const char* key, int64_t lo, int64_t hi, int64_t* out, HttpError* e) {
  if (!j.contains(key) || j[key].is_null()) return Status::Ok();
  const json& x = j[key];
  const std::optional<double> d = IntegralFloat(x);
  if (!d && !x.is_number_integer()) {
    return Bad(e, key, std::string("'") + key + "' must be an integer");
  }
  // Out of range whatever its form: a float beyond [lo, hi], or above INT64_MAX an unsigned
  // JSON value (named as sent, not wrapped).
  const bool beyond =
      d ? *d < static_cast<double>(lo) || *d > static_cast<double>(hi)
        : x.is_number_unsigned() && x.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX);
  const int64_t v = beyond ? 0 : d ? static_cast<int64_t>(*d) : x.get<int64_t>();
  if (beyond || v < lo || v > hi) {
    return Bad(e, key,
               std::string("'") + key + "' = " + j[key].dump() + " is out of range [" +
                   std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  *out = v;
  return Status::Ok();
}

// The seed: any integer in [0, 2^64) (the protocol's is a uint64).
Status Seed(const json& j, std::optional<uint64_t>* out, HttpError* e) {
  if (!j.contains("seed") || j["seed"].is_null()) return Status::Ok();
  const json& v = j["seed"];
  if (const auto d = IntegralFloat(v)) {
    if (*d < 0 || *d >= 18446744073709551616.0) {
      return Bad(e, "seed", "'seed' = " + v.dump() + " is out of range [0, 2^64)");
    }
    *out = static_cast<uint64_t>(*d);
    return Status::Ok();
  }
  if (!v.is_number_integer()) return Bad(e, "seed", "'seed' must be an integer");
  if (!v.is_number_unsigned() && v.get<int64_t>() < 0) {
    return Bad(e, "seed", "'seed' = " + v.dump() + " is out of range [0, 2^64)");
  }
  *out = v.get<uint64_t>();
  return Status::Ok();
}

std::string TokenText(const Tokenizer& tok, int32_t id) { return tok.TokenBytes(id, -1); }

json Bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

// The logprobs object of one choice, from the events that carried tokens.
// text_offset: where each token's text starts in the completion, counted from the text the
// tokens produced (a stop string may delay an event's `text`, not where its token starts).
json CompletionLogprobs(const Tokenizer& tok, const std::vector<RouteEvent>& evs,
                        size_t text_start) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  size_t off = text_start;
  for (const RouteEvent& ev : evs) {
    const std::string t = TokenText(tok, ev.token);
    tokens.push_back(t);
    lps.push_back(ev.logprob);
    json top = json::object();
    for (const auto& [id, lp] : ev.top_logprobs) top[TokenText(tok, id)] = lp;
    tops.push_back(top);
    offs.push_back(off);
    off += ev.token_text_chars;
  }
  return {
      {"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

json ChatLogprobs(const Tokenizer& tok, const std::vector<RouteEvent>& evs) {
  json content = json::array();
  for (const RouteEvent& ev : evs) {
    const std::string t = TokenText(tok, ev.token);
    json top = json::array();
    for (const auto& [id, lp] : ev.top_logprobs) {
      const std::string tt = TokenText(tok, id);
      top.push_back({{"token", tt}, {"logprob", lp}, {"bytes", Bytes(tt)}});
    }
    content.push_back(
        {{"token", t}, {"logprob", ev.logprob}, {"bytes", Bytes(t)}, {"top_logprobs", top}});
  }
  return {{"content", content}};
}

int HttpStatusOf(const grpc::Status& s) {
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
      return 400;
    case grpc::StatusCode::UNAUTHENTICATED:
      return 401;
    case grpc::StatusCode::NOT_FOUND:
      return 404;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return 429;
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::ABORTED:  // e.g. a KV hand-off that failed: retry
      return 503;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return 504;
    default:
      return 500;
  }
}

// A client-gone probe for Router::Run. The socket is looked up now, while the client is
// connected: one the client reset has no peer address any more (getpeername fails), so a
// later lookup missed it and the request ran to its end. A client that reset before this
// lookup (a handler started late on a loaded machine) is taken as gone at once when its
// socket is the peerless kind ConnectionFd reports. Every copy of the probe (the
// router's watcher, the handler's check of why the runs ended) shares the descriptor and the
// verdict, which stays once the client is seen gone.
std::function<bool()> ClientGoneProbe(const httplib::Request& req) {
  struct Watch {
    std::mutex mu;
    int fd = -1;  // -1: not found
    bool gone = false;
  };
  auto w = std::make_shared<Watch>();
  w->fd = ConnectionFd(req.remote_addr, req.remote_port, req.local_port);
  if (w->fd == kConnectionGone) {
    w->gone = true;
    w->fd = -1;
  }
  return [w] {
    std::lock_guard<std::mutex> lock(w->mu);
    if (!w->gone && w->fd >= 0) w->gone = PeerClosed(w->fd);
    return w->gone;
  };
}

// The route label of the HTTP metrics: the served routes by name, anything else "other" (a
// label per unknown path would let any client grow the metrics without bound).
std::string RouteLabel(const std::string& path) {
  static const std::set<std::string> kRoutes = {
      "/health",    "/ready",          "/metrics",
      "/v1/models", "/v1/completions", "/v1/chat/completions",
      "/tokenize",  "/detokenize",     "/version"};
  return kRoutes.count(path) ? path : "other";
}

// A served path asked with a method it does not take: fills `e` (405, naming the methods) and
// `res`'s Allow header, as FastAPI (and so vLLM) answers.
bool NotAllowed(const httplib::Request& req, httplib::Response* res, HttpError* e) {
  const std::string label = RouteLabel(req.path);
  if (label == "other") return false;
  const bool post = label == "/v1/completions" || label == "/v1/chat/completions" ||
                    label == "/tokenize" || label == "/detokenize";
  if (post ? req.method == "POST" : req.method == "GET" || req.method == "HEAD") return false;
  const char* allow = post ? "POST" : "GET, HEAD";
  res->set_header("Allow", allow);
  e->status = 405;
  e->message =
      "method " + req.method + " is not allowed on " + req.path + " (allowed: " + allow + ")";
  return true;
}

// Reads a request's body through httplib's content reader, keeping up to `keep_limit` bytes
// in *kept and reading past it without keeping, so that the connection stays in step for the
// next request (as httplib skips a Content-Length body over its own limit). A body longer than
// kMaxBodyRead is not read to its end. A multipart body is read and dropped.
enum class BodyRead { kOk, kTooLarge, kMultipart, kEncoded, kFailed };
constexpr uint64_t kMaxBodyRead = uint64_t{1} << 30;
BodyRead ReadBody(const httplib::Request& req, httplib::Response* res,
                  const httplib::ContentReader& read, size_t keep_limit, std::string* kept) {
  uint64_t seen = 0;
  bool too_large = false;
  bool ok;
  if (req.is_multipart_form_data()) {
    ok = read([](const httplib::MultipartFormData&) { return true; },
              [&](const char*, size_t n) { return (seen += n) <= kMaxBodyRead; });
    return ok ? BodyRead::kMultipart : BodyRead::kFailed;
  }
  ok = read([&](const char* data, size_t n) {
    if ((seen += n) > kMaxBodyRead) return false;
    if (too_large) return true;
    if (kept->size() + n > keep_limit) {
      too_large = true;
      std::string().swap(*kept);
      return true;
    }
    kept->append(data, n);
    return true;
  });
  if (res->status == 413) return BodyRead::kTooLarge;  // httplib skipped a Content-Length one
  // A compressed body: httplib (built without zlib) refuses gzip and deflate before reading
  // (415); other codings arrive as they were sent. Neither is JSON.
  const std::string coding = req.get_header_value("Content-Encoding");
  if (!coding.empty() && coding != "identity") {
    res->status = ok ? 200 : 415;  // 200: the body was read to its end
    return BodyRead::kEncoded;
  }
  if (!ok) return seen > kMaxBodyRead ? BodyRead::kTooLarge : BodyRead::kFailed;
  return too_large ? BodyRead::kTooLarge : BodyRead::kOk;
}

// A request's runs, one per choice (n), each on its own thread: the events not yet taken,
// tagged with their choice's index, and how each run ended.
struct StreamRun {
  std::atomic<bool> starting{false};   // a stream counted in OpenAiHttp's streams_starting_
  std::atomic<bool> cancelled{false};  // the response is over, or a run failed: end them all
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<int, RouteEvent>> events;  // GUARDED_BY(mu)
  int running = 0;                                // GUARDED_BY(mu): runs not ended yet
  std::vector<grpc::Status> status;               // GUARDED_BY(mu): each run's, once ended
  std::vector<std::thread> threads;

  void Cancel() { cancelled = true; }
  // Once every thread has started (REQUIRES: no other thread joins at the same time).
  void Join() {
    for (std::thread& t : threads) {
      if (t.joinable()) t.join();
    }
  }
  // The answer's error once the runs have ended: the first run's failure in choice order,
  // preferring a real failure to the cancellations it caused in the others.
  grpc::Status Failure() {
    std::lock_guard<std::mutex> lock(mu);
    grpc::Status cancelled_status;
    for (const grpc::Status& s : status) {
      if (s.ok()) continue;
      if (s.error_code() != grpc::StatusCode::CANCELLED) return s;
      if (cancelled_status.ok()) cancelled_status = s;
    }
    return cancelled_status;
  }
};

// How many of a request's choices run at once: at most 8, and within max_inflight_requests,
// so that any request can be admitted once the router is idle.
int RunsAtOnce(const ParsedRequest& p, int64_t max_inflight) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({p.runs(), 8, max_inflight})));
}

// Starts p.runs() runs on `at_once` threads: choice i is prompt i / n (p.route's, or
// p.batch[i / n]), seeded with seed + i % n when a seed is given. A run that fails ends the
// others (run->cancelled), as does the end of the response.
Status StartRuns(Router* router, const std::shared_ptr<StreamRun>& run, const ParsedRequest& p,
                 int at_once) {
  const int runs = p.runs();
  {
    std::lock_guard<std::mutex> lock(run->mu);
    run->status.assign(static_cast<size_t>(runs), grpc::Status::OK);
    run->running = runs;
  }
  // Choice i's request.
  auto route_of = [&p, run](int i) {
    RouteRequest r = p.route;
    if (!p.batch.empty()) {  // choice i: prompt i / n, its sample i % n
      const std::vector<int32_t>& ids = p.batch[static_cast<size_t>(i / p.n)];
      r.proto.mutable_token_ids()->mutable_ids()->Assign(ids.begin(), ids.end());
    }
    if (p.n > 1 && r.proto.sampling().has_seed()) {
      r.proto.mutable_sampling()->set_seed(r.proto.sampling().seed() +
                                           static_cast<uint64_t>(i % p.n));
    }
    r.client_gone = [gone = p.route.client_gone, run] {
      return run->cancelled.load() || (gone && gone());
    };
    return r;
  };
  std::vector<RouteRequest> routes;
  routes.reserve(static_cast<size_t>(runs));
  for (int i = 0; i < runs; ++i) routes.push_back(route_of(i));
  // `at_once` threads take the choices in order, each starting the next as one ends: a
  // request's share of the servers (and of max_inflight_requests) is bounded, whatever its n.
  auto next = std::make_shared<std::atomic<int>>(0);
  auto work = [router, run, next, runs,
               routes = std::make_shared<std::vector<RouteRequest>>(std::move(routes))] {
    for (int i = next->fetch_add(1); i < runs; i = next->fetch_add(1)) {
      grpc::Status st;
      if (run->cancelled) {
        st = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      } else {
        try {  // an exception here would end the router
          st = router->Run((*routes)[static_cast<size_t>(i)], [&](const RouteEvent& ev) {
            if (run->cancelled) return false;  // the response is over: cancel
            std::lock_guard<std::mutex> lock(run->mu);
            run->events.emplace_back(i, ev);
            run->cv.notify_all();
            return true;
          });
        } catch (const std::exception& x) {
          HELIX_LOG(kError) << "router: request failed: " << x.what();
          st = grpc::Status(grpc::StatusCode::INTERNAL, std::string("internal error: ") + x.what());
        }
      }
      if (!st.ok()) run->Cancel();  // one failed choice fails the request
      std::lock_guard<std::mutex> lock(run->mu);
      run->status[static_cast<size_t>(i)] = st;
      --run->running;
      run->cv.notify_all();
    }
  };
  const int threads = std::max(1, std::min(at_once, runs));
  for (int t = 0; t < threads; ++t) {
    try {
      run->threads.emplace_back(work);
    } catch (const std::system_error& x) {
      if (t > 0) return Status::Ok();  // the threads running take every choice
      std::lock_guard<std::mutex> lock(run->mu);
      for (int j = 0; j < runs; ++j) {
        run->status[static_cast<size_t>(j)] = grpc::Status(grpc::StatusCode::INTERNAL, x.what());
      }
      run->running = 0;
      run->cv.notify_all();
      return Internal(std::string("cannot start the request: ") + x.what());
    }
  }
  return Status::Ok();
}

HttpError FromGrpc(const grpc::Status& s) {
  HttpError e;
  e.status = HttpStatusOf(s);
  e.message = s.error_message();
  e.type = e.status == 400   ? "invalid_request_error"
           : e.status == 429 ? "rate_limit_error"
           : e.status == 503 ? "service_unavailable"
                             : "server_error";
  return e;
}

}  // namespace

json ErrorJson(const HttpError& e) {
  json err = {{"message", e.message}, {"type", e.type}};
  err["param"] = e.param.empty() ? json(nullptr) : json(e.param);
  err["code"] = e.code.empty() ? json(nullptr) : json(e.code);
  return {{"error", err}};
}

namespace {

// A chat request's "messages", rendered with the model's chat template and tokenised.
Status ChatPromptIds(const json& j, const Router& router, std::vector<int32_t>* out, HttpError* e) {
  const Tokenizer& tok = router.tokenizer();
  std::vector<int32_t>& ids = *out;
  if (!j.contains("messages") || !j["messages"].is_array()) {
    return Bad(e, "messages", "'messages' is required (an array)");
  }
  std::vector<ChatMessage> msgs;
  for (size_t i = 0; i < j["messages"].size(); ++i) {
    const json& m = j["messages"][i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
      return Bad(e, at + ".role", at + " needs a string 'role'");
    }
    ChatMessage cm;
    cm.role = m["role"].get<std::string>();
    if (cm.role == "developer") cm.role = "system";  // OpenAI's newer name for it
    if (m.contains("content") && m["content"].is_string()) {
      cm.content = m["content"].get<std::string>();
    } else if (m.contains("content") && m["content"].is_array()) {
      for (const json& part : m["content"]) {
        if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
            !part.contains("text") || !part["text"].is_string()) {
          return Bad(e, at + ".content", at + ".content: only text parts are supported");
        }
        cm.content += part["text"].get<std::string>();
      }
    } else if (cm.role == "assistant" && (!m.contains("content") || m["content"].is_null())) {
      // OpenAI allows an assistant message without content (it had tool calls, which this
      // server does not make): it renders empty, as vLLM's templates render it.
    } else {
      return Bad(e, at + ".content", at + " needs 'content' (a string or text parts)");
    }
    msgs.push_back(std::move(cm));
  }
  if (router.chat_style() == ChatStyle::kNone) {
    return Bad(e, "messages",
               "model '" + router.model_name() +
                   "' has no chat template this server can apply; use /v1/completions");
  }
  auto pieces = RenderChatPieces(router.chat_style(), msgs, router.chat_default_system());
  if (!pieces.ok()) return Bad(e, "messages", pieces.status().message());
  ids = EncodeChat(tok, *pieces);
  return Status::Ok();
}

// A request body as a JSON object (nesting bounded), with "model" this model's name when given.
Status ParseBody(const std::string& body, const Router& router, bool model_required, json* out,
                 HttpError* e) {
  if (JsonNestingDepth(body, kMaxJsonNesting) > kMaxJsonNesting) {
    return Bad(
        e, "",
        "the request body nests JSON deeper than " + std::to_string(kMaxJsonNesting) + " levels");
  }
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(e, "", "the request body is not valid JSON");
  if (!j.is_object()) return Bad(e, "", "the request body must be a JSON object");
  if (j.contains("model") && !j["model"].is_null()) {
    if (!j["model"].is_string()) return Bad(e, "model", "'model' must be a string");
    if (j["model"].get<std::string>() != router.model_name()) {
      return Bad(e, "model", "The model '" + j["model"].get<std::string>() + "' does not exist",
                 404, "model_not_found");
    }
  } else if (model_required) {
    return Bad(e, "model", "'model' is required (a string)");
  }
  *out = std::move(j);
  return Status::Ok();
}

// An optional boolean `key` of j into *out.
Status Boolean(const json& j, const char* key, bool* out, HttpError* e) {
  if (!j.contains(key) || j[key].is_null()) return Status::Ok();
  if (!j[key].is_boolean()) return Bad(e, key, std::string("'") + key + "' must be a boolean");
  *out = j[key].get<bool>();
  return Status::Ok();
}

// vLLM's POST /tokenize: {"prompt": text, "add_special_tokens": true} or {"messages": [...]}
// (the chat template applied, with the generation prompt); "model" optional. Answers the ids,
// their count, the model's context length and, with "return_token_strs", each id's piece.
StatusOr<json> Tokenize(const std::string& body, const Router& router, HttpError* e) {
  json j;
  RETURN_IF_ERROR(ParseBody(body, router, /*model_required=*/false, &j, e));
  const Tokenizer& tok = router.tokenizer();
  std::vector<int32_t> ids;
  bool token_strs = false;
  RETURN_IF_ERROR(Boolean(j, "return_token_strs", &token_strs, e));
  if (j.contains("messages")) {
    if (j.contains("prompt")) return Bad(e, "prompt", "give 'prompt' or 'messages', not both");
    bool generation_prompt = true, special = false, continue_final = false;
    RETURN_IF_ERROR(Boolean(j, "add_generation_prompt", &generation_prompt, e));
    RETURN_IF_ERROR(Boolean(j, "add_special_tokens", &special, e));
    RETURN_IF_ERROR(Boolean(j, "continue_final_message", &continue_final, e));
    // The chat template here always ends with the assistant's header, its BOS included.
    for (const auto& [key, given] : {std::pair{"add_generation_prompt", !generation_prompt},
                                     std::pair{"add_special_tokens", special},
                                     std::pair{"continue_final_message", continue_final}}) {
      if (given) return Bad(e, key, std::string("'") + key + "' is not supported by this server");
    }
    RETURN_IF_ERROR(ChatPromptIds(j, router, &ids, e));
  } else {
    if (!j.contains("prompt") || !j["prompt"].is_string()) {
      return Bad(e, "prompt", "'prompt' (a string) or 'messages' is required");
    }
    bool special = true;
    RETURN_IF_ERROR(Boolean(j, "add_special_tokens", &special, e));
    ids = tok.Encode(j["prompt"].get<std::string>(), special);
  }
  json out = {{"count", ids.size()}, {"max_model_len", router.max_seq_len()}, {"tokens", ids}};
  out["token_strs"] = nullptr;
  if (token_strs) {
    json strs = json::array();
    for (int32_t id : ids) strs.push_back(std::string(tok.piece(id)));
    out["token_strs"] = std::move(strs);
  }
  return out;
}

// vLLM's POST /detokenize: {"tokens": [ids]} → {"prompt": their text}, control tokens
// included; "model" optional.
StatusOr<json> Detokenize(const std::string& body, const Router& router, HttpError* e) {
  json j;
  RETURN_IF_ERROR(ParseBody(body, router, /*model_required=*/false, &j, e));
  const Tokenizer& tok = router.tokenizer();
  if (!j.contains("tokens") || !j["tokens"].is_array()) {
    return Bad(e, "tokens", "'tokens' is required (an array of token ids)");
  }
  // From after BOS, as a prompt's first word reads (its SentencePiece leading space dropped, as
  // Hugging Face decodes it).
  IncrementalDetokenizer detok(tok, tok.bos_id(), /*skip_control=*/false);
  std::string text;
  for (const json& t : j["tokens"]) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= tok.vocab_size()) {
      return Bad(e, "tokens",
                 "'tokens' must be integers in [0, " + std::to_string(tok.vocab_size()) + ")");
    }
    text += detok.Push(t.get<int32_t>());
  }
  return json{{"prompt", text + detok.Flush()}};
}

}  // namespace

StatusOr<ParsedRequest> ParseOpenAiRequest(const std::string& body, bool chat, const Router& router,
                                           int64_t max_seq_len, HttpError* e) {
  json j;
  RETURN_IF_ERROR(ParseBody(body, router, /*model_required=*/true, &j, e));
  ParsedRequest p;
  p.chat = chat;
  // The prompt.
  std::vector<int32_t> ids;
  const Tokenizer& tok = router.tokenizer();
  if (chat) {
    RETURN_IF_ERROR(ChatPromptIds(j, router, &ids, e));
  } else {
    if (!j.contains("prompt")) return Bad(e, "prompt", "'prompt' is required");
    const json& pr = j["prompt"];
    // One prompt: a string or token ids; several: an array of strings or of token-id arrays
    // (at most kMaxPrompts).
    constexpr size_t kMaxPrompts = 64;
    auto token_ids = [&](const json& list, std::vector<int32_t>* out) -> Status {
      for (const json& t : list) {
        if (!t.is_number_integer() || t.get<int64_t>() < 0 ||
            t.get<int64_t>() >= tok.vocab_size()) {
          return Bad(e, "prompt",
                     "'prompt' token ids must be integers in [0, " +
                         std::to_string(tok.vocab_size()) + ")");
        }
        out->push_back(t.get<int32_t>());
      }
      return Status::Ok();
    };
    if (pr.is_string()) {
      ids = tok.Encode(pr.get<std::string>(), true);
    } else if (pr.is_array() && !pr.empty() && pr[0].is_number_integer()) {
      RETURN_IF_ERROR(token_ids(pr, &ids));
    } else if (pr.is_array() && !pr.empty() && pr.size() <= kMaxPrompts &&
               (pr[0].is_string() || pr[0].is_array())) {
      const bool text = pr[0].is_string();
      for (size_t i = 0; i < pr.size(); ++i) {
        std::vector<int32_t> one;
        if (text && pr[i].is_string()) {
          one = tok.Encode(pr[i].get<std::string>(), true);
        } else if (!text && pr[i].is_array()) {
          RETURN_IF_ERROR(token_ids(pr[i], &one));
        } else {
          return Bad(e, "prompt",
                     "'prompt' lists must hold only strings or only arrays of token ids");
        }
        if (one.empty()) {
          return Bad(e, "prompt", "prompt " + std::to_string(i) + " of the list is empty");
        }
        p.batch.push_back(std::move(one));
      }
      ids = p.batch[0];
      if (p.batch.size() == 1) p.batch.clear();
    } else if (pr.is_array() && pr.size() > kMaxPrompts) {
      return Bad(e, "prompt", "at most " + std::to_string(kMaxPrompts) + " prompts in one request");
    } else {
      return Bad(e, "prompt",
                 "'prompt' must be a string, an array of token ids, or an array of either");
    }
  }
  if (ids.empty()) return Bad(e, chat ? "messages" : "prompt", "the prompt is empty");
  // The longest prompt bounds max_tokens.
  int64_t prompt_len = static_cast<int64_t>(ids.size());
  for (const auto& one : p.batch) prompt_len = std::max<int64_t>(prompt_len, one.size());
  // Parameters this server does not implement: refused by name rather than silently dropped
  // (a client would otherwise get output that ignores them).
  auto unsupported = [&](const char* key, bool given) -> Status {
    if (!given) return Status::Ok();
    return Bad(e, key, std::string("'") + key + "' is not supported by this server");
  };
  auto present = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  auto non_empty = [&](const char* key) { return present(key) && !j[key].empty(); };
  // echo (completions): the prompt's text before each choice's; prompt logprobs, which echo
  // adds to logprobs, are not computed.
  if (present("echo") && !j["echo"].is_boolean()) {
    return Bad(e, "echo", "'echo' must be a boolean");
  }
  const bool echo = present("echo") && j["echo"].get<bool>();
  RETURN_IF_ERROR(unsupported("echo", echo && chat));
  if (echo) {
    const json& pr = j["prompt"];
    const size_t prompts = p.batch.empty() ? 1 : p.batch.size();
    for (size_t i = 0; i < prompts; ++i) {
      const json& one = pr.is_array() && (pr[0].is_string() || pr[0].is_array()) ? pr[i] : pr;
      if (one.is_string()) {
        p.echo.push_back(one.get<std::string>());
      } else {  // token ids: their text, control tokens left out as in generated text
        // After BOS, as a prompt's first token reads (a SentencePiece word's leading space is
        // dropped there, as HF decodes it).
        IncrementalDetokenizer detok(tok, tok.bos_id(), /*skip_control=*/true);
        std::string text;
        for (int32_t id : p.batch.empty() ? ids : p.batch[i]) text += detok.Push(id);
        p.echo.push_back(text + detok.Flush());
      }
    }
  }
  RETURN_IF_ERROR(unsupported("suffix", present("suffix") && j["suffix"] != ""));
  RETURN_IF_ERROR(unsupported("tools", non_empty("tools")));
  RETURN_IF_ERROR(unsupported("functions", non_empty("functions")));
  RETURN_IF_ERROR(unsupported("tool_choice", present("tool_choice") && j["tool_choice"] != "none"));
  // vLLM's boolean extras: a boolean or null, as its schema takes them (another type was
  // ignored here).
  for (const char* key : {"use_beam_search", "return_tokens_as_token_ids", "skip_special_tokens",
                          "spaces_between_special_tokens", "add_generation_prompt",
                          "continue_final_message", "add_special_tokens"}) {
    bool unused = false;
    RETURN_IF_ERROR(Boolean(j, key, &unused, e));
  }
  // vLLM's own extras this server does not implement, when set to anything but their default.
  auto is_true = [&](const char* key) { return present(key) && j[key] == true; };
  auto is_false = [&](const char* key) { return present(key) && j[key] == false; };
  for (const char* key :
       {"prompt_logprobs", "truncate_prompt_tokens", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "structured_outputs", "prompt_embeds"}) {
    RETURN_IF_ERROR(unsupported(key, present(key)));
  }
  for (const char* key : {"bad_words", "logits_processors"}) {
    RETURN_IF_ERROR(unsupported(key, non_empty(key)));
  }
  for (const char* key : {"use_beam_search", "return_tokens_as_token_ids"}) {
    RETURN_IF_ERROR(unsupported(key, is_true(key)));
  }
  // (spaces_between_special_tokens matters only with special tokens in the text: ignored.)
  RETURN_IF_ERROR(unsupported("skip_special_tokens", is_false("skip_special_tokens")));
  RETURN_IF_ERROR(
      unsupported("length_penalty", present("length_penalty") && j["length_penalty"] != 1));
  RETURN_IF_ERROR(unsupported("priority", present("priority") && j["priority"] != 0));
  if (chat) {  // vLLM's chat-template controls: the template here is applied one way only
    RETURN_IF_ERROR(unsupported("add_generation_prompt", is_false("add_generation_prompt")));
    RETURN_IF_ERROR(unsupported("continue_final_message", is_true("continue_final_message")));
    RETURN_IF_ERROR(unsupported("add_special_tokens", is_true("add_special_tokens")));
    RETURN_IF_ERROR(unsupported("chat_template", present("chat_template")));
    RETURN_IF_ERROR(unsupported("chat_template_kwargs", non_empty("chat_template_kwargs")));
  }
  RETURN_IF_ERROR(unsupported(
      "response_format",
      present("response_format") && !(j["response_format"].is_object() &&
                                      j["response_format"].value("type", json()) == "text")));
  // Sampling and limits.
  // n choices, each its own run of the request (vLLM allows any number; 64 bounds the work one
  // request can ask for).
  int64_t n = 1;
  RETURN_IF_ERROR(Integer(j, "n", 1, 64, &n, e));
  p.n = static_cast<int>(n);
  if (p.runs() > 256) {
    return Bad(e, "n",
               std::to_string(p.batch.size()) + " prompts x n " + std::to_string(n) +
                   " choices: at most 256 in one request");
  }
  RETURN_IF_ERROR(
      unsupported("best_of", present("best_of") && j["best_of"] != 1 && j["best_of"] != n));
  int64_t max_tokens = chat ? 0 : 16;
  RETURN_IF_ERROR(Integer(j, "max_tokens", 1, 1 << 30, &max_tokens, e));
  if (chat) RETURN_IF_ERROR(Integer(j, "max_completion_tokens", 1, 1 << 30, &max_tokens, e));
  if (max_tokens == 0 && max_seq_len > 0 && prompt_len >= max_seq_len) {
    return Bad(e, "messages",
               "the prompt (" + std::to_string(prompt_len) +
                   " tokens) leaves no room to generate in the model's context of " +
                   std::to_string(max_seq_len) + " tokens",
               400, "context_length_exceeded");
  }
  if (max_tokens == 0) {  // chat default: what is left of the context (Router says how much)
    max_tokens = router.ChatDefaultMaxTokens(prompt_len, max_seq_len);
  }
  if (max_seq_len > 0 && prompt_len + max_tokens > max_seq_len) {
    return Bad(e, "max_tokens",
               "the prompt (" + std::to_string(prompt_len) + " tokens) plus max_tokens (" +
                   std::to_string(max_tokens) + ") exceeds the model's context of " +
                   std::to_string(max_seq_len) + " tokens",
               400, "context_length_exceeded");
  }
  double temperature = 1, top_p = 1, min_p = 0, presence = 0, frequency = 0, repetition = 1;
  int64_t top_k = 0;
  std::optional<uint64_t> seed;
  RETURN_IF_ERROR(Number(j, "temperature", 0, 2, &temperature, e));
  RETURN_IF_ERROR(Number(j, "top_p", 1e-9, 1, &top_p, e));
  RETURN_IF_ERROR(Number(j, "min_p", 0, 1, &min_p, e));
  RETURN_IF_ERROR(Number(j, "presence_penalty", -2, 2, &presence, e));
  RETURN_IF_ERROR(Number(j, "frequency_penalty", -2, 2, &frequency, e));
  RETURN_IF_ERROR(Number(j, "repetition_penalty", 1e-6, 10, &repetition, e));
  RETURN_IF_ERROR(Integer(j, "top_k", -1, 1 << 20, &top_k, e));
  int64_t min_tokens = 0;  // vLLM's
  RETURN_IF_ERROR(Integer(j, "min_tokens", 0, max_tokens, &min_tokens, e));
  RETURN_IF_ERROR(Seed(j, &seed, e));
  // Up to 64 stop strings (OpenAI allows 4, vLLM any number); an empty one stops nothing,
  // alone or in a list.
  constexpr size_t kMaxStops = 64;
  if (j.contains("stop") && !j["stop"].is_null()) {
    const json& s = j["stop"];
    if (s.is_string()) {
      p.route.stop.push_back(s.get<std::string>());
    } else if (s.is_array() && s.size() <= kMaxStops) {
      for (const json& x : s) {
        if (!x.is_string()) return Bad(e, "stop", "'stop' entries must be strings");
        p.route.stop.push_back(x.get<std::string>());
      }
    } else {
      return Bad(e, "stop",
                 "'stop' must be a string or an array of at most " + std::to_string(kMaxStops) +
                     " strings");
    }
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean()) return Bad(e, "stream", "'stream' must be a boolean");
    p.stream = j["stream"].get<bool>();
  }
  if (j.contains("stream_options") && !j["stream_options"].is_null()) {
    if (!j["stream_options"].is_object()) {
      return Bad(e, "stream_options", "'stream_options' must be an object");
    }
    if (!p.stream) {
      return Bad(e, "stream_options", "'stream_options' is only allowed with 'stream': true");
    }
    const json& so = j["stream_options"];
    if (so.contains("include_usage")) {
      if (!so["include_usage"].is_boolean()) {
        return Bad(e, "stream_options.include_usage", "'include_usage' must be a boolean");
      }
      p.include_usage = so["include_usage"].get<bool>();
    }
    // vLLM's: with include_usage, every chunk carries its choice's usage so far.
    if (so.contains("continuous_usage_stats")) {
      if (!so["continuous_usage_stats"].is_boolean()) {
        return Bad(e, "stream_options.continuous_usage_stats",
                   "'continuous_usage_stats' must be a boolean");
      }
      p.continuous_usage = p.include_usage && so["continuous_usage_stats"].get<bool>();
    }
  }
  if (chat) {
    if (j.contains("logprobs") && !j["logprobs"].is_null()) {
      if (!j["logprobs"].is_boolean()) return Bad(e, "logprobs", "'logprobs' must be a boolean");
      p.logprobs = j["logprobs"].get<bool>();
    }
    int64_t top = 0;
    RETURN_IF_ERROR(Integer(j, "top_logprobs", 0, 20, &top, e));
    if (top > 0 && !p.logprobs) {
      return Bad(e, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
    }
    p.top_logprobs = static_cast<int>(top);
  } else {
    int64_t lp = -1;
    RETURN_IF_ERROR(Integer(j, "logprobs", 0, 20, &lp, e));
    p.logprobs = lp >= 0;
    p.top_logprobs = static_cast<int>(std::max<int64_t>(lp, 0));
    if (p.logprobs && !p.echo.empty()) {
      return Bad(e, "echo", "'echo' with 'logprobs' is not supported (no prompt logprobs)");
    }
  }
  // vLLM's stop_token_ids: generation stops at any of them.
  if (j.contains("stop_token_ids") && !j["stop_token_ids"].is_null()) {
    const json& st = j["stop_token_ids"];
    if (!st.is_array() || st.size() > 1024) {
      return Bad(e, "stop_token_ids", "'stop_token_ids' must be an array of at most 1024 ids");
    }
    for (const json& t : st) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= tok.vocab_size()) {
        return Bad(
            e, "stop_token_ids",
            "'stop_token_ids' must be integers in [0, " + std::to_string(tok.vocab_size()) + ")");
      }
      p.route.proto.add_stop_token_ids(t.get<int32_t>());
    }
  }
  // logit_bias: {"token id": bias}, as OpenAI takes it (a bias in [-100, 100]; -100 bans).
  if (j.contains("logit_bias") && !j["logit_bias"].is_null()) {
    const json& lb = j["logit_bias"];
    if (!lb.is_object()) {
      return Bad(e, "logit_bias", "'logit_bias' must be an object mapping token ids to biases");
    }
    if (lb.size() > helix::SamplingParams::kMaxLogitBias) {
      return Bad(e, "logit_bias",
                 "'logit_bias' has " + std::to_string(lb.size()) + " entries: at most " +
                     std::to_string(helix::SamplingParams::kMaxLogitBias));
    }
    auto* bias = p.route.proto.mutable_sampling()->mutable_logit_bias();
    for (const auto& [key, value] : lb.items()) {
      // A decimal token id (no sign, no spaces), as a JSON object's key is a string.
      int64_t id = key.empty() || key.size() > 10 ? -1 : 0;
      for (char c : key) id = id >= 0 && c >= '0' && c <= '9' ? id * 10 + (c - '0') : -1;
      if (id < 0 || id >= tok.vocab_size()) {
        return Bad(e, "logit_bias",
                   "'logit_bias' key \"" + key.substr(0, 32) + "\" is not a token id in [0, " +
                       std::to_string(tok.vocab_size()) + ")");
      }
      if (!value.is_number() || !(value.get<double>() >= -100 && value.get<double>() <= 100)) {
        return Bad(e, "logit_bias",
                   "'logit_bias' value for token " + key + " must be a number in [-100, 100]");
      }
      if (bias->contains(static_cast<int32_t>(id))) {
        return Bad(e, "logit_bias", "'logit_bias' names token " + std::to_string(id) + " twice");
      }
      (*bias)[static_cast<int32_t>(id)] = value.get<float>();
    }
  }
  // vLLM's allowed_token_ids: only these can be sampled.
  if (j.contains("allowed_token_ids") && !j["allowed_token_ids"].is_null()) {
    const json& al = j["allowed_token_ids"];
    if (!al.is_array() || al.empty() || al.size() > helix::SamplingParams::kMaxLogitBias) {
      return Bad(e, "allowed_token_ids",
                 "'allowed_token_ids' must be an array of 1 to " +
                     std::to_string(helix::SamplingParams::kMaxLogitBias) + " token ids");
    }
    for (const json& t : al) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= tok.vocab_size()) {
        return Bad(e, "allowed_token_ids",
                   "'allowed_token_ids' must be integers in [0, " +
                       std::to_string(tok.vocab_size()) + ")");
      }
      p.route.proto.mutable_sampling()->add_allowed_token_ids(t.get<int32_t>());
    }
  }
  if (j.contains("include_stop_str_in_output") && !j["include_stop_str_in_output"].is_null()) {
    if (!j["include_stop_str_in_output"].is_boolean()) {
      return Bad(e, "include_stop_str_in_output", "'include_stop_str_in_output' must be a boolean");
    }
    p.route.proto.set_include_stop_str_in_output(j["include_stop_str_in_output"].get<bool>());
  }
  bool ignore_eos = false;
  if (j.contains("ignore_eos") && !j["ignore_eos"].is_null()) {
    if (!j["ignore_eos"].is_boolean()) {
      return Bad(e, "ignore_eos", "'ignore_eos' must be a boolean");
    }
    ignore_eos = j["ignore_eos"].get<bool>();
  }
  v1::GenerateRequest& g = p.route.proto;
  g.mutable_token_ids()->mutable_ids()->Assign(ids.begin(), ids.end());
  g.set_max_tokens(static_cast<int32_t>(max_tokens));
  v1::SamplingParams* sp = g.mutable_sampling();
  sp->set_temperature(static_cast<float>(temperature));
  sp->set_top_p(static_cast<float>(top_p));
  sp->set_top_k(top_k < 0 ? 0 : static_cast<int32_t>(top_k));
  sp->set_min_p(static_cast<float>(min_p));
  sp->set_presence_penalty(static_cast<float>(presence));
  sp->set_frequency_penalty(static_cast<float>(frequency));
  sp->set_repetition_penalty(static_cast<float>(repetition));
  if (seed) sp->set_seed(*seed);
  sp->set_min_tokens(static_cast<int32_t>(min_tokens));
  for (const std::string& s : p.route.stop) g.add_stop(s);
  // The generation servers' bounds on stop strings (their bytes in all: the count and
  // stop_token_ids are held lower above), named here rather than by the server's refusal.
  if (Status st = server::CheckStops(g); !st.ok()) return Bad(e, "stop", st.message());
  g.set_ignore_eos(ignore_eos);
  if (p.logprobs) g.set_top_logprobs(p.top_logprobs);
  return p;
}

OpenAiHttp::OpenAiHttp(Router* router, const config::RouterConfig& cfg)
    : router_(router), cfg_(cfg), server_(std::make_unique<httplib::Server>()) {}

OpenAiHttp::~OpenAiHttp() { Stop(); }

void OpenAiHttp::Count(const std::string& route, int status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++responses_[{route, status}];
}

std::string OpenAiHttp::MetricsText() const {
  std::ostringstream o;
  o << "# HELP helix_router_http_responses_total HTTP responses by route and status.\n"
    << "# TYPE helix_router_http_responses_total counter\n";
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [k, v] : responses_) {
    o << "helix_router_http_responses_total{route=\"" << k.first << "\",code=\"" << k.second
      << "\"} " << v << "\n";
  }
  return o.str();
}

constexpr int kListenBacklog = 4096;

StatusOr<int> OpenAiHttp::Start() {
  httplib::Server& s = *server_;
  // httplib holds a pooled thread per open connection, idle or not: besides the requests in
  // flight, room for 256 connections that are idle (keep-alive, up to 5 s), slow to send their
  // request, or asking /health, /ready or /metrics, which would otherwise wait behind them.
  const int threads = static_cast<int>(std::min<int64_t>(cfg_.max_inflight_requests + 256, 4096));
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.set_payload_max_length(static_cast<size_t>(cfg_.max_request_bytes));
  // httplib's defaults add SO_REUSEPORT, which let a second router bind a taken port and split
  // its traffic: SO_REUSEADDR alone (a restart may still take a port in TIME_WAIT).
  // The callback sees each socket httplib tries to bind; the last one is the one it listens on.
  auto listening = std::make_shared<int>(-1);
  s.set_socket_options([listening](socket_t sock) {
    const int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    *listening = sock;
  });
  // A client that stops sending mid-request holds its thread for this long at most per wait.
  s.set_read_timeout(std::chrono::seconds(10));
  s.set_write_timeout(std::chrono::seconds(30));
  auto send_error = [this](httplib::Response& res, const HttpError& e, const std::string& route) {
    res.status = e.status;
    res.set_content(Dump(ErrorJson(e)), "application/json");
    Count(route, e.status);
  };
  // A body past max_request_bytes, however it came (Content-Length, chunked, announced with
  // Expect: 100-continue).
  const HttpError too_large{413,
                            "request body exceeds " + std::to_string(cfg_.max_request_bytes) +
                                " bytes (max_request_bytes)",
                            "invalid_request_error", "", ""};
  // A request without Content-Length or Transfer-Encoding has no body (RFC 9112 §6.3), but
  // httplib 0.11 reads the body of a POST, PUT, PATCH or DELETE until the client closes, so
  // `curl -X POST` without -d waited out the 30 s read timeout: such a request is answered at
  // once: 405 on a served path that does not take its method, else 411. A request with a body
  // goes on: the generation routes and the catch-all handlers below read it through a content
  // reader (httplib would buffer a chunked body whole, whatever its size), so that the
  // connection stays in step for the next request.
  s.set_pre_routing_handler([send_error](const httplib::Request& req, httplib::Response& res) {
    if (req.has_header("Content-Length") || req.has_header("Transfer-Encoding") ||
        req.method == "OPTIONS") {  // a CORS preflight, when enabled; else 405 as below
      return httplib::Server::HandlerResponse::Unhandled;
    }
    if (HttpError e; NotAllowed(req, &res, &e)) {
      send_error(res, e, RouteLabel(req.path));
      return httplib::Server::HandlerResponse::Handled;
    }
    if (req.method == "GET" || req.method == "HEAD" || req.method == "OPTIONS") {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    HttpError e;
    e.status = 411;
    e.message = "a " + req.method +
                " needs a JSON body with a Content-Length header (or chunked "
                "Transfer-Encoding)";
    send_error(res, e, RouteLabel(req.path));
    return httplib::Server::HandlerResponse::Handled;
  });
  // A client that waits for 100 Continue before sending a body over the limit is refused
  // before sending it (httplib would ask for the body and then discard it).
  s.set_expect_100_continue_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (req.has_header("Content-Length") && req.get_header_value<uint64_t>("Content-Length") >
                                                static_cast<uint64_t>(cfg_.max_request_bytes)) {
      res.status = 413;
      res.set_header("Connection", "close");  // a client that sends the body anyway: go
      return 413;
    }
    return 100;
  });
  s.set_error_handler([this, too_large](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;  // already answered
    HttpError e;
    e.status = res.status;
    if (res.status == 413) {
      // Every body is read through a content reader (below), so httplib's own 8 KiB cap on
      // form-encoded bodies never applies: only the size limit does.
      e = too_large;
    } else if (res.status == 404 && NotAllowed(req, &res, &e)) {
      res.status = 405;  // a served path with a method it does not take (OPTIONS, ...)
    } else if (res.status == 404) {
      e.message = "no route " + req.method + " " + req.path;
    } else {
      e.message = "HTTP " + std::to_string(res.status);
    }
    if (res.status >= 500) e.type = "server_error";
    res.set_content(Dump(ErrorJson(e)), "application/json");
    Count(RouteLabel(req.path), res.status);
  });
  // A handler that throws (a bug: requests are validated first) answers 500 with the error in
  // the body, not in a response header.
  s.set_exception_handler(
      [this](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        HttpError e;
        e.status = 500;
        e.type = "server_error";
        e.message = "internal error";
        try {
          if (ep) std::rethrow_exception(ep);
        } catch (const std::exception& x) {
          e.message = std::string("internal error: ") + x.what();
        } catch (...) {
        }
        HELIX_LOG(kError) << "router: " << req.method << " " << req.path << ": " << e.message;
        res.status = 500;
        res.set_content(Dump(ErrorJson(e)), "application/json");
        Count(RouteLabel(req.path), 500);
      });
  auto authorized = [this](const httplib::Request& req) {
    if (!cfg_.api_key || cfg_.api_key->empty()) return true;
    return req.get_header_value("Authorization") == "Bearer " + *cfg_.api_key;
  };

  // CORS (opt-in): responses to an allowed origin say so, and preflight requests are answered.
  if (!cfg_.cors_allowed_origins.empty()) {
    const auto& origins = cfg_.cors_allowed_origins;
    const bool any = std::find(origins.begin(), origins.end(), "*") != origins.end();
    auto allowed = [origins, any](const std::string& origin) {
      return !origin.empty() &&
             (any || std::find(origins.begin(), origins.end(), origin) != origins.end());
    };
    s.set_post_routing_handler([allowed, any](const httplib::Request& req, httplib::Response& res) {
      // The answer depends on the Origin (unless any is allowed): a shared cache must not give
      // one origin's answer to another, allowed or not.
      if (!any) res.set_header("Vary", "Origin");
      const std::string origin = req.get_header_value("Origin");
      if (!allowed(origin)) return;
      res.set_header("Access-Control-Allow-Origin", any ? "*" : origin);
    });
    s.Options(
        ".*", [this, allowed, send_error](const httplib::Request& req, httplib::Response& res) {
          const std::string origin = req.get_header_value("Origin");
          if (!allowed(origin)) {
            return send_error(res,
                              {400,
                               "CORS preflight from an origin not in cors_allowed_origins: \"" +
                                   origin.substr(0, 256) + "\"",
                               "invalid_request_error", "", ""},
                              RouteLabel(req.path));
          }
          res.status = 204;
          res.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
          // The headers the page asks to send (Authorization and Content-Type, typically).
          std::string headers = req.get_header_value("Access-Control-Request-Headers");
          if (headers.empty() || headers.size() > 1024) headers = "Authorization, Content-Type";
          res.set_header("Access-Control-Allow-Headers", headers);
          res.set_header("Access-Control-Max-Age", "600");
          res.set_header("Vary", "Access-Control-Request-Headers");  // beside the Origin one
          Count(RouteLabel(req.path), 204);
        });
  }
  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content("{\"status\":\"ok\"}", "application/json");
    Count("/health", 200);
  });
  s.Get("/ready", [this](const httplib::Request&, httplib::Response& res) {
    const bool ok = router_->Ready();
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "{\"status\":\"ready\"}"
                       : "{\"status\":\"not ready\",\"reason\":\"no healthy context/generation "
                         "pair\"}",
                    "application/json");
    Count("/ready", res.status);
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(router_->MetricsText() + MetricsText(), "text/plain; version=0.0.4");
    Count("/metrics", 200);
  });
  s.Get("/v1/models",
        [this, authorized, send_error](const httplib::Request& req, httplib::Response& res) {
          if (!authorized(req)) {
            return send_error(res,
                              {401, "missing or wrong API key (Authorization: Bearer ...)",
                               "authentication_error", "", "invalid_api_key"},
                              "/v1/models");
          }
          json m = {{"object", "list"},
                    {"data", json::array({{{"id", router_->model_name()},
                                           {"object", "model"},
                                           {"created", Now()},
                                           {"owned_by", "helix"},
                                           {"root", router_->model_name()},
                                           {"max_model_len", router_->max_seq_len()}}})}};
          res.set_content(Dump(m), "application/json");
          Count("/v1/models", 200);
        });

  // A JSON route's body, kept up to max_request_bytes (httplib 0.11 applies its payload limit to
  // Content-Length bodies only and would buffer a chunked one whole), and the API key; false
  // once the error is answered.
  auto take_body = [this, authorized, send_error, too_large](
                       const httplib::Request& req, httplib::Response& res,
                       const httplib::ContentReader& read_body, const std::string& route,
                       std::string* body) {
    const BodyRead read =
        ReadBody(req, &res, read_body, static_cast<size_t>(cfg_.max_request_bytes), body);
    if (read == BodyRead::kTooLarge) {
      send_error(res, too_large, route);
      return false;
    }
    if (read == BodyRead::kMultipart) {
      send_error(res,
                 {415,
                  "a multipart/form-data body is not accepted: send the request as JSON "
                  "(Content-Type: application/json)",
                  "invalid_request_error", "", ""},
                 route);
      return false;
    }
    if (read == BodyRead::kEncoded) {
      if (res.status == 415) res.set_header("Connection", "close");  // the body was not read
      send_error(res,
                 {415,
                  "Content-Encoding '" + req.get_header_value("Content-Encoding").substr(0, 64) +
                      "' is not accepted: send the request body uncompressed",
                  "invalid_request_error", "", ""},
                 route);
      return false;
    }
    if (read == BodyRead::kFailed) {
      res.set_header("Connection", "close");  // what is left of the body was not read
      send_error(res,
                 {400, "could not read the request body (malformed chunked encoding?)",
                  "invalid_request_error", "", ""},
                 route);
      return false;
    }
    if (!authorized(req)) {
      send_error(res,
                 {401, "missing or wrong API key (Authorization: Bearer ...)",
                  "authentication_error", "", "invalid_api_key"},
                 route);
      return false;
    }
    return true;
  };

  auto generate = [this, take_body, send_error](bool chat) {
    return [this, chat, take_body, send_error](const httplib::Request& req, httplib::Response& res,
                                               const httplib::ContentReader& read_body) {
      const std::string route = chat ? "/v1/chat/completions" : "/v1/completions";
      std::string body;
      if (!take_body(req, res, read_body, route, &body)) return;
      HttpError err;
      auto parsed = ParseOpenAiRequest(body, chat, *router_, router_->max_seq_len(), &err);
      if (!parsed.ok()) return send_error(res, err, route);
      // Held until the response is done: a place for each choice running at once.
      std::shared_ptr<void> slot = router_->Admit(RunsAtOnce(*parsed, cfg_.max_inflight_requests));
      if (slot == nullptr) {
        return send_error(res,
                          {429,
                           "too many requests in flight (max_inflight_requests " +
                               std::to_string(cfg_.max_inflight_requests) + "); retry later",
                           "rate_limit_error", "", ""},
                          route);
      }
      if (!router_->Ready()) {
        return send_error(
            res,
            {503,
             router_->has_context_servers() ? "no healthy context/generation server pair"
                                            : "no healthy generation server",
             "service_unavailable", "", ""},
            route);
      }
      const std::string id = NewId(chat ? "chatcmpl-" : "cmpl-");
      const int64_t created = Now();
      const std::string model = router_->model_name();
      const Tokenizer& tok = router_->tokenizer();
      // The request's n runs (one per choice) go on threads of their own, whose events the
      // response takes in order. A stream's headers wait for the first event: a request that
      // fails before any token (every server full or down, a failed prefill) is answered with
      // its HTTP status and a JSON error, streaming or not, instead of 200 and an error event
      // (clients retry 429 and 503 by status).
      ParsedRequest p = *parsed;
      // No token reaches a client that left until the end: its socket is watched.
      p.route.client_gone = ClientGoneProbe(req);
      // A stream counts from here until its body starts: Stop waits for it.
      if (p.stream && !BeginStream()) {
        return send_error(res, {503, "the router is shutting down", "service_unavailable", "", ""},
                          route);
      }
      auto run = std::make_shared<StreamRun>();
      run->starting = p.stream;
      auto started = [this, run] {  // once, whichever way the response goes
        if (run->starting.exchange(false)) StreamStarted();
      };
      if (Status st = StartRuns(router_, run, p, RunsAtOnce(p, cfg_.max_inflight_requests));
          !st.ok()) {
        run->Join();
        started();
        return send_error(res, {500, st.message(), "server_error", "", ""}, route);
      }
      // Whether the runs failed (the answer's status), once they have all ended.
      auto failure = [&]() -> std::optional<HttpError> {
        const grpc::Status st = run->Failure();
        if (st.ok()) return std::nullopt;
        if (st.error_code() == grpc::StatusCode::CANCELLED && p.route.client_gone &&
            p.route.client_gone()) {
          // nginx's "client closed request" (counted so; the client is not there to read it).
          return HttpError{499, "the client closed the connection: the request was cancelled",
                           "invalid_request_error", "", "client_closed_request"};
        }
        return FromGrpc(st);
      };
      if (!p.stream) {
        {
          std::unique_lock<std::mutex> lock(run->mu);
          run->cv.wait(lock, [&] { return run->running == 0; });
        }
        run->Join();
        if (auto e = failure()) return send_error(res, *e, route);
        const int runs = p.runs();
        std::vector<std::string> text(runs), finish(runs);
        std::vector<std::vector<RouteEvent>> toks(runs);
        int64_t prompt_tokens = 0, completion_tokens = 0;
        for (auto& [i, ev] : run->events) {
          text[i] += ev.text;
          if (ev.finished) {
            finish[i] = ev.finish_reason;
            if (i % p.n == 0) prompt_tokens += ev.prompt_tokens;  // each prompt once
            completion_tokens += ev.completion_tokens;
          }
          if (ev.token >= 0) toks[i].push_back(std::move(ev));  // last: ev is read above
        }
        // Each choice is written out as soon as it is built and its events dropped: a JSON tree
        // of every choice's logprobs at once took about 13 bytes of memory per byte of the
        // answer (n = 64 × 4 prompts × 500 tokens with 20 top logprobs: 850 MB for 67 MB).
        run->events.clear();
        run->events.shrink_to_fit();
        std::string choices = "[";
        for (int i = 0; i < runs; ++i) {
          json c;
          if (chat) {
            c = {{"index", i},
                 {"message", {{"role", "assistant"}, {"content", text[i]}}},
                 {"logprobs", p.logprobs ? ChatLogprobs(tok, toks[i]) : json(nullptr)},
                 {"finish_reason", finish[i]}};
          } else {
            c = {{"index", i},
                 {"text", (p.echo.empty() ? "" : p.echo[static_cast<size_t>(i / p.n)]) + text[i]},
                 {"logprobs", p.logprobs ? CompletionLogprobs(tok, toks[i], 0) : json(nullptr)},
                 {"finish_reason", finish[i]}};
          }
          std::vector<RouteEvent>().swap(toks[i]);
          std::string().swap(text[i]);
          if (i > 0) choices += ',';
          choices += Dump(c);
        }
        choices += ']';
        // The keys in the order a json object keeps them (sorted): "choices" comes first.
        const json rest = {{"id", id},
                           {"object", chat ? "chat.completion" : "text_completion"},
                           {"created", created},
                           {"model", model},
                           {"usage",
                            {{"prompt_tokens", prompt_tokens},
                             {"completion_tokens", completion_tokens},
                             {"total_tokens", prompt_tokens + completion_tokens}}}};
        std::string body = "{\"choices\":" + choices + "," + Dump(rest).substr(1);
        std::string().swap(choices);
        const size_t bytes = body.size();
        res.set_content(std::move(body), "application/json");
        Count(route, 200);
        // Give the freed memory of a large answer back to the system (glibc keeps it).
        if (bytes > (size_t{16} << 20)) malloc_trim(0);
        return;
      }
      {
        std::unique_lock<std::mutex> lock(run->mu);
        run->cv.wait(lock, [&] { return !run->events.empty() || run->running == 0; });
        if (run->events.empty()) {  // every run ended before its first token
          lock.unlock();
          run->Join();
          started();
          if (auto e = failure()) return send_error(res, *e, route);
        }
      }
      // Server-Sent Events: one "data: {json}\n\n" chunk per token (its choice's index), then
      // each choice's final chunk (finish_reason), the usage chunk if asked for, and
      // "data: [DONE]".
      Count(route, 200);
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream",
          [this, p, id, created, model, chat, slot, run, started](size_t, httplib::DataSink& sink) {
            started();  // from here the body runs to its end, even while the router stops
            const Tokenizer& tok = router_->tokenizer();
            auto send = [&](const json& j) {
              const std::string s = "data: " + Dump(j) + "\n\n";
              return sink.is_writable() && sink.write(s.data(), s.size());
            };
            // Per choice, for continuous_usage_stats: its prompt's tokens and its tokens so far.
            std::vector<int64_t> choice_prompt(static_cast<size_t>(p.runs()));
            std::vector<int64_t> choice_tokens(static_cast<size_t>(p.runs()), 0);
            for (int i = 0; i < p.runs(); ++i) {
              choice_prompt[i] = p.batch.empty() ? p.route.proto.token_ids().ids_size()
                                                 : static_cast<int64_t>(p.batch[i / p.n].size());
            }
            auto chunk = [&](int index, json delta_or_text, json finish, json logprobs) {
              json choice = {{"index", index}, {"logprobs", logprobs}, {"finish_reason", finish}};
              if (chat) {
                choice["delta"] = delta_or_text;
              } else {
                choice["text"] = delta_or_text;
              }
              json c = {{"id", id},
                        {"object", chat ? "chat.completion.chunk" : "text_completion"},
                        {"created", created},
                        {"model", model},
                        {"choices", json::array({choice})}};
              if (p.continuous_usage) {
                c["usage"] = {{"prompt_tokens", choice_prompt[index]},
                              {"completion_tokens", choice_tokens[index]},
                              {"total_tokens", choice_prompt[index] + choice_tokens[index]}};
              }
              return c;
            };
            auto reader_gone = [&] {  // the release joins the runs' threads
              run->Cancel();
              return false;
            };
            for (int i = 0; i < static_cast<int>(p.echo.empty() ? 0 : p.runs()); ++i) {
              // echo: each choice's prompt first
              if (!send(chunk(i, p.echo[static_cast<size_t>(i / p.n)], nullptr, nullptr))) {
                return reader_gone();
              }
            }
            if (chat) {
              for (int i = 0; i < p.runs(); ++i) {
                if (!send(chunk(i, {{"role", "assistant"}, {"content", ""}}, nullptr, nullptr))) {
                  return reader_gone();
                }
              }
            }
            int64_t prompt_tokens = 0, completion_tokens = 0;
            std::vector<size_t> offset(static_cast<size_t>(p.runs()), 0);
            for (bool done = false; !done;) {
              std::deque<std::pair<int, RouteEvent>> events;
              {
                std::unique_lock<std::mutex> lock(run->mu);
                run->cv.wait(lock, [&] { return !run->events.empty() || run->running == 0; });
                events.swap(run->events);
                done = run->running == 0;  // every event came before: none is left behind
              }
              for (const auto& [i, ev] : events) {
                bool ok;
                json lp = nullptr;
                if (p.logprobs && ev.token >= 0) {  // a token, or the stop token that ended it
                  lp = chat ? ChatLogprobs(tok, {ev}) : CompletionLogprobs(tok, {ev}, offset[i]);
                }
                if (ev.finished) {
                  if (i % p.n == 0) prompt_tokens += ev.prompt_tokens;  // each prompt once
                  completion_tokens += ev.completion_tokens;
                  choice_tokens[i] = ev.completion_tokens;
                  json body = chat ? json{{"content", ev.text}} : json(ev.text);
                  if (chat && ev.text.empty()) body = json::object();
                  ok = send(chunk(i, body, ev.finish_reason, lp));
                } else {
                  ++choice_tokens[i];
                  offset[i] += ev.token_text_chars;
                  ok = send(
                      chunk(i, chat ? json{{"content", ev.text}} : json(ev.text), nullptr, lp));
                }
                if (!ok) return reader_gone();  // the request is cancelled
              }
            }
            if (const grpc::Status st = run->Failure(); !st.ok()) {
              send(ErrorJson(FromGrpc(st)));
            } else if (p.include_usage) {
              send({{"id", id},
                    {"object", chat ? "chat.completion.chunk" : "text_completion"},
                    {"created", created},
                    {"model", model},
                    {"choices", json::array()},
                    {"usage",
                     {{"prompt_tokens", prompt_tokens},
                      {"completion_tokens", completion_tokens},
                      {"total_tokens", prompt_tokens + completion_tokens}}}});
            }
            const std::string done = "data: [DONE]\n\n";
            sink.write(done.data(), done.size());
            sink.done();
            return true;
          },
          [run, started](bool) {  // the response is over (sent, or the client left): end it
            started();            // a response whose body never started (its client left first)
            run->Cancel();
            run->Join();
          });
    };
  };
  s.Post("/v1/completions", generate(false));
  s.Post("/v1/chat/completions", generate(true));
  // vLLM's tokenizer routes: a JSON body in, a JSON answer out (behind the API key).
  using JsonFn = StatusOr<json> (*)(const std::string&, const Router&, HttpError*);
  auto json_post = [this, take_body, send_error](const char* route, JsonFn fn) {
    return [this, route, fn, take_body, send_error](const httplib::Request& req,
                                                    httplib::Response& res,
                                                    const httplib::ContentReader& read_body) {
      std::string body;
      if (!take_body(req, res, read_body, route, &body)) return;
      HttpError err;
      StatusOr<json> out = fn(body, *router_, &err);
      if (!out.ok()) return send_error(res, err, route);
      res.set_content(Dump(*out), "application/json");
      Count(route, 200);
    };
  };
  s.Post("/tokenize", json_post("/tokenize", &Tokenize));
  s.Post("/detokenize", json_post("/detokenize", &Detokenize));
  s.Get("/version", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(Dump(json{{"version", kVersion}}), "application/json");
    Count("/version", 200);
  });
  // Any other request with a body: read (and dropped) through a content reader, so that a
  // chunked one is not buffered whole and the connection stays in step; then 405 on a served
  // path, 404 elsewhere (413 past httplib's limit for a Content-Length body).
  auto other = [send_error, too_large](const httplib::Request& req, httplib::Response& res,
                                       const httplib::ContentReader& read_body) {
    std::string dropped;
    const BodyRead read = ReadBody(req, &res, read_body, 0, &dropped);
    if (read == BodyRead::kFailed) res.set_header("Connection", "close");
    HttpError e;
    if (res.status == 413) {
      e = too_large;
    } else if (!NotAllowed(req, &res, &e)) {
      e.status = 404;
      e.message = "no route " + req.method + " " + req.path;
    }
    send_error(res, e, RouteLabel(req.path));
  };
  s.Post(".*", other);
  s.Put(".*", other);
  s.Patch(".*", other);
  s.Delete(".*", other);

  const int port =
      cfg_.server.port == 0
          ? s.bind_to_any_port(cfg_.server.host)
          : (s.bind_to_port(cfg_.server.host, cfg_.server.port) ? cfg_.server.port : -1);
  if (port <= 0) {
    return Unavailable("cannot listen on " + cfg_.server.host + ":" +
                       std::to_string(cfg_.server.port));
  }
  // httplib 0.11 listens with a backlog of 5: a burst of new connections overflows it and the
  // clients' SYNs are dropped, to be retried after 1, 3, 7 ... s. Listening again on the bound
  // socket raises the backlog (Linux caps it at net.core.somaxconn).
  if (*listening < 0 || ::listen(*listening, kListenBacklog) != 0) {
    HELIX_LOG(kWarn) << "router: could not raise the listen backlog of port " << port
                     << "; bursts of new connections may wait for SYN retries";
  }
  thread_ = std::thread([this] {
    server_->listen_after_bind();
    listening_done_ = true;
  });
  // httplib 0.11's stop() does nothing until the listening loop has marked itself running, so
  // a Stop right after Start (a signal during start-up, a later start-up step failing) would
  // leave the loop, and the join, waiting for ever: Start returns once it runs.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!server_->is_running() && !listening_done_ &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return port;
}

bool OpenAiHttp::BeginStream() {
  std::lock_guard<std::mutex> lock(streams_mu_);
  if (stopping_) return false;
  ++streams_starting_;
  return true;
}

void OpenAiHttp::StreamStarted() {
  std::lock_guard<std::mutex> lock(streams_mu_);
  --streams_starting_;
  streams_cv_.notify_all();
}

void OpenAiHttp::Stop() {
  {
    // Streams still waiting for their first event have no body yet, and httplib starts none
    // once stopped: they would end as bare headers. Each starts (or fails) when its first event
    // comes, as soon as its server answers; then the server stops, and the bodies run on.
    // At most 30 s: a stream whose server never answers would otherwise hold the router until
    // its request_timeout_ms.
    std::unique_lock<std::mutex> lock(streams_mu_);
    stopping_ = true;
    if (!streams_cv_.wait_for(lock, std::chrono::seconds(30),
                              [&] { return streams_starting_ == 0; })) {
      HELIX_LOG(kWarn) << "router: stopping with " << streams_starting_
                       << " stream(s) still waiting for their first token after 30 s";
    }
  }
  // Repeated until the listening loop has returned (see Start).
  while (server_ && thread_.joinable() && !listening_done_) {
    server_->stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (thread_.joinable()) thread_.join();
}

}  // namespace helix::router
