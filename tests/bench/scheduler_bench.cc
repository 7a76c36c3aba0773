// KV reservation policies side by side (capacity_scheduler_policy): the same workload run
// in-process on an Engine with GUARANTEED_NO_EVICT (every block a request can need, reserved at
// admission) and with MAX_UTILIZATION (blocks as it decodes, preemption by recompute), in one
// run. Two workloads:
//   early   requests ask for --max-tokens but stop at a stop string long before (most chat
//           traffic: max_tokens is a bound, not a length), so full reservations idle the pool;
//   full    requests generate all of --max-tokens (ignore_eos): the pool is short either way,
//           and MAX_UTILIZATION pays for its preemptions with recompute.
// Prints wall time, engine steps, tokens/s and preemptions for each, and the tokens/s ratio.
//   scheduler_bench --model M --tokenizer T [--requests 32] [--max-tokens 400]
//                   [--pool-tokens 4096] [--tokens-per-block 16] [--threads 2] [--batch 32]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string model, tokenizer;
  int requests = 32, max_tokens = 400, pool_tokens = 4096, tokens_per_block = 16, threads = 2,
      batch = 32;
};

struct Outcome {
  double seconds = 0;
  int64_t steps = 0, tokens = 0, errors = 0;
  uint64_t preemptions = 0;
};

Outcome Run(const Args& a, bool preempt, bool early) {
  helix::EngineOptions o;
  o.model_path = a.model;
  o.tokenizer_path = a.tokenizer;
  o.num_threads = a.threads;
  o.tokens_per_block = a.tokens_per_block;
  o.kv_max_tokens = a.pool_tokens;
  o.max_batch_size = a.batch;
  o.kv_preemption = preempt;
  auto e = helix::Engine::Create(o);
  if (!e.ok()) {
    std::fprintf(stderr, "scheduler_bench: %s\n", e.status().ToString().c_str());
    std::exit(1);
  }
  Outcome out;
  const char* prompts[] = {"Once upon a time", "The dog",      "Lily and Ben went to the park",
                           "A big red ball",   "Tom was sad.", "One day, a little bird"};
  for (int i = 0; i < a.requests; ++i) {
    helix::GenerateRequest r;
    r.prompt = prompts[i % 6];
    r.max_tokens = a.max_tokens;
    r.sampling.temperature = 0.8f;
    r.sampling.seed = 1000 + i;
    if (early) {
      r.stop = {"\n"};  // the first paragraph's end
    } else {
      r.ignore_eos = true;
    }
    r.sink = [&out](const helix::TokenEvent& ev) {
      if (ev.token >= 0) ++out.tokens;
      if (ev.finished && !ev.error.ok()) ++out.errors;
    };
    if (auto id = (*e)->Submit(r); !id.ok()) {
      std::fprintf(stderr, "scheduler_bench: %s\n", id.status().ToString().c_str());
      std::exit(1);
    }
  }
  const auto t0 = Clock::now();
  while ((*e)->HasWork()) {
    (*e)->Step();
    ++out.steps;
  }
  out.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  out.preemptions = (*e)->kv_stats().preemptions;
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--model") {
      a.model = v;
    } else if (k == "--tokenizer") {
      a.tokenizer = v;
    } else if (k == "--requests") {
      a.requests = std::atoi(v.c_str());
    } else if (k == "--max-tokens") {
      a.max_tokens = std::atoi(v.c_str());
    } else if (k == "--pool-tokens") {
      a.pool_tokens = std::atoi(v.c_str());
    } else if (k == "--tokens-per-block") {
      a.tokens_per_block = std::atoi(v.c_str());
    } else if (k == "--threads") {
      a.threads = std::atoi(v.c_str());
    } else if (k == "--batch") {
      a.batch = std::atoi(v.c_str());
    } else {
      std::fprintf(stderr, "scheduler_bench: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (a.model.empty()) {
    std::fprintf(stderr, "scheduler_bench: --model is required\n");
    return 2;
  }
  std::printf("%d requests, max_tokens %d, pool %d tokens (%d per block), batch %d\n", a.requests,
              a.max_tokens, a.pool_tokens, a.tokens_per_block, a.batch);
  std::printf("%-6s %-20s %9s %7s %9s %10s %11s %6s\n", "load", "policy", "seconds", "steps",
              "tokens", "tokens/s", "preemptions", "errors");
  for (bool early : {true, false}) {
    double rate[2] = {0, 0};
    for (bool preempt : {false, true}) {
      const Outcome r = Run(a, preempt, early);
      rate[preempt] = r.tokens / r.seconds;
      std::printf("%-6s %-20s %9.2f %7lld %9lld %10.1f %11llu %6lld\n", early ? "early" : "full",
                  preempt ? "MAX_UTILIZATION" : "GUARANTEED_NO_EVICT", r.seconds,
                  static_cast<long long>(r.steps), static_cast<long long>(r.tokens), rate[preempt],
                  static_cast<unsigned long long>(r.preemptions), static_cast<long long>(r.errors));
    }
    std::printf("%-6s MAX_UTILIZATION / GUARANTEED_NO_EVICT tokens/s: %.2f\n",
                early ? "early" : "full", rate[1] / rate[0]);
  }
  return 0;
}
