// The activation-loss cases of the shared list (support/loss_cases.hpp): specialization and
// orthogonality (pairwise and subspace), token-major double activations. The property tests
// are in test_properties.cpp. Also the derivative below the clamps against the reference and
// the configured k of the subspace variant.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/orthogonality.hpp>
#include <moereg/losses/specialization.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/loss_cases.hpp"

namespace moereg_test {
namespace {

using moereg::index_t;

moereg::stats_view sv(const std::vector<double>* r) {
  return r ? moereg::stats_view{r->data(), static_cast<index_t>(r->size())} : moereg::stats_view{};
}

/// [T, k * d] activations and a [T, k] topk with dropped slots; k up to 8 (the compile-time
/// paths 2..8 and the run-time one), d odd or crossing the 8-double pack width.
batch gram_batch(rng& r) {
  batch b;
  b.k = r.integer(1, 8);
  const long long dims[] = {1, 3, 8, 17, 33};
  b.d = dims[r.integer(0, 4)];
  b.E = b.k + r.integer(0, 3);
  b.reals.resize(1);
  b.real_w = {b.k * b.d};
  b.ints.resize(1);
  b.int_w = {b.k};
  return b;
}

void gram_append(batch& b, rng& r, long long n) {
  append_normal(b, 0, r, n, 1.0);
  append_topk(b, 0, r, n, b.E, 0.2);
  b.T += n;
  b.mask.resize(static_cast<std::size_t>(b.T), 1);
}

batch gram_make(rng& r, long long T) {
  batch b = gram_batch(r);
  gram_append(b, r, T);
  b.mask = random_mask(r, T, 0.25);
  return b;
}

template <class Loss, template <class, class> class Inputs>
double gram_call(const Loss& loss, const batch& b, double* grad, moereg::grad_options o,
                 const std::vector<double>* red) {
  const std::vector<std::int64_t> I = cast<std::int64_t>(b.ints[0]);
  const Inputs<double, moereg::token_major> in{
      {b.reals[0].data(), moereg::token_major(b.T, b.k, b.d)}, {I.data(), b.T, b.k}, {b.mask.data(), b.T}, b.E};
  if (!grad) return loss.value(in, sv(red));
  return loss.value_and_grad(in, moereg::token_major_view<double>(grad, b.T, b.k, b.d), o, sv(red));
}
template <class Loss, template <class, class> class Inputs>
std::vector<double> gram_stats(const Loss& loss, const batch& b) {
  const std::vector<std::int64_t> I = cast<std::int64_t>(b.ints[0]);
  return loss.local_stats(Inputs<double, moereg::token_major>{
      {b.reals[0].data(), moereg::token_major(b.T, b.k, b.d)}, {I.data(), b.T, b.k}, {b.mask.data(), b.T}, b.E});
}

moereg::specialization_loss sp() {
  moereg::specialization_loss l{};
  l.cfg.coef = 0.3;
  return l;
}
moereg::orthogonality_loss orth(bool subspace) {
  moereg::orthogonality_loss l{};
  l.cfg.coef = 0.2;
  l.cfg.eps = 1e-3;  // keeps the subspace solves well conditioned for d < k
  l.cfg.variant = subspace ? moereg::ortho_variant::subspace : moereg::ortho_variant::pairwise;
  return l;
}

}  // namespace

batch case_specialization::make(rng& r, long long T) {
  return gram_make(r, T);
}
void case_specialization::append(batch& b, rng& r, long long n) {
  gram_append(b, r, n);
}
std::vector<long long> case_specialization::grad_widths(const batch& b) {
  return {b.k * b.d};
}
double case_specialization::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return gram_call<moereg::specialization_loss, moereg::specialization_inputs>(sp(), b, g, o, red);
}
std::vector<double> case_specialization::stats(const batch& b) {
  return gram_stats<moereg::specialization_loss, moereg::specialization_inputs>(sp(), b);
}

