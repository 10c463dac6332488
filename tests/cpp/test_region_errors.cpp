// RegionErrors (csrc/cpu/ops.h): an exception thrown by work inside an OpenMP region reaches the
// caller as that exception, after the region, instead of std::terminate; work after it is skipped.
#include <atomic>
#include <stdexcept>

#include "check.h"
#include "cpu/ops.h"
#include "corral/error.h"

using corral::cpu::parallel_for;
using corral::cpu::parallel_shares;

int main() {
  std::atomic<int> ran{0};
  // Enough work per item that the loop runs in parallel.
  CHECK_THROWS(corral::InvalidInputError,
               parallel_for(1000, 1 << 20,
                            [&](int64_t i) {
                              ++ran;
                              if (i == 500) throw corral::InvalidInputError("item 500 is bad");
                            }),
               "item 500");
  CHECK(ran.load() >= 1 && ran.load() <= 1000);

  CHECK_THROWS(std::runtime_error,
               parallel_shares(64, 1 << 20, [](int64_t i) { if (i % 7 == 3) throw std::runtime_error("share item"); }),
               "share item");

  std::atomic<int64_t> sum{0};  // without an exception every item runs once
  parallel_for(1000, 1 << 20, [&](int64_t i) { sum += i; });
  CHECK(sum.load() == 999 * 1000 / 2);
  return check::result();
}
