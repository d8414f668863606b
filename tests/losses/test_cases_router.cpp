// The router-loss cases of the shared list (support/loss_cases.hpp): load balancing (micro,
// sequence with cu_seqlens, global), z-loss, entropy, importance, variance (both axes).
// The property tests themselves are in test_properties.cpp. Also targeted tests of the
// configured k of load balancing and of the entropy clamp at its default.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/entropy.hpp>
#include <moereg/losses/importance.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/variance.hpp>
#include <moereg/losses/z_loss.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/loss_cases.hpp"

namespace moereg_test {
namespace {

using moereg::index_t;

moereg::stats_view sv(const std::vector<double>* r) {
  return r ? moereg::stats_view{r->data(), static_cast<index_t>(r->size())} : moereg::stats_view{};
}

/// A batch of one [T, E] table, E drawn from [lo, hi], plus (with_topk) a [T, k] topk.
batch router_batch(rng& r, long long lo, long long hi, bool with_topk) {
  batch b;
  b.E = r.integer(lo, hi);
  b.reals.resize(1);
  b.real_w = {b.E};
  if (with_topk) {
    b.k = r.integer(1, std::min<long long>(b.E, 4));
    b.ints.resize(1);
    b.int_w = {b.k};
  }
  return b;
}

void finish(batch& b, rng& r, long long T, void (*append)(batch&, rng&, long long)) {
  append(b, r, T);
  b.mask = random_mask(r, T, 0.25);
}

// ---- load balancing -------------------------------------------------------------------------

void lb_append(batch& b, rng& r, long long n) {
  append_probs(b, 0, r, n);
  append_topk(b, 0, r, n, b.E, 0.2);
  b.T += n;
  b.mask.resize(static_cast<std::size_t>(b.T), 1);
  if (!b.cu.empty()) b.cu.back() = b.T;
}

double lb_call(const batch& b, moereg::lb_scope scope, double* grad, moereg::grad_options o,
               const std::vector<double>* red) {
  const moereg::load_balancing_loss loss{{0.37, scope}};
  const std::vector<std::int64_t> I = cast<std::int64_t>(b.ints[0]);
  const std::vector<std::int64_t> cu = cast<std::int64_t>(b.cu);
  moereg::load_balancing_inputs<double> in{{b.reals[0].data(), b.T, b.E}, {I.data(), b.T, b.k}, {b.mask.data(), b.T}};
  if (scope == moereg::lb_scope::sequence)
    in.cu_seqlens = moereg::offsets_view(cu.data(), static_cast<index_t>(cu.size()));
  if (!grad) return loss.value(in, sv(red));
  return loss.value_and_grad(in, moereg::matrix_view<double>(grad, b.T, b.E), o, sv(red));
}

std::vector<double> lb_stats(const batch& b, moereg::lb_scope scope) {
  const moereg::load_balancing_loss loss{{0.37, scope}};
  const std::vector<std::int64_t> I = cast<std::int64_t>(b.ints[0]);
  const std::vector<std::int64_t> cu = cast<std::int64_t>(b.cu);
  moereg::load_balancing_inputs<double> in{{b.reals[0].data(), b.T, b.E}, {I.data(), b.T, b.k}, {b.mask.data(), b.T}};
  if (scope == moereg::lb_scope::sequence)
    in.cu_seqlens = moereg::offsets_view(cu.data(), static_cast<index_t>(cu.size()));
  return loss.local_stats(in);
}

// ---- the matrix losses (one [T, E] input, gradient of the same shape) -------------------------

template <class Loss, template <class> class Inputs>
double matrix_call(const Loss& loss, const batch& b, double* grad, moereg::grad_options o,
                   const std::vector<double>* red) {
  const Inputs<double> in{{b.reals[0].data(), b.T, b.E}, {b.mask.data(), b.T}};
  if (!grad) return loss.value(in, sv(red));
  return loss.value_and_grad(in, moereg::matrix_view<double>(grad, b.T, b.E), o, sv(red));
}
template <class Loss, template <class> class Inputs>
std::vector<double> matrix_stats(const Loss& loss, const batch& b) {
  return loss.local_stats(Inputs<double>{{b.reals[0].data(), b.T, b.E}, {b.mask.data(), b.T}});
}

void probs_append(batch& b, rng& r, long long n) {
  append_probs(b, 0, r, n);
  b.T += n;
  b.mask.resize(static_cast<std::size_t>(b.T), 1);
}
void logits_append(batch& b, rng& r, long long n) {
  append_normal(b, 0, r, n, 4.0);
  b.T += n;
  b.mask.resize(static_cast<std::size_t>(b.T), 1);
}

moereg::variance_loss variance(moereg::variance_axis axis) {
  moereg::variance_loss l{};
  l.cfg.coef = 0.8;
  l.cfg.axis = axis;
  return l;
}

}  // namespace

// load_balancing micro
batch case_lb_micro::make(rng& r, long long T) {
  batch b = router_batch(r, 1, 12, true);
  finish(b, r, T, lb_append);
  return b;
}
void case_lb_micro::append(batch& b, rng& r, long long n) {
  lb_append(b, r, n);
}
std::vector<long long> case_lb_micro::grad_widths(const batch& b) {
  return {b.E};
}
double case_lb_micro::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return lb_call(b, moereg::lb_scope::micro, g, o, red);
}
std::vector<double> case_lb_micro::stats(const batch& b) {
  return lb_stats(b, moereg::lb_scope::micro);
}

