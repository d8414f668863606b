// Random test inputs shared by the tests: probabilities, top-k selections with dropped
// slots, masks, activations. Deterministic for a given seed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace moereg_test {

struct rng {
  std::mt19937_64 gen;
  explicit rng(std::uint64_t seed) : gen(seed) {}
  double uniform(double a = 0, double b = 1) { return std::uniform_real_distribution<double>(a, b)(gen); }
  double normal() { return std::normal_distribution<double>(0, 1)(gen); }
  long long integer(long long lo, long long hi) { return std::uniform_int_distribution<long long>(lo, hi)(gen); }
};

/// Row-wise softmax of N(0, scale^2) logits, [T, E] row-major.
inline std::vector<double> random_probs(rng& r, long long T, long long E, double scale = 1.5) {
  std::vector<double> p(static_cast<std::size_t>(T * E));
  for (long long t = 0; t < T; ++t) {
    double mx = -1e300;
    for (long long e = 0; e < E; ++e) mx = std::max(mx, p[t * E + e] = scale * r.normal());
    double s = 0;
    for (long long e = 0; e < E; ++e) s += (p[t * E + e] = std::exp(p[t * E + e] - mx));
    for (long long e = 0; e < E; ++e) p[t * E + e] /= s;
  }
  return p;
}

inline std::vector<double> random_normal(rng& r, std::size_t n, double scale = 1.0) {
  std::vector<double> v(n);
  for (auto& x : v) x = scale * r.normal();
  return v;
}

/// k distinct experts per row (a random permutation prefix); each slot dropped (-1) with
/// probability `drop`.
template <class I = long long>
std::vector<I> random_topk(rng& r, long long T, long long E, long long k, double drop = 0.15) {
  std::vector<I> out(static_cast<std::size_t>(T * k));
  std::vector<long long> perm(static_cast<std::size_t>(E));
  for (long long t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), r.gen);
    for (long long s = 0; s < k; ++s) out[t * k + s] = static_cast<I>(r.uniform() < drop ? -1 : perm[s]);
  }
  return out;
}

/// Mask with roughly `pad` of the tokens invalid (but at least one valid when T > 1).
inline std::vector<std::uint8_t> random_mask(rng& r, long long T, double pad = 0.2) {
  std::vector<std::uint8_t> m(static_cast<std::size_t>(T));
  for (auto& x : m) x = r.uniform() < pad ? 0 : 1;
  if (T > 1) m[0] = 1;
  return m;
}

inline std::vector<int> to_int_mask(const std::vector<std::uint8_t>& m) {
  return std::vector<int>(m.begin(), m.end());
}

template <class To, class From>
std::vector<To> cast(const std::vector<From>& v) {
  std::vector<To> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<To>(v[i]);
  return out;
}

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

/// max_i |a_i - b_i| / max(max|b|, floor)
inline double rel_diff(const std::vector<double>& a, const std::vector<double>& b, double floor = 1e-300) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m / std::max(max_abs(b), floor);
}

}  // namespace moereg_test
