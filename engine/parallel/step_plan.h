// What the leader tells every rank once per step: which sequences' KV to free, and for each
// scheduled sequence its new tokens and their global positions (and, the first time it is
// scheduled, how many positions to reserve). Each rank derives its own block tables from it
// by the placement rule. A plain value with a compact binary encoding.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/common/status.h"

namespace helix::parallel {

struct PlanSeq {
  uint64_t uid = 0;
  int32_t reserve_tokens = 0;  // > 0 on the sequence's first step: positions to reserve
  int32_t first_pos = 0;       // global position of tokens[0]
  std::vector<int32_t> tokens;
};

// A sequence whose prompt KV comes from a context server: every rank reserves its blocks and
// starts pulling the ones it owns.
struct PlanTransfer {
  uint64_t uid = 0;
  int32_t reserve_tokens = 0;
  std::string source;  // transfer::EncodeKvSource
};

struct StepPlan {
  bool shutdown = false;                   // the instance is stopping: workers exit
  std::vector<uint64_t> released;          // sequences whose blocks go back to the pool first
  std::vector<PlanTransfer> transfers;     // pulls to start (after the releases)
  std::vector<uint64_t> transfer_cancels;  // pulls to stop
  std::vector<uint64_t> transfer_polls;    // pulls whose state every rank reports after the step
  std::vector<PlanSeq> seqs;               // the batch, in order; each samples from its last token
};

std::string EncodeStepPlan(const StepPlan& plan);
// DataLoss on a truncated or malformed encoding.
StatusOr<StepPlan> DecodeStepPlan(const std::string& bytes);

}  // namespace helix::parallel
