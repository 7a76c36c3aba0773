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
#include <string>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "engine/spawn_test_util.h"

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
    if (!e->HasWork() && !pending) break;
    if (before_step) before_step(step);
    e->Step();
  }
  return out;
}

// Forks ranks 1..world-1 of `o`; each runs RunWorker and exits 0 on a clean shutdown.
inline std::vector<pid_t> ForkWorkers(EngineOptions o) {
  std::vector<pid_t> pids;
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

}  // namespace helix::testing
