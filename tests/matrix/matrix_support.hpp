// Shared pieces of the optimisation-level matrix tests (tests/matrix): storage conversion,
// NaN-filled gradient buffers and the comparison with the float64 reference. These tests are
// small on purpose: CI compiles them once per compiler, optimisation level, instruction set
// and OpenMP setting (.ci/run), so they cover every loss and storage type at modest sizes
// rather than repeating the full suite.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <moereg/core/types.hpp>

#include "reference/reference.hpp"
#include "support/random.hpp"

namespace moereg_matrix {

/// Round a float64 vector into storage type T.
template <class T>
std::vector<T> to_storage(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(static_cast<moereg::accumulator_t<T>>(v[i]));
  return out;
}

/// The values a storage vector holds, in float64 (what the reference must see).
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(moereg::load(v[i]));
  return out;
}

/// A gradient buffer of n entries, every one a NaN: an entry the library does not write stays
/// NaN and fails the comparison.
template <class T>
std::vector<T> nan_buffer(std::size_t n) {
  return std::vector<T>(n, static_cast<T>(std::numeric_limits<moereg::accumulator_t<T>>::quiet_NaN()));
}

/// Relative tolerance of a value or gradient computed from storage type T against the
/// reference on the same (rounded) inputs.
template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>)
    return 1e-10;
  else if constexpr (std::is_same_v<T, float>)
    return 5e-5;
  else
    return 2e-2;  // 16-bit gradients: 8 (bfloat16) or 11 (half) significant bits
}

/// The smallest step of storage type T near zero: a gradient entry below it cannot be stored
/// exactly (half has subnormals from 2^-24; the others have the range of float or double).
template <class T>
double storage_floor() {
  return std::is_same_v<T, moereg::half> ? std::ldexp(1.0, -24) : 0.0;
}

/// The value and every gradient entry against the reference: |v - ref| <= tol (|ref| + 1e-9)
/// and |g - ref| <= tol * max |ref| + the storage floor.
template <class T>
void compare(double value, const std::vector<T>& grad, double want_value, const std::vector<double>& want_grad) {
  const double tol = tolerance<T>();
  REQUIRE(std::isfinite(value));
  REQUIRE(std::fabs(value - want_value) <= tol * (std::fabs(want_value) + 1e-9));
  REQUIRE(grad.size() == want_grad.size());
  double gmax = 0;
  for (double x : want_grad) gmax = std::fmax(gmax, std::fabs(x));
  for (std::size_t i = 0; i < grad.size(); ++i) {
    const double g = static_cast<double>(moereg::load(grad[i]));
    INFO("gradient entry " << i << ": " << g << " against " << want_grad[i]);
    REQUIRE(std::isfinite(g));
    REQUIRE(std::fabs(g - want_grad[i]) <= tol * gmax + storage_floor<T>());
  }
}

}  // namespace moereg_matrix
