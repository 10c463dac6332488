// The most weight bytes per second one core can multiply when nothing waits on memory: the inner
// step of each kind of weight product (simd/gemm.h, simd/qgemm.h) over a block that stays in L1,
// with 4 independent accumulators. Compared with bench/read_bandwidth.c's per-core bandwidth it
// says whether a format's decode can be memory-bound on this machine at all: a kernel reaches the
// memory roofline only where its ceiling here is well above the bandwidth one core gets.
// Build and run: cc -O2 -march=native bench/dot_ceiling.c -o /tmp/dot_ceiling && /tmp/dot_ceiling
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { kBytes = 8192, kReps = 200000 };

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static volatile int32_t sink;  // keeps each loop's result alive

static void report(const char* name, double seconds, int32_t result) {
  sink = result;
  printf("%-44s %6.1f GB/s per core\n", name, (double)kBytes * kReps / seconds / 1e9);
}

#if defined(__AVX2__)
static int8_t* w;
static int8_t x[64];
#define LOAD(o) _mm256_load_si256((const __m256i*)(w + (o)))
#define BCAST(o) _mm256_set1_epi32(*(const int32_t*)(x + ((o) & 63 & ~3)))
static int32_t fold(__m256i a[4]) {
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), _mm256_add_epi32(a[2], a[3]));
  return _mm256_extract_epi32(s, 0);
}

// bfloat16: each 32 bytes are 16 weights, split into even/odd floats, 2 FMAs.
static void bf16_fma(void) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
  const double t = now();
  for (long r = 0; r < kReps; ++r)
    for (int o = 0; o < kBytes; o += 128) {
      const __m256 x0 = _mm256_set1_ps(x[o & 63] * 1e-3f), x1 = _mm256_set1_ps(x[(o + 1) & 63] * 1e-3f);
      for (int j = 0; j < 4; ++j) {
        const __m256i b = LOAD(o + 32 * j);
        acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), x0, acc[j]);
        acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(b, high)), x1, acc[j]);
      }
    }
  report("bf16 weights, float32 FMA", now() - t, (int32_t)(acc[0][0] + acc[1][1] + acc[2][2] + acc[3][3]));
}

// int8 codes against 8-bit activation codes: |w| x sign(x, w) in vpmaddubsw, pairs to int32.
static void int8_a8(void) {
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  const __m256i ones = _mm256_set1_epi16(1);
  const double t = now();
  for (long r = 0; r < kReps; ++r)
    for (int o = 0; o < kBytes; o += 128) {
      const __m256i xb = BCAST(o >> 5);
      for (int j = 0; j < 4; ++j) {
        const __m256i wv = LOAD(o + 32 * j);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        acc[j] = _mm256_dpbusd_epi32(acc[j], _mm256_abs_epi8(wv), _mm256_sign_epi8(xb, wv));
#else
        const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xb, wv));
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(p, ones));
#endif
      }
    }
  report("int8 weights, 8-bit activations", now() - t, fold(acc));
}

// int4 codes (two per byte) against 8-bit activation codes: nibbles in vpmaddubsw, int16 sums.
static void int4_a8(void) {
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  const __m256i low = _mm256_set1_epi8(0x0f);
  const double t = now();
  for (long r = 0; r < kReps; ++r)
    for (int o = 0; o < kBytes; o += 128) {
      const __m256i xl = BCAST(o >> 5), xh = BCAST((o >> 5) + 32);
      for (int j = 0; j < 4; ++j) {
        const __m256i b = LOAD(o + 32 * j);
        const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        acc[j] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[j], lo, xl), hi, xh);
#else
        acc[j] = _mm256_add_epi16(acc[j], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
#endif
      }
    }
  report("int4 weights (2 per byte), 8-bit activations", now() - t, fold(acc));
}
#endif

int main(void) {
#if defined(__AVX2__)
  w = aligned_alloc(64, kBytes);
  if (!w) return 1;
  for (int i = 0; i < kBytes; ++i) w[i] = (int8_t)((i * 37) % 255 - 127);
  for (int i = 0; i < 64; ++i) x[i] = (int8_t)(i * 7 - 100);
  bf16_fma();
  int8_a8();
  int4_a8();
  return 0;
#else
  puts("dot_ceiling: needs AVX2 (build with -march=native on an x86-64 machine that has it)");
  return 1;
#endif
}
