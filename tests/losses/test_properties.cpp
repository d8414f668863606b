// Property tests over the shared list of every loss (support/loss_cases.hpp), random inputs
// with masks, dropped slots and odd sizes:
//   - overwrite mode writes every gradient entry, accumulate(g0) - g0 == overwrite for random
//     g0, and value() equals the value of value_and_grad();
//   - grad_scale is linear (and 0 gives an all-zero gradient);
//   - appending padded rows (mask 0) changes neither the value nor the gradient rows, and the
//     padded rows get an exactly zero gradient;
//   - permuting the tokens permutes the gradient rows and keeps the value (every loss but the
//     sequence-scope load balancing, whose tokens are only permuted inside their sequence);
//   - splitting the batch into parts and passing the summed local_stats as `reduced`
//     reproduces the whole batch (LOSSES.md section 9): each part gets the whole batch's
//     gradient rows and the parts' values sum to the whole value (importance: every part's
//     value is the whole value; global-scope load balancing: f is global, pbar and 1/T_v are
//     the part's own, so part values and rows scale by T_v(part) / T_v).
// Every gradient goes through support/grad_buffers.hpp (NaN-filled before an overwrite call).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "support/grad_buffers.hpp"
#include "support/loss_cases.hpp"
#include "support/random.hpp"

using namespace moereg_test;

namespace {

const long long sizes[] = {1, 2, 3, 17, 64, 255, 257, 300};
const std::uint64_t seeds[] = {11, 12, 13, 14, 15};

template <class C>
batch make_batch(std::uint64_t seed) {
  rng r(seed * 7919 + 3);
  const long long T = sizes[r.integer(0, 7)];
  return C::make(r, T);
}

/// The loss's value and, through checked_grad, its gradient (overwrite and accumulate).
template <class C>
double run(const batch& b, std::vector<double>& g, moereg::grad_options o = {},
           const std::vector<double>* reduced = nullptr) {
  const auto w = C::grad_widths(b);
  return checked_grad_into(
      g, grad_size(b.T, w), [&](double* buf, moereg::grad_options go) { return C::call(b, buf, go, reduced); }, o);
}

#define CASE_INFO(b)                                                                               \
  INFO(C::name << ": seed " << seed << ", T = " << (b).T << ", E = " << (b).E << ", k = " << (b).k \
               << ", d = " << (b).d << ", layers = " << (b).layers                                 \
               << ", sequences = " << ((b).cu.empty() ? 0 : (b).cu.size() - 1))

}  // namespace

TEMPLATE_LIST_TEST_CASE("loss properties: every entry written, accumulate(g0) - g0 == overwrite, value() agrees",
                        "[properties][accumulate]", all_loss_cases) {
  using C = TestType;
  for (auto seed : seeds) {
    const batch b = make_batch<C>(seed);
    CASE_INFO(b);
    for (double gs : {1.0, -0.625}) {
      std::vector<double> g;
      const double v = run<C>(b, g, {gs, false});
      CHECK(C::call(b, nullptr, {}, nullptr) == v);
    }
  }
}

TEMPLATE_LIST_TEST_CASE("loss properties: grad_scale is linear", "[properties][grad_scale]", all_loss_cases) {
  using C = TestType;
  for (auto seed : seeds) {
    const batch b = make_batch<C>(seed);
    CASE_INFO(b);
    std::vector<double> g1;
    const double v1 = run<C>(b, g1);
    for (double s : {-2.5, 0.375, 1e-3}) {
      CAPTURE(s);
      std::vector<double> gs;
      CHECK(run<C>(b, gs, {s, false}) == v1);
      std::vector<double> want(g1);
      for (auto& x : want) x *= s;
      CHECK(rel_diff(gs, want, 1e-300) <= 1e-14);
    }
    std::vector<double> g0;
    run<C>(b, g0, {0.0, false});
    CHECK(max_abs(g0) == 0.0);
  }
}

TEMPLATE_LIST_TEST_CASE("loss properties: appended padding rows change nothing and get a zero gradient",
                        "[properties][padding]", all_loss_cases) {
  using C = TestType;
  for (auto seed : seeds) {
    const batch b = make_batch<C>(seed);
    CASE_INFO(b);
    std::vector<double> g;
    const double v = run<C>(b, g);
    const auto w = C::grad_widths(b);
    for (long long extra : {1LL, 6LL, 260LL}) {
      CAPTURE(extra);
      batch p = b;
      rng r(seed + 100 * static_cast<std::uint64_t>(extra));
      C::append(p, r, extra);
      for (long long t = b.T; t < p.T; ++t) p.mask[static_cast<std::size_t>(t)] = 0;
      std::vector<double> gp;
      const double vp = run<C>(p, gp);
      CHECK(vp == Approx(v).epsilon(1e-13).margin(1e-300));
      CHECK(rel_diff(grad_rows(gp, p.T, w, 0, b.T), g, 1e-300) <= 1e-13);
      CHECK(max_abs(grad_rows(gp, p.T, w, b.T, p.T)) == 0.0);
    }
  }
}

