// KV hand-off benchmark (issue 6): throughput of pulling a prompt's KV blocks from a context
// server's exported pool with UcxTransfer (the generation ranks' path), for 1K..64K-token
// prompts, and the hand-off latency inside the engines (context prefill done -> the
// generation engine holds the KV and can run its first decode step).
//
// The exporter runs in a second process (this binary re-executed), as a context server does.
// Run it next to ucx_perftest on the same transport: tests/bench/kv_transfer_bench.sh does
// both. Block geometry defaults to SmolLM2-135M's (30 layers, 3 KV heads x 64, bf16, 32
// tokens per block: 737,280 bytes per block).
//
//   kv_transfer_bench [--tokens 1024,4096,16384,65536] [--reps 5] [--model stories.bin
//                      --tokenizer tok.bin]
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/transfer/ucx_transfer.h"

namespace {

using Clock = std::chrono::steady_clock;
using helix::transfer::JobState;
using helix::transfer::PullJob;
using helix::transfer::UcxTransfer;

constexpr int64_t kLayers = 30, kKvHeads = 3, kHeadDim = 64, kTpb = 32, kElem = 2;
constexpr int64_t kBlockBytes = kLayers * 2 * kKvHeads * kTpb * kHeadDim * kElem;
constexpr const char* kExporterEnv = "HELIX_KV_BENCH_EXPORTER";

void PutString(int fd, const std::string& s) {
  const uint64_t n = s.size();
  if (write(fd, &n, 8) != 8 || write(fd, s.data(), n) != static_cast<ssize_t>(n)) _exit(3);
}

std::string GetString(int fd) {
  uint64_t n = 0;
  if (read(fd, &n, 8) != 8) return {};
  std::string s(n, '\0');
  size_t got = 0;
  while (got < n) {
    const ssize_t r = read(fd, s.data() + got, n - got);
    if (r <= 0) return {};
    got += static_cast<size_t>(r);
  }
  return s;
}

// The exporter process: a pool of `blocks` blocks, registered and published on fd.
[[noreturn]] void RunExporter(int fd, int64_t blocks) {
  std::vector<uint8_t> pool(static_cast<size_t>(blocks * kBlockBytes));
  for (size_t i = 0; i < pool.size(); i += 4096) pool[i] = static_cast<uint8_t>(i >> 12);
  auto t = UcxTransfer::Create("bench exporter", pool.data(), pool.size(), "127.0.0.1");
  if (!t.ok()) _exit(2);
  PutString(fd, (*t)->address());
  PutString(fd, (*t)->rkey());
  PutString(fd, std::to_string(reinterpret_cast<uint64_t>(pool.data())));
  PutString(fd, std::to_string((*t)->listener_port()));
  for (;;) pause();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t comma = s.find(',', pos);
    out.push_back(std::stoll(s.substr(pos, comma - pos)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

// In-process hand-off on a real model: prefill on a context engine, then time from the
// handle being ready to the generation engine having the KV (on_kv_done), i.e. the delay
// before its first decode step; also the whole first decode step.
void HandOff(const std::string& model, const std::string& tokenizer, int64_t prompt_len) {
  helix::EngineOptions o;
  o.model_path = model;
  o.tokenizer_path = tokenizer;
  o.tokens_per_block = kTpb;
  o.kv_max_tokens = 8192;
  o.max_batch_size = 4;
  helix::EngineOptions co = o;
  co.export_kv = true;
  co.server_id = "bench-ctx";
  auto ctx = helix::Engine::Create(co);
  auto gen = helix::Engine::Create(o);
  if (!ctx.ok() || !gen.ok()) {
    std::fprintf(stderr, "hand-off: cannot load %s\n", model.c_str());
    return;
  }
  std::vector<double> handoff_ms, first_step_ms;
  for (int rep = 0; rep < 5; ++rep) {
    helix::GenerateRequest r;
    r.id = std::string("p").append(std::to_string(rep));  // gcc 12 -Wrestrict on "p" + s
    for (int64_t i = 0; i < prompt_len; ++i) {
      r.prompt_tokens.push_back(static_cast<int32_t>(3 + (i * 7 + rep) % 400));
    }
    r.max_tokens = 1;
    r.ignore_eos = true;
    r.retain_kv = true;
    r.sampling.temperature = 0;
    int32_t first = -1;
    std::vector<uint64_t> blocks;
    r.sink = [&](const helix::TokenEvent& ev) {
      if (ev.token >= 0) first = ev.token;
      if (ev.finished) blocks = ev.kv_block_addresses;
    };
    (void)(*ctx)->Submit(r);
    while ((*ctx)->HasWork()) (*ctx)->Step();
    const helix::KvExport* ex = (*ctx)->kv_export();
    auto src = std::make_shared<helix::transfer::KvSource>();
    src->server_id = ex->server_id;
    src->request_id = r.id;
    src->worker_address = ex->worker_address;
    src->listener_address = ex->listener_address;
    src->rkey = ex->rkey;
    src->block_addresses = blocks;
    src->token_count = prompt_len;
    src->layout = ex->layout;
    src->model_fingerprint = (*ctx)->model_fingerprint();
    src->checksum = helix::transfer::HandleChecksum(*src);
    const auto t0 = Clock::now();
    Clock::time_point t_kv{}, t_step{};
    helix::GenerateRequest g;
    g.prompt_tokens = r.prompt_tokens;
    g.kv_source = src;
    g.first_token = first;
    g.max_tokens = 2;
    g.ignore_eos = true;
    g.sampling.temperature = 0;
    g.on_kv_done = [&](const helix::Status&) { t_kv = Clock::now(); };
    g.sink = [&](const helix::TokenEvent& ev) {
      if (ev.token >= 0 && t_kv != Clock::time_point{} && t_step == Clock::time_point{}) {
        t_step = Clock::now();
      }
    };
    if (!(*gen)->Submit(g).ok()) return;
    while ((*gen)->HasWork()) (*gen)->Step();
    (*ctx)->ReleaseRetained(r.id);
    (*ctx)->ExpireLeases();
    handoff_ms.push_back(std::chrono::duration<double, std::milli>(t_kv - t0).count());
    first_step_ms.push_back(std::chrono::duration<double, std::milli>(t_step - t_kv).count());
  }
  std::printf(
      "hand-off (%s, %lld-token prompt, CP 1): handle ready -> KV on the generation engine "
      "%.3f ms (median of 5); then its first decode step %.3f ms\n",
      model.c_str(), static_cast<long long>(prompt_len), Median(handoff_ms), Median(first_step_ms));
}

}  // namespace

int main(int argc, char** argv) {
  if (const char* fd = std::getenv(kExporterEnv)) {
    RunExporter(std::atoi(fd), std::atoll(argv[1]));
  }
  std::vector<int64_t> tokens = {1024, 4096, 16384, 65536};
  int reps = 5;
  std::string model, tokenizer;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--tokens") tokens = ParseList(argv[i + 1]);
    if (a == "--reps") reps = std::atoi(argv[i + 1]);
    if (a == "--model") model = argv[i + 1];
    if (a == "--tokenizer") tokenizer = argv[i + 1];
  }
  const int64_t max_blocks = (*std::max_element(tokens.begin(), tokens.end()) + kTpb - 1) / kTpb;
  int fds[2];
  if (pipe(fds) != 0) return 1;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    setenv(kExporterEnv, std::to_string(fds[1]).c_str(), 1);
    const std::string n = std::to_string(max_blocks);
    execl("/proc/self/exe", "kv_transfer_bench_exporter", n.c_str(), nullptr);
    _exit(127);
  }
  close(fds[1]);
  const std::string address = GetString(fds[0]), rkey = GetString(fds[0]);
  const std::string base_s = GetString(fds[0]);
  const std::string port_s = GetString(fds[0]);
  if (port_s.empty()) {
    std::fprintf(stderr, "the exporter did not start\n");
    return 1;
  }
  const uint64_t base = std::stoull(base_s);
  auto puller = UcxTransfer::Create("bench puller");
  if (!puller.ok()) return 1;
  std::vector<uint8_t> dst(static_cast<size_t>(max_blocks * kBlockBytes));
  const char* tls = std::getenv("UCX_TLS");
  std::printf("UCX_TLS=%s; block %lld bytes (30 layers x 2 x 3 KV heads x 32 tokens x 64 x bf16)\n",
              tls ? tls : "(UCX default)", static_cast<long long>(kBlockBytes));
  std::printf("%8s %7s %10s %10s %9s %14s\n", "tokens", "blocks", "MiB", "ms", "GB/s",
              "GB/s by addr");
  // Each size both ways, interleaved: through the exporter's listener (as the hand-off
  // connects) and through its worker address (as it connected before 2026-11-28).
  for (int64_t t : tokens) {
    const int64_t blocks = (t + kTpb - 1) / kTpb;
    std::vector<double> ms[2];
    for (int rep = 0; rep < reps + 1; ++rep) {  // the first one also connects: not counted
      for (int by_address = 0; by_address < 2; ++by_address) {
        PullJob job;
        job.peer_key = by_address ? "exporter by address" : "exporter";
        job.worker_address = address;
        if (!by_address) job.listener_address = "127.0.0.1:" + port_s;
        job.rkey = rkey;
        job.deadline = Clock::now() + std::chrono::seconds(120);
        for (int64_t b = 0; b < blocks; ++b) {
          job.segments.push_back({base + static_cast<uint64_t>(b * kBlockBytes),
                                  dst.data() + b * kBlockBytes,
                                  static_cast<uint64_t>(kBlockBytes)});
        }
        const auto t0 = Clock::now();
        const uint64_t id = (*puller)->StartPull(job);
        const JobState s = (*puller)->Wait(id, std::chrono::seconds(120));
        const double took = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        (*puller)->Forget(id);
        if (s != JobState::kDone) {
          std::fprintf(stderr, "pull of %lld tokens: %s\n", static_cast<long long>(t),
                       helix::transfer::JobStateName(s));
          kill(pid, SIGKILL);
          return 1;
        }
        if (rep > 0) ms[by_address].push_back(took);
      }
    }
    const double m = Median(ms[0]), m_addr = Median(ms[1]);
    const double bytes = static_cast<double>(blocks * kBlockBytes);
    std::printf("%8lld %7lld %10.1f %10.3f %9.3f %14.3f\n", static_cast<long long>(t),
                static_cast<long long>(blocks), bytes / (1 << 20), m, bytes / (m * 1e6),
                bytes / (m_addr * 1e6));
  }
  puller->reset();
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  if (!model.empty()) HandOff(model, tokenizer, 500);
  return 0;
}
