// helix-gen serve end to end: a CP = 2 daemon on stories260K (loopback, free port) driven by a
// gRPC client. Concurrent streams return exactly what each returns alone; cancel, deadline
// and client disconnect free their blocks without disturbing others; bad requests get
// INVALID_ARGUMENT naming the field; a killed rank ends streams with UNAVAILABLE and its leader
// exits 1 (busy or idle); SIGTERM drains in-flight streams and exits 0.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "engine/parallel/launcher.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "helix/v1/generation.grpc.pb.h"
#include "tests/port_util.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using helix::v1::GenerateRequest;
using helix::v1::GenerateResponse;

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

// Whether process `pid` has ended (left unreaped).
bool Ended(pid_t pid) {
  siginfo_t info{};
  return waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0 ||
         info.si_pid == pid;
}

// Whether something accepts TCP connections on 127.0.0.1:port by `deadline`, polling while
// process `pid` lives.
bool WaitListening(int port, pid_t pid, Clock::time_point deadline) {
  while (Clock::now() < deadline && !Ended(pid)) {
    if (helix::testing::PortOpen(port)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

struct StreamResult {
  std::vector<int32_t> tokens;
  std::string text;
  helix::v1::FinishReason reason = helix::v1::FINISH_REASON_UNSPECIFIED;
  grpc::Status status;
};

class Daemon {
 public:
  // Starts helix-gen serve with context_parallel_size `cp` (and `server_extra`, more JSON
  // members of "server"); connects with `creds` (default: insecure); waits until health is
  // SERVING. `args` go to helix-gen serve after its own; `config_extra`, more top-level JSON
  // members of the config (each preceded by a comma).
  explicit Daemon(int cp, const std::string& server_extra = "",
                  std::shared_ptr<grpc::ChannelCredentials> creds = nullptr,
                  const std::vector<std::string>& args = {}, const std::string& config_extra = "",
                  int64_t kv_tokens = 8192) {
    auto port = helix::parallel::PickFreePort("127.0.0.1");
    EXPECT_TRUE(port.ok());
    port_ = *port;
    dir_ = fs::temp_directory_path() /
           ("helix_serve_test_" + std::to_string(getpid()) + "_" + std::to_string(port_));
    fs::create_directories(dir_);
    const std::string m = Env("HELIX_SHARED_DIR") + "/models/stories260K";
    // A model path unique to this daemon, so that its rank processes can be found.
    fs::create_symlink(m + "/stories260K.bin", dir_ / "model.bin");
    std::ofstream(dir_ / "gen.json") << R"({
      "model": "model.bin", "tokenizer": ")"
                                     << m << R"(/tok512.bin",
      "backend": "cpu", "num_threads": 1, "context_parallel_size": )"
                                     << cp << R"(,
      "cp_config": {"cp_type": "HELIX", "tokens_per_block": 8},
      "kv_cache_config": {"tokens_per_block": 8, "max_tokens": )"
                                     << kv_tokens << R"(},
      "max_batch_size": 16, "max_seq_len": 512,
      "server": {"host": "127.0.0.1", "port": )"
                                     << port_ << server_extra << R"(},
      "logging": {"level": "warn"})" << config_extra
                                     << "}";
    pid_ = fork();
    if (pid_ == 0) {
      const std::string bin = Env("HELIX_GEN_BIN");
      const std::string cfg = (dir_ / "gen.json").string();
      std::vector<std::string> all = {bin, "serve", "--config", cfg, "--drain-ms", "20000"};
      all.insert(all.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (std::string& a : all) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(bin.c_str(), argv.data());
      _exit(127);
    }
    // The channel is made once the daemon listens: a TLS channel whose first attempt found no
    // listener stalled for about 20 s (gRPC's minimum connect timeout) before its next.
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    EXPECT_TRUE(WaitListening(port_, pid_, deadline)) << "helix-gen serve never listened";
    // Reconnect quickly should the daemon stall (gRPC's default backoff grows to seconds).
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
    channel_ = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port_),
                                         creds ? creds : grpc::InsecureChannelCredentials(), args);
    stub_ = helix::v1::GenerationService::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
    while (Clock::now() < deadline && !Ended(pid_) &&
           Health() != grpc::health::v1::HealthCheckResponse::SERVING) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ~Daemon() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    // No rank may outlive the daemon (they die with their leader).
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_EQ(RankCount(), 0);
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  int RankCount() const {
    // "[g]en.json" does not match the shell running pgrep itself.
    const std::string cmd = "pgrep -f -- '" + dir_.string() + "/[g]en.json.*--rank' | wc -l";
    FILE* p = popen(cmd.c_str(), "r");
    int n = 0;
    if (p != nullptr) {
      if (fscanf(p, "%d", &n) != 1) n = -1;
      pclose(p);
    }
    return n;
  }
  void Signal(int sig) const { kill(pid_, sig); }
  pid_t RankPid() const {
    const std::string cmd = "pgrep -f -- '" + dir_.string() + "/[g]en.json.*--rank 1'";
    FILE* p = popen(cmd.c_str(), "r");
    int pid = 0;
    if (p != nullptr) {
      if (fscanf(p, "%d", &pid) != 1) pid = 0;
      pclose(p);
    }
    return pid;
  }

  grpc::health::v1::HealthCheckResponse::ServingStatus Health() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    if (!health_->Check(&ctx, req, &resp).ok())
      return grpc::health::v1::HealthCheckResponse::UNKNOWN;
    return resp.status();
  }

  // The services server reflection lists.
  std::vector<std::string> ReflectedServices() {
    auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel_);
    grpc::ClientContext ctx;
    auto stream = stub->ServerReflectionInfo(&ctx);
    grpc::reflection::v1alpha::ServerReflectionRequest req;
    req.set_list_services("*");
    std::vector<std::string> names;
    grpc::reflection::v1alpha::ServerReflectionResponse resp;
    if (stream->Write(req) && stream->Read(&resp)) {
      for (const auto& s : resp.list_services_response().service()) names.push_back(s.name());
    }
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
    return names;
  }

  helix::v1::ServerInfo Info(grpc::Status* status = nullptr) {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    helix::v1::ServerInfo info;
    grpc::Status st = stub_->GetServerInfo(&ctx, {}, &info);
    if (status != nullptr) {
      *status = st;
    } else {
      EXPECT_TRUE(st.ok()) << st.error_message();
    }
    return info;
  }

  // The API key the next calls send ("" = none).
  void set_api_key(std::string key) { api_key_ = std::move(key); }
  void Authorize(grpc::ClientContext* ctx) const {
    if (!api_key_.empty()) ctx->AddMetadata("authorization", "Bearer " + api_key_);
  }

  // Runs one stream; `cancel_after` > 0 cancels once that many tokens arrived; `deadline_ms`
  // sets a deadline.
  StreamResult Run(const GenerateRequest& req, int cancel_after = 0, int deadline_ms = 0) {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    if (deadline_ms > 0) {
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    }
    StreamResult r;
    auto reader = stub_->Generate(&ctx, req);
    GenerateResponse m;
    while (reader->Read(&m)) {
      if (m.token_id() >= 0) r.tokens.push_back(m.token_id());
      r.text += m.text();
      if (m.finish_reason() != helix::v1::FINISH_REASON_UNSPECIFIED) r.reason = m.finish_reason();
      if (cancel_after > 0 && static_cast<int>(r.tokens.size()) == cancel_after) ctx.TryCancel();
    }
    r.status = reader->Finish();
    return r;
  }

  grpc::Status Cancel(const std::string& id) {
    grpc::ClientContext ctx;
    helix::v1::CancelRequest req;
    req.set_request_id(id);
    helix::v1::CancelResponse resp;
    return stub_->Cancel(&ctx, req, &resp);
  }

  // As Run, calling on_token(n) after the n-th token.
  StreamResult RunWith(const GenerateRequest& req, const std::function<void(size_t)>& on_token) {
    grpc::ClientContext ctx;
    StreamResult r;
    auto reader = stub_->Generate(&ctx, req);
    GenerateResponse m;
    while (reader->Read(&m)) {
      if (m.token_id() >= 0) r.tokens.push_back(m.token_id());
      if (m.finish_reason() != helix::v1::FINISH_REASON_UNSPECIFIED) r.reason = m.finish_reason();
      if (m.token_id() >= 0) on_token(r.tokens.size());
    }
    r.status = reader->Finish();
    return r;
  }

  pid_t pid() const { return pid_; }
  void forget_pid() { pid_ = -1; }
  // The daemon's exit code once it exits within `wait` (reaped), else -1 (it is left running).
  int ExitStatus(std::chrono::milliseconds wait) {
    const auto deadline = Clock::now() + wait;
    int st = 0;
    while (Clock::now() < deadline) {
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }

 private:
  int port_ = 0;
  pid_t pid_ = -1;
  std::string api_key_;
  fs::path dir_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<helix::v1::GenerationService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

GenerateRequest Greedy(const std::string& text, int max_tokens) {
  GenerateRequest r;
  r.set_text(text);
  r.set_max_tokens(max_tokens);
  r.mutable_sampling()->set_temperature(0);
  r.set_ignore_eos(true);
  return r;
}

// Every request streamed at once, each on its own thread.
std::vector<StreamResult> RunTogether(Daemon& d, const std::vector<GenerateRequest>& reqs) {
  std::vector<StreamResult> together(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] { together[i] = d.Run(reqs[i]); });
  }
  for (auto& t : threads) t.join();
  return together;
}

class ServeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(Env("HELIX_SHARED_DIR") + "/models/stories260K/stories260K.bin")) {
      GTEST_SKIP() << "stories260K not found under HELIX_SHARED_DIR";
    }
    ASSERT_FALSE(Env("HELIX_GEN_BIN").empty()) << "HELIX_GEN_BIN is not set";
  }
};

TEST_F(ServeTest, ConcurrentStreamsCancelDeadlineAndBadInput) {
  Daemon d(2);
  ASSERT_EQ(d.Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  const helix::v1::ServerInfo info = d.Info();
  EXPECT_EQ(info.context_parallel_size(), 2);
  EXPECT_EQ(info.cp_type(), "HELIX");
  EXPECT_EQ(info.tokens_per_block(), 8);
  EXPECT_EQ(info.model_fingerprint().size(), 16u);
  EXPECT_EQ(info.capacity_scheduler_policy(), "GUARANTEED_NO_EVICT");
  const std::vector<std::string> services = d.ReflectedServices();
  for (const char* want : {"helix.v1.GenerationService", "grpc.health.v1.Health"}) {
    EXPECT_NE(std::find(services.begin(), services.end(), want), services.end()) << want;
  }
  EXPECT_EQ(d.RankCount(), 1);

  // 64 streams of different prompts and lengths, alone and then all at once.
  const char* prompts[] = {"Once upon a time", "The dog", "Lily and Ben", "A big red ball",
                           "Tim was",          "One day", "The sun",      "She said"};
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 64; ++i) reqs.push_back(Greedy(prompts[i % 8], 5 + (i * 7) % 30));
  // Alone, each stream's blocks are free by the time its final message arrives: a router that
  // asks for the free count right after a stream must not see them still taken.
  std::vector<StreamResult> alone;
  int stale_free_counts = 0;
  for (const GenerateRequest& r : reqs) {
    alone.push_back(d.Run(r));
    if (d.Info().kv_free_blocks() != info.kv_total_blocks()) ++stale_free_counts;
  }
  EXPECT_EQ(stale_free_counts, 0);
  const std::vector<StreamResult> together = RunTogether(d, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(together[i].status.ok()) << together[i].status.error_message();
    EXPECT_EQ(together[i].reason, helix::v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(static_cast<int>(together[i].tokens.size()), reqs[i].max_tokens());
    EXPECT_EQ(together[i].tokens, alone[i].tokens);
    EXPECT_EQ(together[i].text, alone[i].text);
  }

  // A stop string ends the text, or (include_stop_str_in_output) ends it and stays.
  GenerateRequest stop = Greedy("Once upon a time", 60);
  stop.add_stop("park");
  const StreamResult cut = d.Run(stop);
  stop.set_include_stop_str_in_output(true);
  const StreamResult kept = d.Run(stop);
  EXPECT_EQ(cut.reason, helix::v1::FINISH_REASON_STOP);
  EXPECT_EQ(kept.reason, helix::v1::FINISH_REASON_STOP);
  EXPECT_EQ(kept.text, cut.text + "park");

  // Cancel mid-stream, a deadline, and a neighbour that must not notice.
  const StreamResult ref = d.Run(Greedy("Once upon a time", 200));
  StreamResult neighbour;
  std::thread nt([&] { neighbour = d.Run(Greedy("Once upon a time", 200)); });
  const StreamResult cancelled = d.Run(Greedy("The cat", 200), /*cancel_after=*/5);
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  const StreamResult late = d.Run(Greedy("The cat", 400), 0, /*deadline_ms=*/150);
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  nt.join();
  ASSERT_TRUE(neighbour.status.ok()) << neighbour.status.error_message();
  EXPECT_EQ(neighbour.tokens, ref.tokens);
  // Blocks come back by the next step.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < deadline && d.Info().kv_free_blocks() != info.kv_total_blocks()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(d.Info().kv_free_blocks(), info.kv_total_blocks());

  // Bad input: INVALID_ARGUMENT (or UNIMPLEMENTED) naming the field; the daemon stays up.
  struct Bad {
    GenerateRequest req;
    grpc::StatusCode code;
    std::string says;
  };
  std::vector<Bad> bad;
  {
    GenerateRequest r = Greedy("x", 5);
    r.clear_text();
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "prompt"});
  }
  {
    GenerateRequest r = Greedy("", 5);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "prompt.text is empty"});
  }
  {
    GenerateRequest r = Greedy("x", 5);
    r.mutable_token_ids()->add_ids(100000);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "outside the vocabulary"});
  }
  {
    GenerateRequest r = Greedy("x", 5);
    (*r.mutable_sampling()->mutable_logit_bias())[7] = 101;
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "logit_bias[7] = 101"});
  }
  {
    GenerateRequest r = Greedy("x", 5);
    r.mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN());
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "temperature"});
  }
  {
    GenerateRequest r = Greedy("x", 5);
    r.mutable_sampling()->set_temperature(-1);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "temperature"});
  }
  {
    GenerateRequest r = Greedy("x", 5);
    r.mutable_sampling()->set_top_p(1.5f);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "top_p"});
  }
  {
    GenerateRequest r = Greedy("x", 0);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "max_tokens"});
  }
  {
    GenerateRequest r = Greedy("x", 100000);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "max_seq_len"});
  }
  {
    GenerateRequest r = Greedy(std::string(17 << 20, 'a'), 5);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "prompt.text is 17825792 bytes"});
  }
  {
    GenerateRequest r = Greedy("x", 5);
    r.mutable_kv_handle()->set_server_id("ctx-0");  // an incomplete handle
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "kv_handle.rkeys"});
  }
  {
    GenerateRequest r = Greedy("x", 5);
    r.set_first_token(7);
    bad.push_back({r, grpc::StatusCode::INVALID_ARGUMENT, "first_token"});
  }
  for (const Bad& b : bad) {
    const StreamResult r = d.Run(b.req);
    EXPECT_EQ(r.status.error_code(), b.code) << b.says << ": " << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(b.says), std::string::npos) << r.status.error_message();
  }
  EXPECT_EQ(d.Run(Greedy("Once upon a time", 8)).tokens,
            std::vector<int32_t>(ref.tokens.begin(), ref.tokens.begin() + 8));

  // An explicit Cancel by request id.
  GenerateRequest named = Greedy("The cat", 300);
  named.set_request_id("cancel-me");
  const StreamResult by_id = d.RunWith(named, [&](size_t n) {
    if (n == 5) {
      EXPECT_TRUE(d.Cancel("cancel-me").ok());
    }
  });
  EXPECT_EQ(by_id.reason, helix::v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(by_id.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(by_id.tokens.size(), 300u);

  // Back-pressure: beyond 4 x max_batch_size requests in flight, RESOURCE_EXHAUSTED at once.
  // The 80 requests are sent together (every thread waits for the others first) and each runs
  // 120 tokens, so that more than 64 are in flight at one moment even on a loaded machine: short
  // requests from threads started one by one could finish before the last ones were sent.
  const StreamResult long_ref = d.Run(Greedy("Once upon a time", 120));
  ASSERT_EQ(long_ref.tokens.size(), 120u) << long_ref.status.error_message();
  std::vector<StreamResult> flood(80);
  std::latch start(std::ssize(flood));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < flood.size(); ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      flood[i] = d.Run(Greedy("Once upon a time", 120));
    });
  }
  for (auto& t : threads) t.join();
  int refused = 0, served = 0;
  for (const StreamResult& r : flood) {
    if (r.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++refused;
      EXPECT_NE(r.status.error_message().find("admission queue full"), std::string::npos);
    } else {
      ++served;
      EXPECT_TRUE(r.status.ok()) << r.status.error_message();
      EXPECT_EQ(r.tokens, long_ref.tokens);
    }
  }
  EXPECT_GE(served, 64);
  EXPECT_GE(refused, 1);

  // SIGTERM: the stream in flight finishes, then the daemon exits 0.
  // (Signalled at its first token: the daemon has admitted it by then.)
  const StreamResult draining = d.RunWith(Greedy("Once upon a time", 120), [&](size_t n) {
    if (n == 1) kill(d.pid(), SIGTERM);
  });
  EXPECT_TRUE(draining.status.ok()) << draining.status.error_message();
  EXPECT_EQ(draining.tokens.size(), 120u);
  int st = 0;
  waitpid(d.pid(), &st, 0);
  d.forget_pid();
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << st;
}

