// Gradient buffers that catch unwritten entries.
//
// Every gradient entry point either overwrites the caller's buffer (zeros where the loss has
// no gradient) or adds into it (grad_options::accumulate). A test that starts from a
// zero-filled buffer cannot tell "wrote 0" from "wrote nothing", and a test that only ever
// overwrites cannot tell "added" from "overwrote". The helpers here close both gaps:
//
//   - before an overwrite-mode call every entry holds a NaN sentinel, so an entry the loss
//     should have written (a zero included) but did not stays NaN and is reported;
//   - before an accumulate-mode call every entry holds a random value g0 (rounded to the
//     storage type), and the test checks accumulate - g0 == overwrite entry by entry;
//   - entries the layout maps to no (token, slot) must never be touched: they keep the NaN
//     sentinel in overwrite mode and g0, bit for bit, in accumulate mode.
//
// checked_grad() runs both calls through one callable `call(T* buffer, grad_options)` that
// builds the caller's gradient view(s) on `buffer` and returns the loss value, CHECKs all of
// the above, and returns the overwrite-mode buffer and value. A test that deliberately checks
// other semantics (for example "a call that throws leaves the buffer untouched") keeps its own
// buffers.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/core/layouts.hpp>
#include <moereg/core/types.hpp>
#include <moereg/core/views.hpp>

namespace moereg_test {

/// An element of storage type T as double (16-bit types go through float, exactly).
template <class T>
double as_double(T v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return static_cast<double>(static_cast<float>(v));
}
/// A double rounded to storage type T.
template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return static_cast<T>(static_cast<float>(v));
}

/// The NaN sentinel of storage type T.
template <class T>
T nan_sentinel() {
  return from_double<T>(std::numeric_limits<double>::quiet_NaN());
}

/// Fills n entries with the NaN sentinel.
template <class T>
void fill_sentinel(T* p, std::size_t n) {
  std::fill(p, p + n, nan_sentinel<T>());
}
template <class T>
void fill_sentinel(std::vector<T>& v) {
  fill_sentinel(v.data(), v.size());
}

/// n uniform values in [-scale, scale], rounded to T; deterministic for a seed.
template <class T>
std::vector<T> random_prefill(std::size_t n, double scale, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = from_double<T>(scale * u(gen));
  return v;
}

/// Unit roundoff of storage type T (half the distance from 1 to the next number).
template <class T>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<T, double>)
    return 0x1p-53;
  else if constexpr (std::is_same_v<T, float>)
    return 0x1p-24;
  else if constexpr (std::is_same_v<T, moereg::half>)
    return 0x1p-11;
  else
    return 0x1p-8;  // bfloat16
}

/// Number of entries of v holding NaN.
template <class T>
std::size_t count_nan(const std::vector<T>& v) {
  std::size_t n = 0;
  for (const auto& x : v) n += std::isnan(as_double(x)) ? 1 : 0;
  return n;
}

template <class T>
struct checked_result {
  double value = 0;     ///< value of the overwrite-mode call
  std::vector<T> grad;  ///< the buffer after the overwrite-mode call (NaN = never written)
};

/// What checked_grad checks, beyond the defaults.
struct grad_check_options {
  /// 1 = the layout maps this entry to some (token, slot), 0 = it maps to nothing (must stay
  /// untouched). Null: every entry is mapped.
  const std::vector<char>* mapped = nullptr;
  /// Accumulate - g0 == overwrite is checked to this many times (unit roundoff of T times
  /// (|g0| + |overwrite|) plus T's smallest subnormal): the one rounding of each call. Plus
  /// `abs_floor`.
  double ulps = 4.0;
  double abs_floor = 0.0;
  /// Seed of g0.
  std::uint64_t seed = 0x5eed;
  /// The value of the two calls must agree to this relative tolerance (they are the same
  /// computation; 0 = bitwise).
  double value_rel = 0.0;
};

