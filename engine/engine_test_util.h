// Test helper: runs requests to completion on one Engine and collects what each streamed.
// For tests only; single-threaded (the caller is the engine thread).
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>

#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "engine/spawn_test_util.h"
#include "engine/transfer/kv_handle.h"

namespace helix::testing {

// The shared/ folder with the real test models (HELIX_SHARED_DIR; "" when unset).
inline std::string SharedDir() {
  const char* s = std::getenv("HELIX_SHARED_DIR");
  return s == nullptr ? "" : s;
}

struct RunResult {
  std::vector<int32_t> tokens;
  std::vector<std::vector<std::pair<int32_t, float>>> top_logprobs;  // per token
  std::string text;
  FinishReason reason = FinishReason::kNone;
  Status error;
  int64_t completion_tokens = 0;
};

// Submits reqs[i] once `join_at[i]` steps have run (0 when absent: requests joining
// mid-flight), calls before_step(step) ahead of every step, and steps until nothing is left.
inline std::vector<RunResult> RunAll(Engine* e, std::vector<GenerateRequest> reqs,
                                     std::vector<int> join_at = {},
                                     const std::function<void(int)>& before_step = nullptr) {
  std::vector<RunResult> out(reqs.size());
  join_at.resize(reqs.size(), 0);
  std::vector<bool> submitted(reqs.size(), false);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].sink = [&out, i](const TokenEvent& ev) {
      if (ev.token >= 0) {
        out[i].tokens.push_back(ev.token);
        out[i].top_logprobs.push_back(ev.top_logprobs);
      }
      out[i].text += ev.text;
      if (ev.finished) {
        out[i].reason = ev.finish_reason;
        out[i].error = ev.error;
        out[i].completion_tokens = ev.completion_tokens;
      }
    };
  }
  for (int step = 0;; ++step) {
    bool pending = false;
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (submitted[i]) continue;
      if (join_at[i] <= step) {
        auto id = e->Submit(reqs[i]);
        EXPECT_TRUE(id.ok()) << id.status().ToString();
        submitted[i] = true;
      } else {
        pending = true;
      }
    }
    if (!e->HasWork() && !pending) {
      if (!e->AwaitingVerdicts()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // a verdict is on its way
      continue;
    }
    if (before_step) before_step(step);
    e->Step();
  }
  return out;
}

// Forks ranks 1..world-1 of `o`; each runs RunWorker and exits 0 on a clean shutdown. This
// process must have no other thread yet (see ThreadsOnceSettled); otherwise none is forked
// and the test fails.
inline std::vector<pid_t> ForkWorkers(EngineOptions o) {
  std::vector<pid_t> pids;
  if (const int threads = ThreadsOnceSettled(); threads != 1) {
    ADD_FAILURE() << "workers would be forked from a process with " << threads << " threads";
    return pids;
  }
  const int world = o.tensor_parallel * o.context_parallel;
  for (int r = 1; r < world; ++r) {
    const pid_t pid = fork();
    if (pid == 0) {
      o.rank = r;
      auto e = Engine::Create(o);
      if (!e.ok()) {
        fprintf(stderr, "rank %d: %s\n", r, e.status().ToString().c_str());
        _exit(2);
      }
      Status s = (*e)->RunWorker();
      if (!s.ok()) fprintf(stderr, "rank %d: %s\n", r, s.ToString().c_str());
      _exit(s.ok() ? 0 : 3);
    }
    pids.push_back(pid);
  }
  return pids;
}

struct Prefilled {
  std::shared_ptr<transfer::KvSource> source;
  int32_t first_token = -1;
};

// Prefills `prompt` on a context engine (export_kv) with its KV retained, and returns the
// handle the context service would hand out.
// `sampling`: the request's sampling parameters (default: greedy).
inline Prefilled Prefill(Engine* ctx, const std::vector<int32_t>& prompt, const std::string& id,
                         const SamplingParams* sampling = nullptr) {
  GenerateRequest r;
  r.id = id;
  r.prompt_tokens = prompt;
  r.max_tokens = 1;
  r.ignore_eos = true;
  r.retain_kv = true;
  r.sampling.temperature = 0;
  if (sampling != nullptr) r.sampling = *sampling;
  Prefilled out;
  std::vector<uint64_t> blocks;
  r.sink = [&](const TokenEvent& ev) {
    if (ev.token >= 0) out.first_token = ev.token;
    if (ev.finished) blocks = ev.kv_block_addresses;
  };
  EXPECT_TRUE(ctx->Submit(r).ok());
  while (ctx->HasWork()) ctx->Step();
  const KvExport* ex = ctx->kv_export();
  EXPECT_NE(ex, nullptr);
  auto s = std::make_shared<transfer::KvSource>();
  s->server_id = ex->server_id;
  s->server_address = "in-process";
  s->request_id = id;
  s->worker_address = ex->worker_address;
  s->listener_address = ex->listener_address;
  s->rkey = ex->rkey;
  s->block_addresses = blocks;
  s->token_count = static_cast<int64_t>(prompt.size());
  s->layout = ex->layout;
  s->model_fingerprint = ctx->model_fingerprint();
  s->checksum = transfer::HandleChecksum(*s);
  out.source = s;
  return out;
}

}  // namespace helix::testing