batch case_ortho_pairwise::make(rng& r, long long T) {
  return gram_make(r, T);
}
void case_ortho_pairwise::append(batch& b, rng& r, long long n) {
  gram_append(b, r, n);
}
std::vector<long long> case_ortho_pairwise::grad_widths(const batch& b) {
  return {b.k * b.d};
}
double case_ortho_pairwise::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return gram_call<moereg::orthogonality_loss, moereg::orthogonality_inputs>(orth(false), b, g, o, red);
}
std::vector<double> case_ortho_pairwise::stats(const batch& b) {
  return gram_stats<moereg::orthogonality_loss, moereg::orthogonality_inputs>(orth(false), b);
}

batch case_ortho_subspace::make(rng& r, long long T) {
  return gram_make(r, T);
}
void case_ortho_subspace::append(batch& b, rng& r, long long n) {
  gram_append(b, r, n);
}
std::vector<long long> case_ortho_subspace::grad_widths(const batch& b) {
  return {b.k * b.d};
}
double case_ortho_subspace::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return gram_call<moereg::orthogonality_loss, moereg::orthogonality_inputs>(orth(true), b, g, o, red);
}
std::vector<double> case_ortho_subspace::stats(const batch& b) {
  return gram_stats<moereg::orthogonality_loss, moereg::orthogonality_inputs>(orth(true), b);
}

}  // namespace moereg_test

// ---------------------------------------------------------------------------------------------
// Below the clamp: the derivative where ||h|| < eps (specialization: the norm is the constant
// eps there) and where ||h||^2 < eps (orthogonality: phi'(q) = (eps - q) / (q + eps)^3 changes
// sign) against the float64 reference, with vectors on both sides of the clamp in one token.

namespace {

using namespace moereg_test;

struct clamp_problem {
  long long T, k, d, E;
  std::vector<double> H;
  std::vector<long long> I;
  std::vector<std::uint8_t> m;
};

/// Slot vectors with norms spread over [0.02, 3] around the clamp (and a few exact zeros).
clamp_problem clamp_case(std::uint64_t seed, long long T, long long k, long long d) {
  rng r(seed);
  clamp_problem p{T,
                  k,
                  d,
                  k + 2,
                  random_normal(r, static_cast<std::size_t>(T * k * d)),
                  random_topk(r, T, k + 2, k, 0.1),
                  random_mask(r, T, 0.1)};
  for (long long v = 0; v < T * k; ++v) {
    double n2 = 0;
    for (long long i = 0; i < d; ++i)
      n2 += p.H[static_cast<std::size_t>(v * d + i)] * p.H[static_cast<std::size_t>(v * d + i)];
    const double target = r.uniform() < 0.05 ? 0.0 : std::exp(r.uniform(std::log(0.02), std::log(3.0)));
    for (long long i = 0; i < d; ++i) p.H[static_cast<std::size_t>(v * d + i)] *= target / std::sqrt(n2);
  }
  return p;
}

template <class Loss, template <class, class> class Inputs>
double clamp_run(const Loss& loss, const clamp_problem& p, std::vector<double>& g) {
  const std::vector<std::int64_t> I = cast<std::int64_t>(p.I);
  const Inputs<double, moereg::token_major> in{
      {p.H.data(), moereg::token_major(p.T, p.k, p.d)}, {I.data(), p.T, p.k}, {p.m.data(), p.T}, p.E};
  return checked_grad_into(g, p.H.size(), [&](double* buf, moereg::grad_options o) {
    return loss.value_and_grad(in, moereg::token_major_view<double>(buf, p.T, p.k, p.d), o);
  });
}

/// Gradient error per slot vector, at the vector's own scale (a clamped vector's gradient is
/// of order 1/eps next to O(1) ones), but at least 1e-5 of the largest entry (with d = 1 every
/// cosine between unclamped vectors is +-1, and their gradient is rounding noise of the largest entries).
double per_vector_rel(const std::vector<double>& a, const std::vector<double>& b, long long d) {
  double worst = 0;
  const double floor = 1e-5 * max_abs(b);
  for (std::size_t v = 0; v < b.size(); v += static_cast<std::size_t>(d)) {
    double diff = 0, scale = 0;
    for (std::size_t i = v; i < v + static_cast<std::size_t>(d); ++i) {
      diff = std::max(diff, std::abs(a[i] - b[i]));
      scale = std::max(scale, std::abs(b[i]));
    }
    worst = std::max(worst, diff / std::max({scale, floor, 1e-300}));
  }
  return worst;
}

}  // namespace

