#include "engine/sampler/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace helix {

Sampler::Sampler(const SamplingParams& params, const std::vector<int32_t>& prompt)
    : p_(params), rng_(params.seed ? *params.seed : std::random_device{}()) {
  if (p_.repetition_penalty != 1.0f) {
    seen_ = prompt;
    std::sort(seen_.begin(), seen_.end());
    seen_.erase(std::unique(seen_.begin(), seen_.end()), seen_.end());
  }
}

void Sampler::BanUntilMinTokens(std::vector<int32_t> ids) { min_tokens_ban_ = std::move(ids); }

void Sampler::Accept(int32_t token) {
  ++accepted_;
  if (p_.presence_penalty != 0 || p_.frequency_penalty != 0) ++counts_[token];
  if (p_.repetition_penalty != 1.0f) {
    auto it = std::lower_bound(seen_.begin(), seen_.end(), token);
    if (it == seen_.end() || *it != token) seen_.insert(it, token);
  }
}

bool Sampler::DeviceEligible() const {
  return p_.repetition_penalty == 1.0f && p_.presence_penalty == 0 && p_.frequency_penalty == 0 &&
         p_.top_logprobs < 0 && p_.logit_bias.empty() && p_.allowed_token_ids.empty() && !Banning();
}

double Sampler::DrawForDevice() {
  if (p_.temperature == 0.0f) return 0.0;
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
}

Status NothingToSample() {
  return Internal(
      "no token can be sampled: every logit is NaN or -inf (a numerical overflow in the model)");
}

SampleResult Sampler::Sample(float* logits, int64_t vocab) {
  SampleResult res;
  // Non-finite logits (an overflow in the model) as the limits they stand for: NaN is no
  // candidate, and +inf tokens take all the mass, evenly (exp(inf - inf) would poison every
  // sum below with NaN).
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t pos_inf = 0;
  double max_raw = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(logits[i])) logits[i] = kNegInf;
    if (logits[i] == -kNegInf) ++pos_inf;
    max_raw = std::max<double>(max_raw, logits[i]);
  }
  if (pos_inf > 0) {
    for (int64_t i = 0; i < vocab; ++i) logits[i] = logits[i] == -kNegInf ? 0.0f : kNegInf;
    max_raw = 0;
  }
  // Log-probabilities of the raw distribution, as OpenAI-style logprobs report them (only
  // when asked for: a pass of exp over the vocabulary).
  double log_z = 0;
  std::vector<float> raw_for_logprobs;
  if (p_.top_logprobs >= 0) {
    double sum_raw = 0;
    for (int64_t i = 0; i < vocab; ++i) sum_raw += std::exp(logits[i] - max_raw);
    log_z = max_raw + std::log(sum_raw);
    raw_for_logprobs.assign(logits, logits + vocab);
  }

  // Only the allowed ids, min_tokens' ban, the logit bias, then the penalties (vLLM's order).
  if (!p_.allowed_token_ids.empty()) {
    size_t next = 0;  // the first allowed id not below i
    for (int64_t i = 0; i < vocab; ++i) {
      while (next < p_.allowed_token_ids.size() && p_.allowed_token_ids[next] < i) ++next;
      if (next == p_.allowed_token_ids.size() || p_.allowed_token_ids[next] != i) {
        logits[i] = kNegInf;
      }
    }
  }
  if (Banning()) {
    for (int32_t t : min_tokens_ban_) {
      if (t >= 0 && t < vocab) logits[t] = kNegInf;
    }
  }
  for (const auto& [t, bias] : p_.logit_bias) {
    if (t < vocab) logits[t] += bias;
  }
  if (p_.repetition_penalty != 1.0f) {
    for (int32_t t : seen_) {
      if (t < 0 || t >= vocab) continue;
      logits[t] =
          logits[t] > 0 ? logits[t] / p_.repetition_penalty : logits[t] * p_.repetition_penalty;
    }
  }
  for (const auto& [t, n] : counts_) {
    if (t < 0 || t >= vocab) continue;
    logits[t] -= p_.frequency_penalty * static_cast<float>(n) + p_.presence_penalty;
  }

  int32_t best = 0;
  for (int64_t i = 1; i < vocab; ++i) {
    if (logits[i] > logits[best]) best = static_cast<int32_t>(i);
  }
  if (vocab <= 0 || !(logits[best] > kNegInf)) {
    res.status = NothingToSample();
    return res;
  }
  if (p_.temperature == 0.0f) {
    res.token = best;
  } else {
    // Candidates sorted by logit (stable on id), truncated by top-k.
    scratch_.clear();
    scratch_.reserve(vocab);
    for (int64_t i = 0; i < vocab; ++i) {
      scratch_.emplace_back(logits[i] / p_.temperature, static_cast<int32_t>(i));
    }
    auto cmp = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    int64_t n = vocab;
    if (p_.top_k > 0 && p_.top_k < vocab) {
      n = p_.top_k;
      std::partial_sort(scratch_.begin(), scratch_.begin() + n, scratch_.end(), cmp);
    } else {
      std::sort(scratch_.begin(), scratch_.end(), cmp);
    }
    const float top = scratch_[0].first;
    std::vector<double> probs(n);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) total += probs[i] = std::exp(double(scratch_[i].first) - top);
    // top-p: the smallest prefix whose mass reaches top_p (at least one token).
    int64_t keep = n;
    if (p_.top_p < 1.0f) {
      // The unnormalised mass against top_p x total, as the device sampler cuts (a normalised
      // running sum rounds below an exact boundary, e.g. 10 of 20 equal tokens at 0.5).
      const double target = static_cast<double>(p_.top_p) * total;
      double acc = 0;
      for (int64_t i = 0; i < n; ++i) {
        acc += probs[i];
        if (acc >= target) {
          keep = i + 1;
          break;
        }
      }
    }
    // min-p: drop tokens whose probability is below min_p × the top probability.
    if (p_.min_p > 0) {
      int64_t k = 1;
      while (k < keep && probs[k] >= p_.min_p * probs[0]) ++k;
      keep = k;
    }
    double kept_total = 0;
    for (int64_t i = 0; i < keep; ++i) kept_total += probs[i];
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_) * kept_total;
    double acc = 0;
    res.token = scratch_[keep - 1].second;
    for (int64_t i = 0; i < keep; ++i) {
      acc += probs[i];
      if (u < acc) {
        res.token = scratch_[i].second;
        break;
      }
    }
  }

  if (p_.top_logprobs >= 0) {
    res.logprob = static_cast<float>(raw_for_logprobs[res.token] - log_z);
    const int64_t n = std::min<int64_t>(p_.top_logprobs, vocab);
    if (n > 0) {
      std::vector<int32_t> ids(vocab);
      for (int64_t i = 0; i < vocab; ++i) ids[i] = static_cast<int32_t>(i);
      std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
        return raw_for_logprobs[a] > raw_for_logprobs[b] ||
               (raw_for_logprobs[a] == raw_for_logprobs[b] && a < b);
      });
      for (int64_t i = 0; i < n; ++i) {
        res.top.emplace_back(ids[i], static_cast<float>(raw_for_logprobs[ids[i]] - log_z));
      }
    }
  }
  return res;
}

}  // namespace helix
