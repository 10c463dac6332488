// Read bandwidth of this machine: OpenMP threads sum disjoint parts of an array far beyond the
// last-level cache (with and without software prefetches), in huge pages as Corral's packed
// weights (on a VM they read about 20% faster than 4 KiB pages); prints the best of `reps`
// passes of each kind in GB/s (1e9 bytes/s). bench/vs_llamacpp.py builds it (cc -O3
// -march=native -fopenmp) and divides bytes read per decoded token by it.
// Usage: read_bandwidth [MiB, default 1024] [reps, default 10]
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? strtoull(argv[1], 0, 10) : 1024;
  const int reps = argc > 2 ? atoi(argv[2]) : 10;
  const size_t n = mib * 1024 * 1024 / sizeof(double);
  double* a = aligned_alloc(1 << 21, n * sizeof(double));
  if (!a) return 1;
  madvise(a, n * sizeof(double), MADV_HUGEPAGE);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i++) a[i] = 1.0;  // each thread touches the pages it reads
  // Two ways to read, each pass timed: the hardware prefetchers alone, and with software
  // prefetches 1 KiB ahead (as Corral's kernels issue them); the best pass counts, so the
  // roofline is against the fastest read this machine showed, not the slower of two methods.
  double best = 1e30, check = 0;
  for (int r = 0; r <= 2 * reps; r++) {  // the first pass warms up
    double s = 0;
    const double t = now();
    if (r % 2 == 0) {
#pragma omp parallel for simd reduction(+ : s) schedule(static)
      for (size_t i = 0; i < n; i++) s += a[i];
    } else {
#pragma omp parallel for reduction(+ : s) schedule(static)
      for (size_t b = 0; b < n / 8; b++) {  // one 64-byte line per iteration
        __builtin_prefetch(a + 8 * b + 128, 0, 0);
        double l = 0;
#pragma omp simd reduction(+ : l)
        for (size_t i = 8 * b; i < 8 * b + 8; i++) l += a[i];
        s += l;
      }
    }
    const double dt = now() - t;
    check += s;
    if (r > 0 && dt < best) best = dt;
  }
  printf("%.3f\n", n * sizeof(double) / best / 1e9);
  free(a);
  return check == 0;  // keeps the sums live
}
