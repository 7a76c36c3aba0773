// Merge of partial attention states (O, LSE): the one combine used by split-KV inside a rank
// and by the Helix all-to-all combine across CP ranks. Stateless; thread-safe for distinct out.
#ifndef HELIX_KERNELS_MERGE_H_
#define HELIX_KERNELS_MERGE_H_

#include <cstdint>

#include "kernels/thread_pool.h"

namespace helix::kernels {

struct MergeStatesParams {
  const float* o;    // [num_parts][rows][head_dim] partial outputs (each normalised)
  const float* lse;  // [num_parts][rows] natural-log sum-exp of each part; -inf = empty part
  float* out;        // [rows][head_dim]; must not alias o
  float* out_lse;    // [rows] or nullptr
  int64_t num_parts, rows, head_dim;
};

// LSE = log sum_i exp(LSE_i), O = sum_i exp(LSE_i - LSE) O_i. Parts with LSE = -inf are
// skipped (their O is never read into the sum, so it may hold anything); a row whose parts
// are all empty gets O = 0 and LSE = -inf. A NaN LSE (a part whose softmax saw a NaN) makes the
// row's O and LSE NaN, whatever the other parts hold. For the Helix combine the layout
// [peers][tokens][heads][dim] is num_parts = peers, rows = tokens * heads. pool may be nullptr.
void MergeStatesCpu(const MergeStatesParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_MERGE_H_