// scheduler_config.capacity_scheduler_policy MAX_UTILIZATION on a Helix pair of ranks with a
// pool of 8 blocks a rank: eight streams that each fit alone run together, some preempted and
// recomputed, and each gets the tokens it gets alone; GetServerInfo counts the preemptions.
TEST_F(ServeTest, MaxUtilizationPreemptsAndKeepsStreamsExact) {
  Daemon d(2, "", nullptr, {},
           R"(, "scheduler_config": {"capacity_scheduler_policy": "MAX_UTILIZATION"})", 64);
  ASSERT_EQ(d.Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  const helix::v1::ServerInfo info = d.Info();
  EXPECT_EQ(info.capacity_scheduler_policy(), "MAX_UTILIZATION");
  EXPECT_EQ(info.kv_preemptions(), 0u);
  const char* prompts[] = {"Once upon a time", "The dog", "Lily and Ben", "A big red ball"};
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 8; ++i) reqs.push_back(Greedy(prompts[i % 4], 80 + 10 * (i % 3)));
  std::vector<StreamResult> alone;
  for (const GenerateRequest& r : reqs) alone.push_back(d.Run(r));
  EXPECT_EQ(d.Info().kv_preemptions(), 0u);
  const std::vector<StreamResult> together = RunTogether(d, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(alone[i].status.ok()) << alone[i].status.error_message();
    ASSERT_TRUE(together[i].status.ok()) << together[i].status.error_message();
    EXPECT_EQ(together[i].tokens, alone[i].tokens);
    EXPECT_EQ(together[i].text, alone[i].text);
  }
  const helix::v1::ServerInfo after = d.Info();
  EXPECT_GT(after.kv_preemptions(), 0u);
  EXPECT_EQ(after.kv_free_blocks(), info.kv_total_blocks());
}

