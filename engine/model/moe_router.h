// DeepSeek V2/V3 MoE routing: the gate's scores -> each token's top-k experts and weights,
// exactly as their modeling code (scoring, group-limited selection, e_score_correction_bias,
// normalisation, routed_scaling_factor). Pure function; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model/model_config.h"

namespace helix {

// logits: [tokens][n_routed_experts] gate outputs; bias: [n_routed_experts] (noaux_tc) or
// nullptr. Fills experts/weights with [tokens][experts_per_token] entries: chosen expert ids
// (in descending order of their selection score) and their combine weights. Scores and
// weights are computed in double. Ties go to the lower expert id.
void RouteTokens(const ModelConfig& c, const float* logits, const float* bias, int64_t tokens,
                 std::vector<int32_t>* experts, std::vector<float>* weights);

}  // namespace helix
