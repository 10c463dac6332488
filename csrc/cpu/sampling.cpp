#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ops.h"

namespace corral::cpu {

namespace {

int64_t argmax_row(const float* l, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (l[i] > l[best]) best = i;
  return best;
}

// One row of sample(): weights w = exp((l - max) / T) in float64, so the most likely token has
// weight 1 and min-p keeps w >= min_p.
int32_t sample_row(const float* l, int64_t vocab, const SamplerRow& s, float uniform) {
  const int64_t best = argmax_row(l, vocab);
  if (s.temperature <= 0.f || !std::isfinite(l[best])) return int32_t(best);
  thread_local std::vector<double> w;
  thread_local std::vector<int32_t> order;
  w.resize(size_t(vocab));
  const double inv_t = 1.0 / double(s.temperature);
  for (int64_t i = 0; i < vocab; ++i) w[i] = std::exp(double(l[i] - l[best]) * inv_t);
  const double min_w = double(s.min_p);

  const int64_t k = s.top_k > 0 ? std::min<int64_t>(s.top_k, vocab) : vocab;
  const bool truncate = k < vocab || s.top_p < 1.f;
  int64_t kept = vocab;  // with truncation: order[0, kept) holds the kept tokens, most likely first
  if (truncate) {
    const auto more_likely = [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); };
    order.resize(size_t(vocab));
    std::iota(order.begin(), order.end(), 0);
    if (k < vocab) std::nth_element(order.begin(), order.begin() + k, order.end(), more_likely);
    kept = k;
    if (s.top_p < 1.f) {
      double mass = 0.0;
      for (int64_t i = 0; i < k; ++i) mass += w[order[i]];
      const double target = double(s.top_p) * mass;
      // Sort a growing prefix until it holds the top-p mass: a few hundred tokens, not the vocabulary.
      for (int64_t sorted = std::min<int64_t>(k, 256);; sorted = std::min<int64_t>(k, sorted * 4)) {
        std::partial_sort(order.begin(), order.begin() + sorted, order.begin() + k, more_likely);
        double cum = 0.0;
        int64_t n = 0;
        while (n < sorted && cum < target) cum += w[order[n++]];
        if (cum >= target || sorted == k) {
          kept = std::max<int64_t>(n, 1);
          break;
        }
      }
    } else {
      std::sort(order.begin(), order.begin() + k, more_likely);
    }
  }
  const auto token = [&](int64_t i) { return truncate ? int64_t(order[i]) : i; };
  double total = 0.0;
  for (int64_t i = 0; i < kept; ++i)
    if (w[token(i)] >= min_w) total += w[token(i)];
  const double target = double(uniform) * total;
  double acc = 0.0;
  int64_t pick = best;
  for (int64_t i = 0; i < kept; ++i) {
    const double wi = w[token(i)];
    if (wi < min_w || wi == 0.0) continue;
    pick = token(i);
    acc += wi;
    if (acc > target) break;
  }
  return int32_t(pick);
}

}  // namespace

void argmax(int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  parallel_for(rows, vocab, [&](int64_t r) { out[r] = int32_t(argmax_row(logits + r * vocab, vocab)); });
}

void sample(int32_t* out, const float* logits, int64_t rows, int64_t vocab, const SamplerRow* settings,
            const float* uniform) {
  parallel_for(rows, vocab * 4,
               [&](int64_t r) { out[r] = sample_row(logits + r * vocab, vocab, settings[r], uniform[r]); });
}

void apply_penalties(float* logits, int64_t rows, int64_t vocab, const int64_t* offsets, const int32_t* token_ids,
                     const int32_t* output_counts, const PenaltyRow* penalties) {
  for (int64_t r = 0; r < rows; ++r) {
    float* l = logits + r * vocab;
    const PenaltyRow& p = penalties[r];
    for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
      float& x = l[token_ids[e]];
      x = x > 0.f ? x / p.repetition : x * p.repetition;
      if (output_counts[e] > 0) {
        x -= p.frequency * float(output_counts[e]);
        x -= p.presence;
      }
    }
  }
}

void apply_token_mask(float* logits, int64_t vocab, int64_t count, const int32_t* rows, const uint32_t* mask) {
  const int64_t words = (vocab + 31) / 32;
  for (int64_t i = 0; i < count; ++i) {
    float* l = logits + int64_t(rows[i]) * vocab;
    const uint32_t* m = mask + i * words;
    for (int64_t t = 0; t < vocab; ++t)
      if (!((m[t >> 5] >> (t & 31)) & 1u)) l[t] = -INFINITY;
  }
}

void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* chosen, float* chosen_logprob,
              int64_t top_n, int32_t* top_ids, float* top_logprobs) {
  parallel_for(rows, vocab * 4, [&](int64_t r) {
    const float* l = logits + r * vocab;
    const float max = *std::max_element(l, l + vocab);
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) total += std::exp(double(l[i]) - max);
    const double log_total = std::log(total) + max;
    chosen_logprob[r] = float(double(l[chosen[r]]) - log_total);
    if (top_n <= 0) return;
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_n, order.end(),
                      [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    for (int64_t k = 0; k < top_n; ++k) {
      top_ids[r * top_n + k] = order[k];
      top_logprobs[r * top_n + k] = float(double(l[order[k]]) - log_total);
    }
  });
}

}  // namespace corral::cpu
