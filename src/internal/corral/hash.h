// The 64-bit mixing step of Corral's hash chains (prefix-cache keys of token blocks and images).
#pragma once

#include <cstdint>

namespace corral {

// splitmix64's finalizer: every input bit moves every output bit.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace corral