TEST_CASE("specialization below the norm clamp (||h|| < eps) matches the reference", "[specialization][clamp]") {
  for (auto [T, k, d] : {std::tuple<long long, long long, long long>{40, 4, 9}, {33, 2, 1}, {25, 6, 17}, {20, 5, 3}}) {
    CAPTURE(T, k, d);
    const clamp_problem p = clamp_case(static_cast<std::uint64_t>(T * 7 + k), T, k, d);
    for (bool mean : {false, true}) {
      CAPTURE(mean);
      moereg::specialization_loss loss{};
      loss.cfg.coef = 0.9;
      loss.cfg.eps = 0.5;  // about half of the vectors are shorter than eps
      loss.cfg.pairs = mean ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
      std::vector<double> g;
      const double v = clamp_run<moereg::specialization_loss, moereg::specialization_inputs>(loss, p, g);
      const auto ref = moereg_ref::specialization(p.H, p.I, to_int_mask(p.m), p.T, p.k, p.d, 0.9, mean, 0.5);
      CHECK(v == Approx(ref.value).epsilon(1e-12));
      CHECK(per_vector_rel(g, ref.grad, p.d) < 1e-10);
    }
  }
}

TEST_CASE("orthogonality below the clamp (||h||^2 < eps) matches the reference", "[orthogonality][clamp]") {
  for (auto [T, k, d] : {std::tuple<long long, long long, long long>{40, 4, 9}, {33, 2, 1}, {25, 6, 17}, {20, 3, 3}}) {
    CAPTURE(T, k, d);
    const clamp_problem p = clamp_case(static_cast<std::uint64_t>(T * 5 + k), T, k, d);
    for (bool subspace : {false, true}) {
      CAPTURE(subspace);
      moereg::orthogonality_loss loss{};
      loss.cfg.coef = 0.6;
      loss.cfg.eps = 0.09;  // ||h||^2 < eps for vectors shorter than 0.3
      loss.cfg.variant = subspace ? moereg::ortho_variant::subspace : moereg::ortho_variant::pairwise;
      std::vector<double> g;
      const double v = clamp_run<moereg::orthogonality_loss, moereg::orthogonality_inputs>(loss, p, g);
      const auto ref = moereg_ref::orthogonality(p.H, p.I, to_int_mask(p.m), p.T, p.k, p.d, 0.6, false,
                                                 subspace ? "subspace" : "pairwise", 0.09);
      CHECK(v == Approx(ref.value).epsilon(1e-11));
      CHECK(per_vector_rel(g, ref.grad, p.d) < 1e-9);
    }
  }
}

TEST_CASE("orthogonality subspace: the configured k scales the loss as 1/k", "[orthogonality][k]") {
  const clamp_problem p = clamp_case(77, 30, 3, 5);
  moereg::orthogonality_loss loss{};
  loss.cfg.coef = 0.6;
  loss.cfg.variant = moereg::ortho_variant::subspace;
  std::vector<double> g3, g7;
  const double v3 = clamp_run<moereg::orthogonality_loss, moereg::orthogonality_inputs>(loss, p, g3);
  loss.cfg.k = 7;
  const double v7 = clamp_run<moereg::orthogonality_loss, moereg::orthogonality_inputs>(loss, p, g7);
  const auto ref = moereg_ref::orthogonality(p.H, p.I, to_int_mask(p.m), p.T, p.k, p.d, 0.6, false, "subspace", 1e-6);
  CHECK(v3 == Approx(ref.value).epsilon(1e-10));
  CHECK(v7 == Approx(ref.value * 3.0 / 7.0).epsilon(1e-10));
  for (std::size_t i = 0; i < g3.size(); ++i) CHECK(g7[i] == Approx(g3[i] * 3.0 / 7.0).epsilon(1e-12).margin(1e-300));
}