TEMPLATE_LIST_TEST_CASE("loss properties: permuting tokens permutes the gradient rows", "[properties][permutation]",
                        all_loss_cases) {
  using C = TestType;
  for (auto seed : seeds) {
    const batch b = make_batch<C>(seed);
    CASE_INFO(b);
    std::vector<double> g;
    const double v = run<C>(b, g);
    const auto w = C::grad_widths(b);
    std::vector<long long> perm(static_cast<std::size_t>(b.T));
    std::iota(perm.begin(), perm.end(), 0LL);
    rng r(seed + 5);
    if (C::equivariant) {
      std::shuffle(perm.begin(), perm.end(), r.gen);
    } else {
      // Sequence scope: the loss is a mean over sequences, so only a permutation inside each
      // sequence keeps it (moving a token to another sequence changes that sequence's f and pbar).
      REQUIRE_FALSE(b.cu.empty());
      for (std::size_t s = 0; s + 1 < b.cu.size(); ++s)
        std::shuffle(perm.begin() + b.cu[s], perm.begin() + b.cu[s + 1], r.gen);
    }
    const batch p = b.permuted(perm);
    std::vector<double> gp;
    const double vp = run<C>(p, gp);
    CHECK(vp == Approx(v).epsilon(1e-12).margin(1e-300));
    CHECK(rel_diff(gp, grad_permuted(g, b.T, w, perm), 1e-300) <= 1e-12);
  }
}

TEMPLATE_LIST_TEST_CASE("loss properties: parts with summed statistics reproduce the whole batch",
                        "[properties][stats]", all_loss_cases) {
  using C = TestType;
  for (auto seed : seeds) {
    const batch b = make_batch<C>(seed);
    CASE_INFO(b);
    std::vector<double> g;
    const double v = run<C>(b, g);
    const auto w = C::grad_widths(b);
    const auto own = C::stats(b);
    {
      INFO("the batch's own statistics passed as reduced give the plain call");
      std::vector<double> go;
      CHECK(run<C>(b, go, {}, &own) == Approx(v).epsilon(1e-14).margin(1e-300));
      CHECK(rel_diff(go, g, 1e-300) <= 1e-14);
    }
    // Three parts (possibly empty); sequence scope cuts at sequence boundaries.
    rng r(seed + 9);
    std::vector<batch> parts;
    std::vector<long long> row0;
    if (b.cu.empty()) {
      long long c1 = r.integer(0, b.T), c2 = r.integer(0, b.T);
      if (c1 > c2) std::swap(c1, c2);
      for (auto [r0, r1] : {std::pair<long long, long long>{0, c1}, {c1, c2}, {c2, b.T}}) {
        parts.push_back(b.rows(r0, r1));
        row0.push_back(r0);
      }
    } else {
      const long long B = static_cast<long long>(b.cu.size()) - 1;
      long long c1 = r.integer(0, B), c2 = r.integer(0, B);
      if (c1 > c2) std::swap(c1, c2);
      for (auto [s0, s1] : {std::pair<long long, long long>{0, c1}, {c1, c2}, {c2, B}}) {
        parts.push_back(b.sequences(s0, s1));
        row0.push_back(b.cu[static_cast<std::size_t>(s0)]);
      }
    }
    std::vector<double> total(own.size(), 0.0);
    for (const auto& p : parts) {
      const auto s = C::stats(p);
      REQUIRE(s.size() == own.size());
      for (std::size_t i = 0; i < s.size(); ++i) total[i] += s[i];
    }
    for (std::size_t i = 0; i < total.size(); ++i) CHECK(total[i] == Approx(own[i]).epsilon(1e-13).margin(1e-12));
    const double tv = static_cast<double>(b.valid());
    double vsum = 0;
    for (std::size_t i = 0; i < parts.size(); ++i) {
      const batch& p = parts[i];
      CAPTURE(i, p.T);
      std::vector<double> gp;
      const double vp = run<C>(p, gp, {}, &total);
      std::vector<double> want = grad_rows(g, b.T, w, row0[i], row0[i] + p.T);
      if (C::split == split_rule::global) {
        // f global, pbar and the 1/T_v of the gradient local: rows scale by T_v / T_v(part).
        const double tvp = static_cast<double>(p.valid());
        for (auto& x : want) x = tvp > 0 ? x * tv / tvp : 0.0;
        vsum += tv > 0 ? vp * tvp / tv : 0.0;
      } else if (C::split == split_rule::whole) {
        CHECK(vp == Approx(v).epsilon(1e-12).margin(1e-300));
      } else {
        vsum += vp;
      }
      CHECK(rel_diff(gp, want, std::max(max_abs(g), 1e-300)) <= 1e-12);
    }
    if (C::split != split_rule::whole) CHECK(vsum == Approx(v).epsilon(1e-12).margin(1e-15));
  }
}