/// Runs `call(buffer, opts)` twice on a buffer of n entries: once in overwrite mode on a
/// NaN-filled buffer, once in accumulate mode on random g0, and CHECKs that
///  - every mapped entry was written in overwrite mode (no NaN left), every unmapped entry
///    still holds the sentinel;
///  - accumulate - g0 == overwrite for every mapped entry, and unmapped entries keep g0 bit
///    for bit;
///  - both calls return the same value.
/// `opts.accumulate` must be false (the overwrite-mode options; grad_scale is kept for both).
/// Returns the overwrite-mode value and buffer.
template <class T, class Call>
checked_result<T> checked_grad(std::size_t n, Call&& call, moereg::grad_options opts = {},
                               const grad_check_options& chk = {}) {
  REQUIRE_FALSE(opts.accumulate);
  if (chk.mapped) REQUIRE(chk.mapped->size() == n);
  auto is_mapped = [&](std::size_t i) { return chk.mapped == nullptr || (*chk.mapped)[i] != 0; };
  checked_result<T> out;
  out.grad.resize(n);
  fill_sentinel(out.grad);
  out.value = call(out.grad.data(), opts);

  std::size_t unwritten = 0, touched = 0, first_unwritten = n, first_touched = n;
  for (std::size_t i = 0; i < n; ++i) {
    const bool nan = std::isnan(as_double(out.grad[i]));
    if (is_mapped(i) && nan) {
      if (unwritten++ == 0) first_unwritten = i;
    } else if (!is_mapped(i) && !nan) {
      if (touched++ == 0) first_touched = i;
    }
  }
  {
    INFO("overwrite mode: " << unwritten << " of " << n << " mapped gradient entries were never written (first: "
                            << first_unwritten << "), or the loss wrote NaN");
    CHECK(unwritten == 0);
  }
  {
    INFO("overwrite mode: " << touched << " entries the layout maps to nothing were written (first: " << first_touched
                            << ")");
    CHECK(touched == 0);
  }

  // Accumulate mode on g0 of the gradient's own scale, so that the sum keeps the gradient's bits.
  double scale = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (is_mapped(i) && !std::isnan(as_double(out.grad[i]))) scale = std::max(scale, std::abs(as_double(out.grad[i])));
  if (!(scale > 0) || !std::isfinite(scale)) scale = 1.0;
  const std::vector<T> g0 = random_prefill<T>(n, scale, chk.seed + n);
  std::vector<T> acc = g0;
  moereg::grad_options ao = opts;
  ao.accumulate = true;
  const double v_acc = call(acc.data(), ao);
  if (chk.value_rel == 0.0) {
    INFO("the value must not depend on the accumulate flag");
    CHECK(std::memcmp(&v_acc, &out.value, sizeof(double)) == 0);
  } else {
    CHECK(v_acc == Approx(out.value).epsilon(chk.value_rel).margin(1e-300));
  }

  // The absolute step of T near 0 (16-bit half: 2^-24): sums that end in the subnormal range
  // are rounded to it.
  const double tiny_step = as_double(std::numeric_limits<T>::denorm_min());
  std::size_t bad = 0, first_bad = n;
  double worst_got = 0, worst_want = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double a = as_double(acc[i]), z = as_double(g0[i]);
    if (!is_mapped(i)) {
      if (std::memcmp(&acc[i], &g0[i], sizeof(T)) != 0 && bad++ == 0) first_bad = i, worst_got = a, worst_want = z;
      continue;
    }
    const double w = as_double(out.grad[i]);
    const double tol = chk.ulps * (unit_roundoff<T>() * (std::abs(z) + std::abs(w)) + tiny_step) + chk.abs_floor;
    if (!(std::abs((a - z) - w) <= tol) && bad++ == 0) first_bad = i, worst_got = a - z, worst_want = w;
  }
  INFO("accumulate mode: " << bad << " of " << n << " entries differ; first at " << first_bad << ": got " << worst_got
                           << " (accumulate - g0, or the value of an unmapped entry), want " << worst_want);
  CHECK(bad == 0);
  return out;
}

/// checked_grad() for a buffer of doubles; returns the value and leaves the overwrite-mode
/// gradient in `g` (resized to n).
template <class Call>
double checked_grad_into(std::vector<double>& g, std::size_t n, Call&& call, moereg::grad_options opts = {},
                         const grad_check_options& chk = {}) {
  auto r = checked_grad<double>(n, call, opts, chk);
  g = std::move(r.grad);
  return r.value;
}

/// checked_grad() of a loss whose gradient is one [rows, cols] matrix (the router losses):
/// `loss.value_and_grad(in, matrix_view<T>(buffer, rows, cols), opts, reduced, be)`.
template <class T, class Loss, class Inputs>
checked_result<T> checked_matrix(const Loss& loss, const Inputs& in, moereg::index_t rows, moereg::index_t cols,
                                 moereg::grad_options opts = {}, moereg::stats_view reduced = {}, moereg::cpu be = {}) {
  return checked_grad<T>(
      static_cast<std::size_t>(rows * cols),
      [&](T* b, moereg::grad_options o) {
        return loss.value_and_grad(in, moereg::matrix_view<T>(b, rows, cols), o, reduced, be);
      },
      opts);
}
/// checked_matrix(), the overwrite-mode gradient left in `g` (resized); returns the value.
template <class T, class Loss, class Inputs>
double checked_matrix_into(std::vector<T>& g, const Loss& loss, const Inputs& in, moereg::index_t rows,
                           moereg::index_t cols, moereg::grad_options opts = {}, moereg::stats_view reduced = {},
                           moereg::cpu be = {}) {
  auto r = checked_matrix<T>(loss, in, rows, cols, opts, reduced, be);
  g = std::move(r.grad);
  return r.value;
}

/// checked_grad() of an activation loss with a contiguous token-major [T, k, d] gradient; the
/// overwrite-mode gradient left in `g` (resized); returns the value.
template <class T, class Loss, class Inputs>
double checked_acts_into(std::vector<T>& g, const Loss& loss, const Inputs& in, moereg::index_t tokens,
                         moereg::index_t slots, moereg::index_t dim, moereg::grad_options opts = {},
                         moereg::stats_view reduced = {}, moereg::cpu be = {}) {
  auto r = checked_grad<T>(
      static_cast<std::size_t>(tokens * slots * dim),
      [&](T* b, moereg::grad_options o) {
        return loss.value_and_grad(in, moereg::token_major_view<T>(b, tokens, slots, dim), o, reduced, be);
      },
      opts);
  g = std::move(r.grad);
  return r.value;
}

/// checked_grad() of a loss with one [rows, cols] gradient matrix per layer (coupling): the
/// layers' gradients lie end to end in `g` (resized to layers * rows * cols); returns the value.
template <class T, class Loss, class Inputs>
double checked_layers_into(std::vector<T>& g, const Loss& loss, const Inputs& in, moereg::index_t layers,
                           moereg::index_t rows, moereg::index_t cols, moereg::grad_options opts = {},
                           moereg::stats_view reduced = {}, moereg::cpu be = {}) {
  auto r = checked_grad<T>(
      static_cast<std::size_t>(layers * rows * cols),
      [&](T* b, moereg::grad_options o) {
        std::vector<moereg::matrix_view<T>> views;
        for (moereg::index_t l = 0; l < layers; ++l) views.emplace_back(b + l * rows * cols, rows, cols);
        return loss.value_and_grad(in, views.data(), o, reduced, be);
      },
      opts);
  g = std::move(r.grad);
  return r.value;
}

}  // namespace moereg_test
