// Shared inputs for the hardening tests: one random routing case (probabilities, logits,
// top-k with dropped slots, a mask) and token-major activations for it.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "support/random.hpp"

namespace moereg_hardening {

struct routing_case {
  long long T = 0, E = 0, k = 0, d = 0;
  std::vector<double> P, Z, P2, H;  // P2: a second layer's probabilities (coupling)
  std::vector<std::int64_t> I, I2;  // [T, k], -1 = dropped
  std::vector<std::uint8_t> mask;   // [T]
};

inline routing_case make_case(std::uint64_t seed, long long T, long long E, long long k, long long d) {
  moereg_test::rng r(seed);
  routing_case c;
  c.T = T, c.E = E, c.k = k, c.d = d;
  c.P = moereg_test::random_probs(r, T, E);
  c.P2 = moereg_test::random_probs(r, T, E);
  c.Z = moereg_test::random_normal(r, static_cast<std::size_t>(T * E), 3.0);
  c.I = moereg_test::random_topk<std::int64_t>(r, T, E, k);
  c.I2 = moereg_test::random_topk<std::int64_t>(r, T, E, k);
  c.mask = moereg_test::random_mask(r, T);
  c.H = moereg_test::random_normal(r, static_cast<std::size_t>(T * k * d));
  return c;
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
inline bool bitwise_equal(double a, double b) {
  return std::memcmp(&a, &b, sizeof(double)) == 0;
}

}  // namespace moereg_hardening
