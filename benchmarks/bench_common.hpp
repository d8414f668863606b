// Shared pieces of the moereg benchmarks: smoke mode, problem sizes, deterministic random
// data, rotation of input sets (so that repeated iterations do not measure the cache), the
// minimum number of bytes each loss must move, and a STREAM-like copy kernel that measures
// this machine's memory bandwidth.
//
// Byte accounting (the "floor"): every input read once, every output written once, counted
// like STREAM counts a copy (read bytes + written bytes; write-allocate traffic not counted).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace bench {

/// Global run settings: smoke mode shrinks every size and runs one iteration per case.
struct settings {
  bool smoke = false;
  double rotation_bytes = 1024.0 * 1024.0 * 1024.0;        ///< target working set per case (1 GiB)
  double max_case_bytes = 3.0 * 1024.0 * 1024.0 * 1024.0;  ///< cap on one case's memory
};

inline settings& cfg() {
  static settings s;
  return s;
}

/// Removes --smoke from argv (and honours MOEREG_BENCH_SMOKE=1); call before benchmark::Initialize.
inline void parse_smoke(int& argc, char** argv) {
  const char* env = std::getenv("MOEREG_BENCH_SMOKE");
  if (env != nullptr && std::string(env) != "0" && std::string(env) != "") cfg().smoke = true;
  int w = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--smoke") {
      cfg().smoke = true;
      continue;
    }
    argv[w++] = argv[i];
  }
  argc = w;
  if (cfg().smoke) cfg().rotation_bytes = 0.0;
}

/// splitmix64: a small deterministic generator.
struct rng {
  std::uint64_t s;
  explicit rng(std::uint64_t seed) : s(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1).
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
};

/// Row-stochastic [T, E] probabilities (entries bounded away from zero).
inline std::vector<float> make_probs(long long T, long long E, std::uint64_t seed) {
  std::vector<float> p(static_cast<std::size_t>(T * E));
  rng r(seed);
  for (long long t = 0; t < T; ++t) {
    float sum = 0.0f;
    float* row = p.data() + t * E;
    for (long long e = 0; e < E; ++e) sum += (row[e] = 0.05f + r.uniform());
    for (long long e = 0; e < E; ++e) row[e] /= sum;
  }
  return p;
}

/// Activations [T, k, d] uniform in [-1, 1).
inline std::vector<float> make_acts(long long T, long long k, long long d, std::uint64_t seed) {
  std::vector<float> h(static_cast<std::size_t>(T * k * d));
  rng r(seed);
  for (auto& v : h) v = 2.0f * r.uniform() - 1.0f;
  return h;
}

/// topk [T, k]: k distinct experts per token, spread evenly from a random start.
inline std::vector<std::int32_t> make_topk(long long T, long long k, long long E, std::uint64_t seed) {
  std::vector<std::int32_t> I(static_cast<std::size_t>(T * k));
  rng r(seed);
  const long long step = std::max<long long>(1, E / k);
  for (long long t = 0; t < T; ++t) {
    const long long start = static_cast<long long>(r.next() % static_cast<std::uint64_t>(E));
    for (long long s = 0; s < k; ++s)
      I[static_cast<std::size_t>(t * k + s)] = static_cast<std::int32_t>((start + s * step) % E);
  }
  return I;
}

/// Number of input sets to rotate through so that they exceed the rotation target (at least 2,
/// and no more than the per-case memory cap allows).
inline int rotation_sets(double set_bytes) {
  if (set_bytes <= 0) return 2;
  int n = static_cast<int>(cfg().rotation_bytes / set_bytes) + 1;
  n = std::max(n, 2);
  const int cap = std::max(2, static_cast<int>(cfg().max_case_bytes / set_bytes));
  return std::min({n, cap, 256});
}

// ---------------------------------------------------------------------------------------------
// STREAM-like copy: dst[i] = src[i] over arrays far larger than the last-level cache.

inline void copy_kernel(const float* src, float* dst, long long n, int threads) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long long i = 0; i < n; ++i) dst[i] = src[i];
#else
  (void)threads;
  for (long long i = 0; i < n; ++i) dst[i] = src[i];
#endif
}

/// Elements per array of the copy kernel (256 MiB each; 1 MiB in smoke mode).
inline long long copy_elems() {
  return cfg().smoke ? (1ll << 18) : (1ll << 26);
}

/// Best copy bandwidth (bytes/s, read + write) over a few repetitions, with `threads` threads.
inline double measure_copy_bandwidth(int threads) {
  const long long n = copy_elems();
  std::vector<float> a(static_cast<std::size_t>(n), 1.0f), b(static_cast<std::size_t>(n), 0.0f);
  copy_kernel(a.data(), b.data(), n, threads);  // first touch
  double best = 0.0;
  const int reps = cfg().smoke ? 1 : 6;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    copy_kernel(a.data(), b.data(), n, threads);
    const auto t1 = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(n) * sizeof(float) / s);
  }
  return best;
}

/// The measured copy bandwidth per thread count (index 1 and 2), filled before the run.
inline double& copy_bandwidth(int threads) {
  static double bw[3] = {0.0, 0.0, 0.0};
  return bw[std::clamp(threads, 0, 2)];
}

}  // namespace bench