// load_balancing sequence: random packed sequences, empty ones included.
batch case_lb_sequence::make(rng& r, long long T) {
  batch b = router_batch(r, 1, 10, true);
  finish(b, r, T, lb_append);
  const long long B = r.integer(1, 6);
  std::vector<long long> cuts;
  for (long long i = 0; i + 1 < B; ++i) cuts.push_back(r.integer(0, T));
  std::sort(cuts.begin(), cuts.end());
  b.cu = {0};
  b.cu.insert(b.cu.end(), cuts.begin(), cuts.end());
  b.cu.push_back(T);
  return b;
}
void case_lb_sequence::append(batch& b, rng& r, long long n) {
  lb_append(b, r, n);
}
std::vector<long long> case_lb_sequence::grad_widths(const batch& b) {
  return {b.E};
}
double case_lb_sequence::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return lb_call(b, moereg::lb_scope::sequence, g, o, red);
}
std::vector<double> case_lb_sequence::stats(const batch& b) {
  return lb_stats(b, moereg::lb_scope::sequence);
}

// load_balancing global
batch case_lb_global::make(rng& r, long long T) {
  batch b = router_batch(r, 2, 12, true);
  finish(b, r, T, lb_append);
  return b;
}
void case_lb_global::append(batch& b, rng& r, long long n) {
  lb_append(b, r, n);
}
std::vector<long long> case_lb_global::grad_widths(const batch& b) {
  return {b.E};
}
double case_lb_global::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return lb_call(b, moereg::lb_scope::global, g, o, red);
}
std::vector<double> case_lb_global::stats(const batch& b) {
  return lb_stats(b, moereg::lb_scope::global);
}

// z_loss
batch case_z_loss::make(rng& r, long long T) {
  batch b = router_batch(r, 1, 40, false);
  finish(b, r, T, logits_append);
  return b;
}
void case_z_loss::append(batch& b, rng& r, long long n) {
  logits_append(b, r, n);
}
std::vector<long long> case_z_loss::grad_widths(const batch& b) {
  return {b.E};
}
double case_z_loss::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return matrix_call<moereg::z_loss, moereg::z_loss_inputs>(moereg::z_loss{{0.6}}, b, g, o, red);
}
std::vector<double> case_z_loss::stats(const batch& b) {
  return matrix_stats<moereg::z_loss, moereg::z_loss_inputs>(moereg::z_loss{{0.6}}, b);
}

// entropy (probabilities with some exact zeros: the clamp branch)
namespace {
void entropy_append(batch& b, rng& r, long long n) {
  const std::size_t first = b.reals[0].size();
  probs_append(b, r, n);
  for (std::size_t i = first; i < b.reals[0].size(); ++i)
    if (r.uniform() < 0.05) b.reals[0][i] = 0.0;
}
}  // namespace
batch case_entropy::make(rng& r, long long T) {
  batch b = router_batch(r, 1, 40, false);
  finish(b, r, T, entropy_append);
  return b;
}
void case_entropy::append(batch& b, rng& r, long long n) {
  entropy_append(b, r, n);
}
std::vector<long long> case_entropy::grad_widths(const batch& b) {
  return {b.E};
}
double case_entropy::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return matrix_call<moereg::entropy_loss, moereg::entropy_inputs>(moereg::entropy_loss{{0.9}}, b, g, o, red);
}
std::vector<double> case_entropy::stats(const batch& b) {
  return matrix_stats<moereg::entropy_loss, moereg::entropy_inputs>(moereg::entropy_loss{{0.9}}, b);
}

