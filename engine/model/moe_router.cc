#include "engine/model/moe_router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace helix {
namespace {

// Indices of the k largest values, largest first; ties to the lower index.
void TopK(const std::vector<double>& v, int64_t k, std::vector<int32_t>* idx) {
  idx->resize(v.size());
  std::iota(idx->begin(), idx->end(), 0);
  std::partial_sort(idx->begin(), idx->begin() + k, idx->end(),
                    [&](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  idx->resize(static_cast<size_t>(k));
}

}  // namespace

void RouteTokens(const ModelConfig& c, const float* logits, const float* bias, int64_t tokens,
                 std::vector<int32_t>* experts, std::vector<float>* weights) {
  const int64_t E = c.n_routed_experts, K = c.experts_per_token;
  experts->resize(static_cast<size_t>(tokens * K));
  weights->resize(static_cast<size_t>(tokens * K));
  std::vector<double> scores(E), choice(E), group_score;
  std::vector<int32_t> top, groups;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* l = logits + t * E;
    if (c.scoring == ScoringFunc::kSigmoid) {
      for (int64_t e = 0; e < E; ++e)
        scores[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(l[e])));
    } else {
      const double m = *std::max_element(l, l + E);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(static_cast<double>(l[e]) - m));
      for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
    }
    // The score experts are chosen by: + the correction bias under noaux_tc.
    for (int64_t e = 0; e < E; ++e) {
      choice[e] = scores[e] + (c.topk_method == TopkMethod::kNoauxTc && bias != nullptr
                                   ? static_cast<double>(bias[e])
                                   : 0.0);
    }
    if (c.topk_method != TopkMethod::kGreedy) {
      // Keep the experts of the topk_group best groups: a group scores its best expert
      // (group_limited_greedy) or the sum of its best two (noaux_tc).
      const int64_t G = c.n_group, per = E / G;
      group_score.assign(G, 0.0);
      for (int64_t g = 0; g < G; ++g) {
        std::vector<double> in(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::sort(in.begin(), in.end(), std::greater<>());
        group_score[g] = c.topk_method == TopkMethod::kNoauxTc ? in[0] + in[1] : in[0];
      }
      TopK(group_score, c.topk_group, &groups);
      std::vector<bool> keep(G, false);
      for (int32_t g : groups) keep[g] = true;
      // Masked experts score 0 (as the reference's masked_fill(0.0)); with sigmoid/softmax
      // scores (> 0) a kept expert always beats them unless the bias makes it negative.
      for (int64_t e = 0; e < E; ++e) {
        if (!keep[e / per]) choice[e] = 0.0;
      }
    }
    TopK(choice, K, &top);
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += scores[top[k]];
    const bool norm = K > 1 && c.norm_topk_prob;
    for (int64_t k = 0; k < K; ++k) {
      double wt = scores[top[k]];
      if (norm) wt /= sum + 1e-20;
      if (!norm || c.scale_after_norm) wt *= c.routed_scaling_factor;
      (*experts)[t * K + k] = top[k];
      (*weights)[t * K + k] = static_cast<float>(wt);
    }
  }
}

}  // namespace helix
