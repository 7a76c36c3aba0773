// helix-gen: the generation server. Subcommands: serve (daemon), generate (offline),
// check-config.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <variant>

#include <CLI/CLI.hpp>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <pthread.h>
#include <signal.h>

#include <filesystem>
#include <fstream>

#include "engine/common/log.h"
#include "engine/engine.h"
#include "engine/parallel/launcher.h"
#include "helix/v1/context.grpc.pb.h"
#include "helix/version.h"
#include "server/common/cli.h"
#include "server/common/logging.h"
#include "server/common/serve_setup.h"
#include "server/gen/generation_service.h"

namespace {

using helix::server::kExitFailure;
using helix::server::kExitOk;
using helix::server::kExitUsage;

struct GenerateFlags {
  std::string model, tokenizer, prompt, kv_dtype = "float32", weight_dtype = "auto",
                                        log_level = "warn", backend = "cpu";
  int max_tokens = 256, threads = 0, tp = 1, cp = 1, top_k = 0;
  bool cuda_graphs = true;
  float temperature = 1.0f, top_p = 1.0f, min_p = 0.0f;
  float repetition_penalty = 1.0f, presence_penalty = 0.0f, frequency_penalty = 0.0f;
  int64_t tokens_per_block = 32, seed = -1, max_seq_len = 0;
  bool ignore_eos = false;
  std::vector<std::string> stop;
  // Helix ranks: set by the local leader for the ranks it spawns, or by an external launcher.
  std::optional<int> rank, world_size;
  std::string leader_addr;
  int64_t comm_timeout_ms = 30000;
};

std::vector<std::string> g_argv;  // this process's arguments, for the ranks it spawns

// This process's part in a (possibly multi-rank) instance: the leader's engine, and the local
// ranks it started (destroyed after the engine, whose destructor stops them).
struct Instance {
  std::unique_ptr<helix::parallel::LocalRanks> local_ranks;
  std::unique_ptr<helix::Engine> engine;
};

// The serving leader's SIGTERM/SIGINT, taken by one thread from before the engine starts: one
// during start-up (a rendezvous may wait comm_timeout) ends the process at once; later, it
// starts the drain.
struct SignalWatch {
  std::mutex mu;
  std::condition_variable cv;
  bool serving = false;  // GUARDED_BY(mu)
  int signal = 0;        // GUARDED_BY(mu)
  std::string lost;      // GUARDED_BY(mu): a spawned rank exited (why), so serving ends
};
SignalWatch g_signals;

void WatchSignals(std::string cmd, sigset_t sigs) {
  std::thread([cmd, sigs] {
    int sig = 0;
    sigwait(&sigs, &sig);
    std::lock_guard<std::mutex> lock(g_signals.mu);
    if (!g_signals.serving) {
      // Ranks this leader spawned die with it (PR_SET_PDEATHSIG).
      std::cerr << cmd << ": signal " << sig << " during start-up: exiting" << std::endl;
      _exit(128 + sig);
    }
    g_signals.signal = sig;
    g_signals.cv.notify_all();
  }).detach();
}

// Assigns this process's rank (flags, launcher environment, or a single-node leader that
// starts the other ranks itself), then creates its Engine. A rank other than 0 runs the
// leader's steps until the instance stops. Returns the leader's Instance, or the exit code
// the process ends with. `leader_signals` (may be null) are blocked on the leader before any
// thread exists. `cmd` prefixes messages ("helix-gen serve").
std::variant<Instance, int> StartInstance(const std::string& cmd, helix::EngineOptions o,
                                          std::optional<int> rank, std::optional<int> world_size,
                                          const std::string& leader_addr,
                                          const sigset_t* leader_signals) {
  const int world = o.tensor_parallel * o.context_parallel;
  auto assigned = helix::parallel::AssignRank(world, rank, world_size, leader_addr);
  if (!assigned.ok()) {
    std::cerr << cmd << ": " << assigned.status().message() << "\n";
    return kExitUsage;
  }
  o.rank = assigned->rank;
  o.leader_host = assigned->leader_host;
  o.leader_port = assigned->leader_port;
  o.group_token = assigned->group_token;
  if (o.rank == 0 && leader_signals != nullptr) {
    pthread_sigmask(SIG_BLOCK, leader_signals, nullptr);
    WatchSignals(cmd, *leader_signals);
  }
  Instance inst;
  if (assigned->spawn_local) {
    // The rendezvous store listens before any rank starts: a port only picked could be taken
    // (or, by a rank's own connect, self-connected to) before the engine got to bind it.
    auto store =
        helix::parallel::TcpStoreServer::Start(o.leader_host, o.leader_port, o.group_token);
    if (!store.ok()) {
      std::cerr << cmd << ": " << store.status().message() << "\n";
      return kExitFailure;
    }
    o.store_server = std::move(*store);
    o.leader_port = o.store_server->port();
    auto spawned = helix::parallel::LocalRanks::Spawn(g_argv, world, o.leader_host, o.leader_port,
                                                      o.group_token);
    if (!spawned.ok()) {
      std::cerr << cmd << ": " << spawned.status().message() << "\n";
      return kExitFailure;
    }
    inst.local_ranks = std::move(*spawned);
  }
  const std::string who = o.rank > 0 ? "rank " + std::to_string(o.rank) + ": " : "";
  auto engine = helix::Engine::Create(o);
  if (!engine.ok()) {
    std::cerr << cmd << ": " << who << engine.status().ToString() << "\n";
    return kExitFailure;
  }
  if (!(*engine)->is_leader()) {
    if (leader_signals != nullptr) {
      // A worker of a serving instance, once it has joined, outlives a SIGTERM/SIGINT sent to
      // the whole process group (Ctrl-C, systemd, killpg), so that its leader can drain the
      // streams in flight: the leader stops it afterwards, and it dies with a leader that
      // spawned it. Before it joined there is nothing to drain: the signals end it at once
      // (ignored from the start, a worker waiting for an absent leader sat out the 30 s
      // timeout).
      for (int s = 1; s < NSIG; ++s) {
        if (sigismember(leader_signals, s) == 1) signal(s, SIG_IGN);
      }
    }
    helix::Status st = (*engine)->RunWorker();
    if (!st.ok()) {
      std::cerr << cmd << ": " << who << st.ToString() << "\n";
      return kExitFailure;
    }
    return kExitOk;
  }
  inst.engine = std::move(*engine);
  return inst;
}

int RunGenerate(const GenerateFlags& f) {
  helix::config::LoggingConfig log;
  log.level = f.log_level;
  if (helix::Status st = helix::config::ValidateLogging(log); !st.ok()) {
    std::cerr << "helix-gen generate: --log-level " << f.log_level << ": " << st.message() << "\n";
    return kExitUsage;
  }
  if (helix::Status st = helix::server::SetUpLogging(log, "gen"); !st.ok()) {
    std::cerr << "helix-gen: logging: " << st.message() << "\n";
    return kExitFailure;
  }
  if (f.tp < 1 || f.cp < 1) {
    std::cerr << "helix-gen generate: --tp " << f.tp << " --cp " << f.cp << ": both must be >= 1\n";
    return kExitUsage;
  }
  helix::EngineOptions o;
  o.tensor_parallel = f.tp;
  o.context_parallel = f.cp;
  o.comm_timeout = std::chrono::milliseconds(f.comm_timeout_ms);
  o.model_path = f.model;
  o.tokenizer_path = f.tokenizer;
  o.num_threads = f.threads;
  o.backend = f.backend;
  o.cuda_graphs = f.cuda_graphs;
  o.tokens_per_block = f.tokens_per_block;
  o.max_batch_size = 1;
  o.max_seq_len = f.max_seq_len;
  if (auto t = helix::kernels::DTypeFromName(f.kv_dtype)) {
    o.kv_dtype = *t;
  } else {
    std::cerr << "helix-gen generate: --kv-dtype " << f.kv_dtype
              << ": expected float32, float16 or bfloat16\n";
    return kExitUsage;
  }
  if (f.weight_dtype != "auto") {
    o.weight_dtype = helix::kernels::DTypeFromName(f.weight_dtype);
    if (!o.weight_dtype) {
      std::cerr << "helix-gen generate: --weight-dtype " << f.weight_dtype
                << ": expected auto, float32, float16 or bfloat16\n";
      return kExitUsage;
    }
  }
  auto started =
      StartInstance("helix-gen generate", o, f.rank, f.world_size, f.leader_addr, nullptr);
  if (const int* code = std::get_if<int>(&started)) return *code;
  helix::Engine* engine = std::get<Instance>(started).engine.get();
  helix::GenerateRequest r;
  r.prompt = f.prompt;
  r.max_tokens = f.max_tokens;
  r.sampling.temperature = f.temperature;
  r.sampling.top_p = f.top_p;
  r.sampling.top_k = f.top_k;
  r.sampling.min_p = f.min_p;
  r.sampling.repetition_penalty = f.repetition_penalty;
  r.sampling.presence_penalty = f.presence_penalty;
  r.sampling.frequency_penalty = f.frequency_penalty;
  if (f.seed >= 0) r.sampling.seed = static_cast<uint64_t>(f.seed);
  r.ignore_eos = f.ignore_eos;
  r.stop = f.stop;
  helix::Status failure;
  helix::TokenEvent last;
  r.sink = [&](const helix::TokenEvent& ev) {
    if (!ev.text.empty()) {
      std::cout << ev.text;
      std::cout.flush();
    }
    if (ev.finished) last = ev;
  };
  auto id = engine->Submit(std::move(r));
  if (!id.ok()) {
    std::cerr << "helix-gen generate: " << id.status().ToString() << "\n";
    return kExitUsage;
  }
  while (engine->HasWork()) engine->Step();
  std::cout << "\n";
  std::cout.flush();
  std::cerr << "[helix-gen] finish_reason=" << helix::FinishReasonName(last.finish_reason)
            << " prompt_tokens=" << last.prompt_tokens
            << " completion_tokens=" << last.completion_tokens << "\n";
  if (last.finish_reason == helix::FinishReason::kError) {
    std::cerr << "helix-gen generate: " << last.error.ToString() << "\n";
    return kExitFailure;
  }
  return kExitOk;
}

struct ServeFlags {
  std::string config;
  std::optional<int> rank;
  std::string leader_addr;
  int64_t drain_ms = 30000;
  int64_t heartbeat_ms = 5000;
  int64_t comm_timeout_ms = 30000;
};

// The daemon: the leader serves gRPC; the other ranks follow its steps.
int RunServe(const ServeFlags& f) {
  auto cfg = helix::config::LoadServingConfig(f.config, helix::config::Role::kGeneration);
  if (!cfg.ok()) {
    std::cerr << "invalid config: " << cfg.status().message() << "\n";
    return kExitUsage;
  }
  if (helix::Status st = helix::server::SetUpLogging(cfg->logging, "gen"); !st.ok()) {
    std::cerr << "helix-gen: logging: " << st.message() << "\n";
    return kExitFailure;
  }
  helix::EngineOptions o = helix::server::EngineOptionsFromConfig(*cfg);
  if (f.heartbeat_ms < 100 || f.heartbeat_ms > 3600000) {
    std::cerr << "helix-gen serve: --heartbeat-ms " << f.heartbeat_ms
              << ": expected 100 to 3600000\n";
    return kExitUsage;
  }
  // Workers exit when their leader has sent nothing, not even its idle heartbeat, for 12 beats
  // beyond the longest the leader may spend between two steps waiting for cancelled KV pulls
  // to end (kv_transfer_timeout + 5 s, Engine::DropPull).
  o.worker_idle_timeout = std::chrono::milliseconds(12 * f.heartbeat_ms) + o.kv_transfer_timeout +
                          std::chrono::seconds(5);
  o.comm_timeout = std::chrono::milliseconds(f.comm_timeout_ms);
  const int world = o.tensor_parallel * o.context_parallel;
  // The leader takes SIGTERM/SIGINT on a thread of its own (WatchSignals); other ranks ignore
  // them (and die with, or are stopped by, their leader).
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  auto started = StartInstance("helix-gen serve", o, f.rank, std::nullopt, f.leader_addr, &sigs);
  if (const int* code = std::get_if<int>(&started)) return *code;
  Instance& inst = std::get<Instance>(started);
  helix::server::GenerationServiceOptions so;
  so.model_name = std::filesystem::path(cfg->model).filename().string();
  so.kv_dtype = cfg->kv_cache_config.dtype;
  so.max_in_flight = 4 * cfg->max_batch_size;
  so.api_key = cfg->server.api_key.value_or("");
  so.allowed_context_servers = cfg->cache_transceiver_config.allowed_context_servers;
  so.heartbeat = std::chrono::milliseconds(f.heartbeat_ms);
  so.kv_check_timeout =
      std::chrono::milliseconds(cfg->cache_transceiver_config.kv_transfer_timeout_ms);
  std::shared_ptr<grpc::ServerCredentials> creds = helix::server::ServerCredentialsFor(cfg->server);
  auto service = std::make_unique<helix::server::GenerationService>(std::move(inst.engine), so);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string addr = helix::server::JoinHostPort(cfg->server.host, cfg->server.port);
  int bound_port = 0;
  // gRPC turns SO_REUSEPORT on by default: a second server on a taken port would share it.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(addr, creds, &bound_port);
  builder.RegisterService(service.get());
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    std::cerr << "helix-gen serve: cannot listen on " << addr
              << (cfg->server.tls_cert_file ? " (or gRPC refused the TLS certificate or key: "
                                              "see its error above)"
                                            : "")
              << "\n";
    service->Stop(std::chrono::milliseconds(0));
    return kExitFailure;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  service->set_health_listener([health](bool ok) { health->SetServingStatus(ok); });
  HELIX_LOG(kInfo) << "gen: serving helix.v1.GenerationService on " << cfg->server.host << ":"
                   << bound_port << " (" << world << " rank" << (world > 1 ? "s" : "") << ")";
  std::cerr << "helix-gen serve: listening on "
            << helix::server::JoinHostPort(cfg->server.host, bound_port) << std::endl;

  // The ranks this leader spawned are watched: one that exits (killed, crashed) leaves an
  // instance that can no longer serve, so the leader stops too, with a failure status a
  // supervisor (cluster.py, systemd) sees, instead of staying up NOT_SERVING with a zombie.
  // So does a broken instance of several ranks (a rank that stopped answering: hung, or its
  // host gone), which never serves again; its ranks then exit or are stopped with it.
  std::atomic<bool> watching{true};
  std::thread rank_watch;
  if (inst.local_ranks || world > 1) {
    rank_watch = std::thread([&] {
      while (watching.load()) {
        helix::Status st = inst.local_ranks ? inst.local_ranks->ReapExited() : helix::Status::Ok();
        if (st.ok()) st = service->instance_status();
        if (!st.ok()) {
          std::lock_guard<std::mutex> lock(g_signals.mu);
          g_signals.lost = st.message();
          g_signals.cv.notify_all();
          return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }
  int sig = 0;
  std::string lost;
  {
    std::unique_lock<std::mutex> lock(g_signals.mu);
    g_signals.serving = true;
    g_signals.cv.wait(lock, [] { return g_signals.signal != 0 || !g_signals.lost.empty(); });
    sig = g_signals.signal;
    lost = g_signals.lost;
  }
  watching = false;
  if (rank_watch.joinable()) rank_watch.join();
  // A lost rank: nothing left to drain (its streams failed), and the exit status says so.
  std::chrono::milliseconds drain(f.drain_ms);
  if (sig == 0) {
    HELIX_LOG(kError) << "gen: " << lost << ": the instance cannot serve any more; stopping";
    std::cerr << "helix-gen serve: " << lost << ": stopping" << std::endl;
    drain = std::chrono::milliseconds(0);
  } else {
    HELIX_LOG(kInfo) << "gen: signal " << sig << ": draining for up to " << f.drain_ms << " ms";
  }
  health->SetServingStatus(false);
  service->Stop(drain);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  service.reset();
  return sig == 0 ? kExitFailure : kExitOk;
}

struct ClientFlags {
  std::string target = "127.0.0.1:50052", prompt;
  int max_tokens = 128, top_logprobs = -1;
  float temperature = 1.0f, top_p = 1.0f;
  int64_t seed = -1, timeout_ms = 0;
  std::string api_key, tls_ca_file;
  std::string context;  // HOST:PORT of a context server: prefill there, then decode here
};

// A small client: streams one completion's text to stdout.
int RunClient(const ClientFlags& f) {
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!f.tls_ca_file.empty()) {
    std::ifstream in(f.tls_ca_file, std::ios::binary);
    if (!in) {
      std::cerr << "helix-gen client: cannot read --tls-ca " << f.tls_ca_file << "\n";
      return kExitUsage;
    }
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    creds = grpc::SslCredentials(ssl);
  }
  auto channel = grpc::CreateChannel(f.target, creds);
  auto stub = helix::v1::GenerationService::NewStub(channel);
  helix::v1::GenerateRequest req;
  req.set_text(f.prompt);
  req.set_max_tokens(f.max_tokens);
  req.mutable_sampling()->set_temperature(f.temperature);
  req.mutable_sampling()->set_top_p(f.top_p);
  if (f.seed >= 0) req.mutable_sampling()->set_seed(static_cast<uint64_t>(f.seed));
  if (!f.context.empty()) {
    // Disaggregated: the context server prefills and hands over the KV; this server decodes.
    auto ctx_stub = helix::v1::ContextService::NewStub(grpc::CreateChannel(f.context, creds));
    helix::v1::PrefillRequest pre;
    *pre.mutable_request() = req;
    helix::v1::PrefillResponse got;
    grpc::ClientContext pctx;
    if (!f.api_key.empty()) pctx.AddMetadata("authorization", "Bearer " + f.api_key);
    grpc::Status st = ctx_stub->Prefill(&pctx, pre, &got);
    if (!st.ok()) {
      std::cerr << "helix-gen client: prefill on " << f.context << ": " << st.error_code() << " "
                << st.error_message() << "\n";
      return kExitFailure;
    }
    *req.mutable_token_ids() = got.prompt_token_ids();
    req.set_first_token(got.first_token());
    *req.mutable_kv_handle() = got.kv_handle();
  }
  grpc::ClientContext ctx;
  if (!f.api_key.empty()) ctx.AddMetadata("authorization", "Bearer " + f.api_key);
  if (f.timeout_ms > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(f.timeout_ms));
  }
  auto reader = stub->Generate(&ctx, req);
  helix::v1::GenerateResponse m;
  helix::v1::GenerateResponse last;
  while (reader->Read(&m)) {
    std::cout << m.text() << std::flush;
    if (m.finish_reason() != helix::v1::FINISH_REASON_UNSPECIFIED) last = m;
  }
  std::cout << "\n";
  grpc::Status st = reader->Finish();
  if (!st.ok()) {
    std::cerr << "helix-gen client: " << st.error_code() << " " << st.error_message() << "\n";
    return kExitFailure;
  }
  std::cerr << "[helix-gen client] finish_reason="
            << helix::v1::FinishReason_Name(last.finish_reason())
            << " prompt_tokens=" << last.usage().prompt_tokens()
            << " completion_tokens=" << last.usage().completion_tokens() << "\n";
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  g_argv.assign(argv, argv + argc);
  CLI::App app{
      "helix-gen: Helix generation server (decode with the KV cache sharded across a "
      "context-parallel group)"};
  app.set_version_flag("--version", std::string("helix-gen ") + helix::kVersion);
  app.require_subcommand(1);

  ServeFlags sf;
  auto* serve = app.add_subcommand("serve", "Run the generation server daemon (gRPC)");
  serve->add_option("--config", sf.config, "JSON config file")->required();
  serve->add_option("--rank", sf.rank, "This process's Helix rank (see generate --rank)");
  serve->add_option("--leader-addr", sf.leader_addr, "HOST:PORT of the leader's rendezvous store");
  serve
      ->add_option("--drain-ms", sf.drain_ms,
                   "On SIGTERM/SIGINT, how long in-flight streams may finish")
      ->check(CLI::Range(int64_t{0}, int64_t{86400000}))
      ->capture_default_str();
  serve
      ->add_option("--comm-timeout-ms", sf.comm_timeout_ms,
                   "With several ranks: the rendezvous and collective timeout in milliseconds "
                   "(a rank that takes longer to answer breaks the instance). Every rank must be "
                   "given the same value")
      ->check(CLI::Range(int64_t{1}, helix::config::kMaxDurationMs))
      ->capture_default_str();
  serve
      ->add_option("--heartbeat-ms", sf.heartbeat_ms,
                   "With several ranks: while idle, the leader sends its workers an empty step "
                   "this often, and a worker that hears nothing for 12 times as long plus "
                   "kv_transfer_timeout_ms + 5 s exits: its leader is gone, e.g. its host "
                   "without closing the connections. Every rank must be given the same value")
      ->capture_default_str();

  ClientFlags cf;
  auto* client = app.add_subcommand("client", "Stream one completion from a running server");
  client->add_option("--target", cf.target, "HOST:PORT of helix-gen serve")->capture_default_str();
  client->add_option("--prompt", cf.prompt, "Prompt text")->required();
  client->add_option("--max-tokens", cf.max_tokens)->capture_default_str();
  client->add_option("--temperature", cf.temperature)->capture_default_str();
  client->add_option("--top-p", cf.top_p)->capture_default_str();
  client->add_option("--seed", cf.seed, "-1 = random")->capture_default_str();
  client->add_option("--timeout-ms", cf.timeout_ms, "Deadline (0 = none)")->capture_default_str();
  client->add_option("--api-key", cf.api_key, "Sent as \"authorization: Bearer KEY\"");
  client->add_option("--tls-ca", cf.tls_ca_file, "PEM root certificate: connect with TLS");
  client->add_option("--context", cf.context,
                     "HOST:PORT of a helix-ctx server: prefill there and pull its KV "
                     "(disaggregated); default: the generation server prefills");

  std::string check_path;
  auto* check = app.add_subcommand(
      "check-config", "Validate a config and print it resolved (defaults filled in) as JSON");
  check->add_option("file", check_path, "JSON config file")->required();

  GenerateFlags g;
  auto* gen = app.add_subcommand("generate", "Generate text offline; the text goes to stdout");
  gen->add_option("--model", g.model, "Model: llama2.c .bin, GGUF file, or Hugging Face directory")
      ->required();
  gen->add_option(
      "--tokenizer", g.tokenizer,
      "Tokenizer: llama2.c tokenizer .bin or tokenizer.json (default: the model's own)");
  gen->add_option("--prompt", g.prompt,
                  "Prompt text (default: empty: the BOS token alone, for a tokenizer that adds "
                  "one; others need a prompt)");
  gen->add_option("--max-tokens", g.max_tokens, "Tokens to generate")->capture_default_str();
  gen->add_option("--temperature", g.temperature, "0 = greedy")->capture_default_str();
  gen->add_option("--top-p", g.top_p)->capture_default_str();
  gen->add_option("--top-k", g.top_k, "0 = off")->capture_default_str();
  gen->add_option("--min-p", g.min_p)->capture_default_str();
  gen->add_option("--repetition-penalty", g.repetition_penalty)->capture_default_str();
  gen->add_option("--presence-penalty", g.presence_penalty)->capture_default_str();
  gen->add_option("--frequency-penalty", g.frequency_penalty)->capture_default_str();
  gen->add_option("--seed", g.seed, "Sampling seed (-1 = random)")->capture_default_str();
  gen->add_option("--stop", g.stop, "Stop string (repeatable)");
  gen->add_flag("--ignore-eos", g.ignore_eos, "Do not stop at the end-of-text token");
  // Ranges as the config file's (a usage error naming the flag, exit 2).
  gen->add_option("--tokens-per-block", g.tokens_per_block, "KV cache block size")
      ->check(CLI::Range(1, 65536))
      ->capture_default_str();
  gen->add_option("--kv-dtype", g.kv_dtype, "float32 | float16 | bfloat16")->capture_default_str();
  gen->add_option("--weight-dtype", g.weight_dtype,
                  "Weight matrices in memory: auto (the checkpoint's precision) | float32 | "
                  "float16 | bfloat16")
      ->capture_default_str();
  gen->add_option("--max-seq-len", g.max_seq_len, "0 = the model's maximum")
      ->check(CLI::Range(0, 1 << 30))
      ->capture_default_str();
  gen->add_option("--threads", g.threads, "CPU threads (0 = all cores)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  gen->add_option("--backend", g.backend,
                  "cpu | cuda (CUDA builds; rank r on GPU r modulo the visible GPUs)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  gen->add_flag("--cuda-graphs,!--no-cuda-graphs", g.cuda_graphs,
                "cuda backend, one rank: run decode steps as CUDA graphs (default on)");
  gen->add_option("--tp", g.tp, "Tensor-parallel size")->capture_default_str();
  gen->add_option("--cp", g.cp, "Context-parallel (Helix) size")->capture_default_str();
  gen->add_option("--rank", g.rank,
                  "This process's Helix rank (set by the leader for the ranks it starts, or by "
                  "a multi-node launcher; also OMPI_COMM_WORLD_RANK, SLURM_PROCID, HELIX_RANK)");
  gen->add_option("--world-size", g.world_size, "Number of ranks (must be tp x cp)");
  gen->add_option("--leader-addr", g.leader_addr,
                  "HOST:PORT of the leader's rendezvous store (ranks other than 0; the leader "
                  "listens there when given)");
  gen->add_option("--comm-timeout-ms", g.comm_timeout_ms,
                  "Rendezvous and collective timeout in milliseconds")
      ->check(CLI::Range(int64_t{1}, helix::config::kMaxDurationMs))
      ->capture_default_str();
  gen->add_option("--log-level", g.log_level, "trace|debug|info|warn|error|off")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  if (*check)
    return helix::server::CheckConfigCommand(check_path, helix::server::ConfigKind::kGeneration);
  if (*serve) return RunServe(sf);
  if (*client) return RunClient(cf);
  return RunGenerate(g);
}