// importance
batch case_importance::make(rng& r, long long T) {
  batch b = router_batch(r, 1, 16, false);
  finish(b, r, T, probs_append);
  return b;
}
void case_importance::append(batch& b, rng& r, long long n) {
  probs_append(b, r, n);
}
std::vector<long long> case_importance::grad_widths(const batch& b) {
  return {b.E};
}
double case_importance::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return matrix_call<moereg::importance_loss, moereg::importance_inputs>(moereg::importance_loss{{0.45}}, b, g, o, red);
}
std::vector<double> case_importance::stats(const batch& b) {
  return matrix_stats<moereg::importance_loss, moereg::importance_inputs>(moereg::importance_loss{{0.45}}, b);
}

// variance, tokens axis (scores: probabilities) and experts axis (unnormalised scores)
batch case_variance_tokens::make(rng& r, long long T) {
  batch b = router_batch(r, 1, 16, false);
  finish(b, r, T, probs_append);
  return b;
}
void case_variance_tokens::append(batch& b, rng& r, long long n) {
  probs_append(b, r, n);
}
std::vector<long long> case_variance_tokens::grad_widths(const batch& b) {
  return {b.E};
}
double case_variance_tokens::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return matrix_call<moereg::variance_loss, moereg::variance_inputs>(variance(moereg::variance_axis::tokens), b, g, o,
                                                                     red);
}
std::vector<double> case_variance_tokens::stats(const batch& b) {
  return matrix_stats<moereg::variance_loss, moereg::variance_inputs>(variance(moereg::variance_axis::tokens), b);
}

batch case_variance_experts::make(rng& r, long long T) {
  batch b = router_batch(r, 2, 16, false);
  finish(b, r, T, logits_append);
  return b;
}
void case_variance_experts::append(batch& b, rng& r, long long n) {
  logits_append(b, r, n);
}
std::vector<long long> case_variance_experts::grad_widths(const batch& b) {
  return {b.E};
}
double case_variance_experts::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return matrix_call<moereg::variance_loss, moereg::variance_inputs>(variance(moereg::variance_axis::experts), b, g, o,
                                                                     red);
}
std::vector<double> case_variance_experts::stats(const batch& b) {
  return matrix_stats<moereg::variance_loss, moereg::variance_inputs>(variance(moereg::variance_axis::experts), b);
}

}  // namespace moereg_test

// ---------------------------------------------------------------------------------------------
// Targeted tests of items the shared cases do not pin down: the configured k of load
// balancing (micro and global scopes) and the entropy clamp at its default tiny, each against
// the float64 reference.

namespace {

using namespace moereg_test;

/// topk [T, k] widened to [T, kw] with dropped (-1) slots: the reference's way of dividing
/// f_e by a configured k larger than the number of columns.
std::vector<long long> widen(const std::vector<long long>& I, long long T, long long k, long long kw) {
  std::vector<long long> out(static_cast<std::size_t>(T * kw), -1);
  for (long long t = 0; t < T; ++t)
    for (long long s = 0; s < k; ++s)
      out[static_cast<std::size_t>(t * kw + s)] = I[static_cast<std::size_t>(t * k + s)];
  return out;
}

}  // namespace

