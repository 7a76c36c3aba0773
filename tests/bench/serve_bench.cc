// Serving overhead: the same workload — `concurrency` requests at once, each a greedy
// completion of `tokens` tokens, repeated `rounds` times — run in-process on an Engine and
// through `helix-gen serve` over gRPC on loopback. Prints time to first token and inter-token
// latency (p50/p99, ms) and tokens/s for each, and the gRPC / in-process tokens/s ratio.
//   serve_bench --gen PATH/helix-gen --model M --tokenizer T [--concurrency 1,8,32]
//               [--tokens 64] [--rounds 3] [--threads 2] [--router PATH/helix-router]
// With --router, helix-router (its gRPC front) is also put in front of the same daemon and
// measured against the direct gRPC path in the same run.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "engine/parallel/launcher.h"
#include "helix/v1/generation.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

struct Args {
  std::string gen, model, tokenizer, router;
  std::vector<int> concurrency = {1, 8, 32};
  int tokens = 64, rounds = 3, threads = 2;
};

// Per request: submit time and the arrival time of each token.
struct Trace {
  Clock::time_point submit;
  std::vector<Clock::time_point> tokens;
};

struct Summary {
  double ttft_p50, ttft_p99, itl_p50, itl_p99, tok_s;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

Summary Summarise(const std::vector<Trace>& traces, double seconds) {
  std::vector<double> ttft, itl;
  size_t n = 0;
  for (const Trace& t : traces) {
    if (t.tokens.empty()) continue;
    ttft.push_back(std::chrono::duration<double, std::milli>(t.tokens[0] - t.submit).count());
    for (size_t i = 1; i < t.tokens.size(); ++i) {
      itl.push_back(
          std::chrono::duration<double, std::milli>(t.tokens[i] - t.tokens[i - 1]).count());
    }
    n += t.tokens.size();
  }
  return {Percentile(ttft, 0.5), Percentile(ttft, 0.99), Percentile(itl, 0.5),
          Percentile(itl, 0.99), static_cast<double>(n) / seconds};
}

std::vector<int32_t> Prompt(int i) {
  // Distinct short prompts (BOS + a few ids of the stories260K vocabulary).
  return {1, 300 + i % 100, 259 + (i * 7) % 200, 400 + (i * 13) % 100};
}

// In-process: an engine thread steps while every request's sink timestamps its tokens.
Summary RunInProcess(helix::Engine* e, int conc, const Args& a) {
  std::vector<Trace> traces;
  const auto t0 = Clock::now();
  for (int round = 0; round < a.rounds; ++round) {
    std::vector<Trace> rt(conc);
    for (int i = 0; i < conc; ++i) {
      helix::GenerateRequest r;
      r.prompt_tokens = Prompt(i);
      r.max_tokens = a.tokens;
      r.ignore_eos = true;
      r.sampling.temperature = 0;
      r.sink = [&rt, i](const helix::TokenEvent& ev) {
        if (ev.token >= 0) rt[i].tokens.push_back(Clock::now());
      };
      rt[i].submit = Clock::now();
      if (!e->Submit(std::move(r)).ok()) std::exit(1);
    }
    while (e->HasWork()) e->Step();
    traces.insert(traces.end(), rt.begin(), rt.end());
  }
  return Summarise(traces, std::chrono::duration<double>(Clock::now() - t0).count());
}

Summary RunGrpc(helix::v1::GenerationService::Stub* stub, int conc, const Args& a) {
  std::vector<Trace> traces;
  const auto t0 = Clock::now();
  for (int round = 0; round < a.rounds; ++round) {
    std::vector<Trace> rt(conc);
    std::vector<std::thread> th;
    for (int i = 0; i < conc; ++i) {
      th.emplace_back([&, i] {
        helix::v1::GenerateRequest req;
        for (int32_t id : Prompt(i)) req.mutable_token_ids()->add_ids(id);
        req.set_max_tokens(a.tokens);
        req.set_ignore_eos(true);
        req.mutable_sampling()->set_temperature(0);
        grpc::ClientContext ctx;
        rt[i].submit = Clock::now();
        auto reader = stub->Generate(&ctx, req);
        helix::v1::GenerateResponse m;
        while (reader->Read(&m)) {
          if (m.token_id() >= 0) rt[i].tokens.push_back(Clock::now());
        }
        if (!reader->Finish().ok()) std::exit(1);
      });
    }
    for (auto& t : th) t.join();
    traces.insert(traces.end(), rt.begin(), rt.end());
  }
  return Summarise(traces, std::chrono::duration<double>(Clock::now() - t0).count());
}

void Print(const char* how, int conc, const Summary& s) {
  std::printf("%-10s %5d %9.3f %9.3f %9.3f %9.3f %11.1f\n", how, conc, s.ttft_p50, s.ttft_p99,
              s.itl_p50, s.itl_p99, s.tok_s);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--gen") {
      a.gen = v;
    } else if (k == "--model") {
      a.model = v;
    } else if (k == "--tokenizer") {
      a.tokenizer = v;
    } else if (k == "--router") {
      a.router = v;
    } else if (k == "--tokens") {
      a.tokens = std::atoi(v.c_str());
    } else if (k == "--rounds") {
      a.rounds = std::atoi(v.c_str());
    } else if (k == "--threads") {
      a.threads = std::atoi(v.c_str());
    } else if (k == "--concurrency") {
      a.concurrency.clear();
      std::stringstream ss(v);
      std::string x;
      while (std::getline(ss, x, ',')) a.concurrency.push_back(std::atoi(x.c_str()));
    } else {
      std::fprintf(stderr, "serve_bench: unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  if (a.gen.empty() || a.model.empty()) {
    std::fprintf(stderr, "serve_bench: --gen and --model are required\n");
    return 2;
  }
  const int max_conc = *std::max_element(a.concurrency.begin(), a.concurrency.end());

  // The daemon, with the engine options the in-process run uses.
  auto port = helix::parallel::PickFreePort("127.0.0.1");
  if (!port.ok()) return 1;
  const fs::path cfg =
      fs::temp_directory_path() / ("serve_bench_" + std::to_string(getpid()) + ".json");
  std::ofstream(cfg) << "{\"model\": \"" << a.model << "\", "
                     << (a.tokenizer.empty() ? "" : "\"tokenizer\": \"" + a.tokenizer + "\", ")
                     << "\"num_threads\": " << a.threads << ", \"max_batch_size\": " << max_conc
                     << ", \"kv_cache_config\": {\"tokens_per_block\": 32, \"max_tokens\": "
                     << max_conc * (a.tokens + 64) << "}, \"server\": {\"host\": \"127.0.0.1\", "
                     << "\"port\": " << *port << "}, \"logging\": {\"level\": \"warn\"}}";
  const pid_t pid = fork();
  if (pid == 0) {
    execl(a.gen.c_str(), a.gen.c_str(), "serve", "--config", cfg.c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(*port), grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(60))) {
    std::fprintf(stderr, "serve_bench: the daemon did not come up\n");
    kill(pid, SIGKILL);
    return 1;
  }
  auto stub = helix::v1::GenerationService::NewStub(channel);

  // Optionally helix-router in front of the same daemon (its gRPC front, aggregated mode): the
  // router's added latency per token is its row minus the direct gRPC row.
  pid_t router_pid = -1;
  std::unique_ptr<helix::v1::GenerationService::Stub> router_stub;
  const fs::path rcfg =
      fs::temp_directory_path() / ("serve_bench_router_" + std::to_string(getpid()) + ".json");
  if (!a.router.empty()) {
    auto http_port = helix::parallel::PickFreePort("127.0.0.1");
    auto grpc_port = helix::parallel::PickFreePort("127.0.0.1");
    if (!http_port.ok() || !grpc_port.ok()) return 1;
    std::ofstream(rcfg) << "{\"server\": {\"host\": \"127.0.0.1\", \"port\": " << *http_port
                        << "}, \"grpc_port\": " << *grpc_port << ", \"model\": \"" << a.model
                        << "\", "
                        << (a.tokenizer.empty() ? "" : "\"tokenizer\": \"" + a.tokenizer + "\", ")
                        << "\"generation_servers\": {\"urls\": [\"127.0.0.1:" << *port
                        << "\"]}, \"health_check_interval_ms\": 200, "
                        << "\"logging\": {\"level\": \"warn\"}}";
    router_pid = fork();
    if (router_pid == 0) {
      execl(a.router.c_str(), a.router.c_str(), "--config", rcfg.c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
    auto rch = grpc::CreateChannel("127.0.0.1:" + std::to_string(*grpc_port),
                                   grpc::InsecureChannelCredentials());
    if (!rch->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(60))) {
      std::fprintf(stderr, "serve_bench: the router did not come up\n");
      kill(pid, SIGKILL);
      kill(router_pid, SIGKILL);
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(600));  // a health poll admits the server
    router_stub = helix::v1::GenerationService::NewStub(rch);
  }

  helix::EngineOptions o;
  o.model_path = a.model;
  o.tokenizer_path = a.tokenizer;
  o.num_threads = a.threads;
  o.max_batch_size = max_conc;
  o.kv_max_tokens = max_conc * (a.tokens + 64);
  auto engine = helix::Engine::Create(o);
  if (!engine.ok()) {
    std::fprintf(stderr, "serve_bench: %s\n", engine.status().ToString().c_str());
    kill(pid, SIGKILL);
    return 1;
  }
  std::printf("# serve_bench: %s, %d tokens per request, %d rounds, %d threads\n", a.model.c_str(),
              a.tokens, a.rounds, a.threads);
  std::printf("%-10s %5s %9s %9s %9s %9s %11s\n", "how", "conc", "ttft_p50", "ttft_p99", "itl_p50",
              "itl_p99", "tokens/s");
  for (int conc : a.concurrency) {
    RunGrpc(stub.get(), conc, a);  // warm-up of both paths
    RunInProcess(engine->get(), conc, a);
    const Summary in = RunInProcess(engine->get(), conc, a);
    const Summary rpc = RunGrpc(stub.get(), conc, a);
    Print("in-process", conc, in);
    Print("grpc", conc, rpc);
    std::printf("# concurrency %d: grpc / in-process tokens/s = %.3f\n", conc,
                rpc.tok_s / in.tok_s);
    if (router_stub) {
      RunGrpc(router_stub.get(), conc, a);  // warm-up
      const Summary direct = RunGrpc(stub.get(), conc, a);
      const Summary routed = RunGrpc(router_stub.get(), conc, a);
      Print("grpc", conc, direct);
      Print("router", conc, routed);
      std::printf(
          "# concurrency %d: router adds %.3f ms per token (itl p50), %.3f ms to ttft "
          "(p50); router / direct tokens/s = %.3f\n",
          conc, routed.itl_p50 - direct.itl_p50, routed.ttft_p50 - direct.ttft_p50,
          routed.tok_s / direct.tok_s);
    }
    std::fflush(stdout);
  }
  if (router_pid > 0) {
    kill(router_pid, SIGTERM);
    waitpid(router_pid, nullptr, 0);
    fs::remove(rcfg);
  }
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
  fs::remove(cfg);
  return 0;
}
