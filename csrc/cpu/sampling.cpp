#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ops.h"

namespace corral::cpu {

void argmax(int32_t* out, const float* logits, int64_t rows, int64_t vocab) {
  parallel_for(rows, vocab, [&](int64_t r) {
    const float* l = logits + r * vocab;
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (l[i] > l[best]) best = i;
    out[r] = int32_t(best);
  });
}

void sample_temperature(int32_t* out, const float* logits, int64_t rows, int64_t vocab,
                        const float* temperature, const float* uniform) {
  parallel_for(rows, vocab * 4, [&](int64_t r) {
    const float* l = logits + r * vocab;
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (l[i] > l[best]) best = i;
    if (temperature[r] <= 0.f) {
      out[r] = int32_t(best);
      return;
    }
    // Inverse CDF over exp((l - max) / T); double sums keep the draw exact at large vocabularies.
    const double inv_t = 1.0 / double(temperature[r]);
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) total += std::exp(double(l[i] - l[best]) * inv_t);
    const double target = double(uniform[r]) * total;
    double acc = 0.0;
    int64_t pick = best;
    for (int64_t i = 0; i < vocab; ++i) {
      acc += std::exp(double(l[i] - l[best]) * inv_t);
      if (acc > target) {
        pick = i;
        break;
      }
    }
    out[r] = int32_t(pick);
  });
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