TEST_F(ServeTest, KilledRankEndsStreamsAndStopsTheLeader) {
  Daemon d(2);
  ASSERT_EQ(d.Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  const pid_t rank = d.RankPid();
  ASSERT_GT(rank, 0);
  // The rank is killed from the stream itself, once 3 tokens arrived: a kill after a fixed delay
  // could come after all 400 tokens on a fast machine (or before the first on a slow one).
  const StreamResult r = d.RunWith(Greedy("Once upon a time", 400), [&](size_t n) {
    if (n == 3) kill(rank, SIGKILL);
  });
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << r.status.error_message();
  EXPECT_LT(r.tokens.size(), 400u);
  const StreamResult after = d.Run(Greedy("Once", 5));
  EXPECT_EQ(after.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  // The leader notices its rank is gone and stops with a failure status (a supervisor
  // restarts the instance), rather than serving NOT_SERVING forever beside a zombie.
  EXPECT_EQ(d.ExitStatus(std::chrono::seconds(20)), 1) << "the leader did not exit 1";
}

// A rank that dies while no request runs is noticed too: the leader exits at once.
TEST_F(ServeTest, IdleRankDeathStopsTheLeader) {
  Daemon d(2);
  ASSERT_EQ(d.Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  const pid_t rank = d.RankPid();
  ASSERT_GT(rank, 0);
  kill(rank, SIGKILL);
  EXPECT_EQ(d.ExitStatus(std::chrono::seconds(20)), 1) << "the leader did not exit 1";
}

// A rank that hangs (SIGSTOP; or its host gone) breaks the instance at the leader's next
// collective, here the idle heartbeat, once comm_timeout passes. Such an instance never serves
// again, so the leader exits 1 for its supervisor to restart it, rather than staying up
// NOT_SERVING beside the hung rank (which it stops on the way out).
TEST_F(ServeTest, HungRankStopsTheLeader) {
  Daemon d(2, "", nullptr, {"--heartbeat-ms", "100", "--comm-timeout-ms", "5000"});
  ASSERT_EQ(d.Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  const pid_t rank = d.RankPid();
  ASSERT_GT(rank, 0);
  kill(rank, SIGSTOP);
  const int status = d.ExitStatus(std::chrono::seconds(40));
  // Still running, the leader is killed by d; its stopped rank, still its child, is killed
  // here (once the leader has exited, the rank was reaped by it and its pid may be reused).
  if (status < 0) kill(rank, SIGKILL);
  EXPECT_EQ(status, 1) << "the leader did not exit 1";
}

// A leader that stops answering without closing its connections (its host gone; here SIGSTOP)
// no longer leaves its worker ranks waiting for a day: they exit once 12 heartbeats are missed.
// While the leader lives and idles, its heartbeats keep them.
TEST_F(ServeTest, WorkersLeaveALeaderThatWentSilent) {
  // Workers wait 12 x 100 ms + kv_transfer_timeout_ms + 5 s = 6.3 s for a step.
  Daemon d(2, "", nullptr, {"--heartbeat-ms", "100"},
           R"(, "cache_transceiver_config": {"kv_transfer_timeout_ms": 100})");
  ASSERT_EQ(d.Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  ASSERT_GT(d.RankPid(), 0);
  std::this_thread::sleep_for(std::chrono::seconds(8));  // idle for longer than the workers wait
  const StreamResult r = d.Run(Greedy("Once", 5));
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens.size(), 5u);
  EXPECT_EQ(d.RankCount(), 1);
  d.Signal(SIGSTOP);
  const auto t0 = Clock::now();
  while (d.RankCount() > 0 && Clock::now() - t0 < std::chrono::seconds(30)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(d.RankCount(), 0) << "the worker still waits for its silent leader";
  // (Woken, the leader finds its rank gone and exits 1 once its own heartbeat's send to that
  // rank has timed out, comm_timeout = 30 s: not waited for here.)
  d.Signal(SIGCONT);
}

TEST_F(ServeTest, TlsAndApiKey) {
  // A self-signed certificate for 127.0.0.1, made for this test.
  const fs::path dir = fs::temp_directory_path() / ("helix_tls_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string cert = (dir / "cert.pem").string(), key = (dir / "key.pem").string();
  const std::string cmd =
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
      "-addext subjectAltName=IP:127.0.0.1 -keyout " +
      key + " -out " + cert + " >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "openssl could not make a test certificate";
  std::ifstream in(cert);
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  {
    Daemon d(1,
             R"(, "tls_cert_file": ")" + cert + R"(", "tls_key_file": ")" + key +
                 R"(", "api_key": "s3cret")",
             grpc::SslCredentials(ssl));
    ASSERT_EQ(d.Health(), grpc::health::v1::HealthCheckResponse::SERVING);  // health is open
    grpc::Status st;
    d.Info(&st);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(d.Run(Greedy("Once", 5)).status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    d.set_api_key("wrong");
    EXPECT_EQ(d.Run(Greedy("Once", 5)).status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    d.set_api_key("s3cret");
    const StreamResult ok = d.Run(Greedy("Once", 5));
    EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
    EXPECT_EQ(ok.tokens.size(), 5u);
  }
  // Without TLS on the client, the TLS server is unreachable (no silent plaintext).
  std::error_code ec;
  fs::remove_all(dir, ec);
}

}  // namespace