TEST_CASE("load balancing: the configured k divides f_e (micro and global scopes)", "[load_balancing][k]") {
  rng r(501);
  const long long T = 70, E = 9, k = 2;
  const auto P = random_probs(r, T, E);
  const auto I = random_topk(r, T, E, k, 0.2);
  const auto m = random_mask(r, T, 0.2);
  const auto I64 = cast<std::int64_t>(I);
  const moereg::load_balancing_inputs<double> in{{P.data(), T, E}, {I64.data(), T, k}, {m.data(), T}};
  for (long long kc : {0LL, 2LL, 3LL, 9LL}) {
    CAPTURE(kc);
    const long long kw = kc == 0 ? k : kc;
    const auto ref = moereg_ref::load_balancing(P, widen(I, T, k, kw), to_int_mask(m), T, E, kw, 0.4);
    for (auto scope : {moereg::lb_scope::micro, moereg::lb_scope::global}) {
      const moereg::load_balancing_loss loss{{0.4, scope, 0, kc}};
      std::vector<double> g;
      const double v = checked_grad_into(g, P.size(), [&](double* b, moereg::grad_options o) {
        return loss.value_and_grad(in, moereg::matrix_view<double>(b, T, E), o);
      });
      CHECK(v == Approx(ref.value).epsilon(1e-12));
      CHECK(rel_diff(g, ref.grad, 1e-300) < 1e-12);
    }
    // Global scope with reduced counts of a larger batch: f_e = count_e / (k_config * T_v total).
    const moereg::load_balancing_loss global{{0.4, moereg::lb_scope::global, 0, kc}};
    std::vector<double> red = global.local_stats(in);
    red[0] += 30;  // 30 more valid tokens elsewhere, all routed to expert 1
    red[2] += 30;
    double tv = 0;
    for (auto x : m) tv += x;
    std::vector<double> g;
    const double v = checked_grad_into(g, P.size(), [&](double* b, moereg::grad_options o) {
      return global.value_and_grad(in, moereg::matrix_view<double>(b, T, E), o, {red.data(), 1 + E});
    });
    double want = 0;
    for (long long e = 0; e < E; ++e) {
      double pbar = 0;
      for (long long t = 0; t < T; ++t) pbar += m[static_cast<std::size_t>(t)] * P[static_cast<std::size_t>(t * E + e)];
      const double f = red[static_cast<std::size_t>(1 + e)] / (static_cast<double>(kw) * red[0]);
      want += 0.4 * E * f * pbar / tv;
      for (long long t = 0; t < T; ++t)
        CHECK(g[static_cast<std::size_t>(t * E + e)] ==
              Approx(m[static_cast<std::size_t>(t)] ? 0.4 * E * f / tv : 0.0).epsilon(1e-12));
    }
    CHECK(v == Approx(want).epsilon(1e-12));
  }
}

TEST_CASE("entropy: the default clamp tiny = 1e-30 against the reference, both sides of it", "[entropy][clamp]") {
  rng r(502);
  const long long T = 45, E = 11;
  auto P = random_probs(r, T, E);
  const double tiny_probs[] = {0.0, 1e-300, 1e-35, 1e-31, 1e-29, 1e-25, 1e-21, 1e-18, 1e-12};
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < 4; ++e) P[static_cast<std::size_t>(t * E + (t + e) % E)] = tiny_probs[(t * 4 + e) % 9];
  const auto m = random_mask(r, T, 0.2);
  const moereg::entropy_loss loss{};  // default coef and tiny
  const auto ref = moereg_ref::entropy(P, to_int_mask(m), T, E, 1e-3);
  for (bool f32 : {false, true}) {
    CAPTURE(f32);
    if (!f32) {
      std::vector<double> g;
      const double v = checked_grad_into(g, P.size(), [&](double* b, moereg::grad_options o) {
        return loss.value_and_grad(moereg::entropy_inputs<double>{{P.data(), T, E}, {m.data(), T}},
                                   moereg::matrix_view<double>(b, T, E), o);
      });
      CHECK(v == Approx(ref.value).epsilon(1e-12));
      CHECK(rel_diff(g, ref.grad, 1e-300) < 1e-12);
    } else {
      // float: 1e-300 becomes 0; the other small entries stay normal floats on both sides of tiny.
      const std::vector<float> Pf(P.begin(), P.end());
      std::vector<double> Pr(Pf.begin(), Pf.end());
      const auto reff = moereg_ref::entropy(Pr, to_int_mask(m), T, E, 1e-3);
      const auto res = checked_grad<float>(P.size(), [&](float* b, moereg::grad_options o) {
        return loss.value_and_grad(moereg::entropy_inputs<float>{{Pf.data(), T, E}, {m.data(), T}},
                                   moereg::matrix_view<float>(b, T, E), o);
      });
      CHECK(res.value == Approx(reff.value).epsilon(1e-5));
      const std::vector<double> gd(res.grad.begin(), res.grad.end());
      CHECK(rel_diff(gd, reff.grad, 1e-300) < 1e-5);
    }
  }
}
