// Tests of the chain helpers (include/moereg/chain.hpp): softmax_backward and
// sigmoid_norm_backward, against the naive reference and finite differences.
#include <catch2/catch.hpp>

#include <moereg/chain.hpp>
#include <moereg/testing/gradcheck.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "reference/reference.hpp"
#include "support/random.hpp"

namespace {

using moereg::index_t;
using vec = std::vector<double>;

/// Naive forward of the normalised sigmoid scores (double, for finite differences).
vec sigmoid_norm(const vec& Z, long long T, long long E) {
  vec S(Z.size());
  for (long long t = 0; t < T; ++t) {
    double sum = 0;
    for (long long e = 0; e < E; ++e)
      sum += (S[static_cast<std::size_t>(t * E + e)] = 1.0 / (1.0 + std::exp(-Z[static_cast<std::size_t>(t * E + e)])));
    for (long long e = 0; e < E; ++e) S[static_cast<std::size_t>(t * E + e)] /= sum;
  }
  return S;
}

vec softmax(const vec& Z, long long T, long long E) {
  vec P(Z.size());
  for (long long t = 0; t < T; ++t) {
    double mx = -1e300, sum = 0;
    for (long long e = 0; e < E; ++e) mx = std::max(mx, Z[static_cast<std::size_t>(t * E + e)]);
    for (long long e = 0; e < E; ++e)
      sum += (P[static_cast<std::size_t>(t * E + e)] = std::exp(Z[static_cast<std::size_t>(t * E + e)] - mx));
    for (long long e = 0; e < E; ++e) P[static_cast<std::size_t>(t * E + e)] /= sum;
  }
  return P;
}

template <class S>
std::vector<S> to(const vec& v) {
  std::vector<S> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<S>(v[i]);
  return out;
}
template <class S>
vec from(const std::vector<S>& v) {
  vec out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<float>(v[i]));
  return out;
}
vec from(const vec& v) {
  return v;
}

/// Runs sigmoid_norm_backward on row-major data (logits col-major when asked).
template <class S>
vec run_sigmoid(const vec& Z, const vec& dS, long long T, long long E, moereg::grad_options opts = {}, vec init = {},
                bool col_major = false, moereg::cpu be = {}) {
  std::vector<S> z(Z.size()), ds = to<S>(dS), dz = init.empty() ? std::vector<S>(Z.size(), S(0.0f)) : to<S>(init);
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < E; ++e)
      z[static_cast<std::size_t>(col_major ? e * T + t : t * E + e)] =
          static_cast<S>(Z[static_cast<std::size_t>(t * E + e)]);
  const moereg::routing_view<S> zv =
      col_major ? moereg::routing_view<S>(z.data(), T, E, 1, T) : moereg::routing_view<S>(z.data(), T, E);
  moereg::sigmoid_norm_backward(zv, moereg::matrix_view<const S>(ds.data(), T, E),
                                moereg::matrix_view<S>(dz.data(), T, E), opts, be);
  return from(dz);
}

}  // namespace

TEST_CASE("sigmoid_norm_backward matches the reference in double", "[chain]") {
  moereg_test::rng r(601);
  for (const auto& sh : std::vector<std::pair<long long, long long>>{{1, 1}, {1, 5}, {37, 6}, {300, 16}, {0, 4}}) {
    const long long T = sh.first, E = sh.second;
    const vec Z = moereg_test::random_normal(r, static_cast<std::size_t>(T * E), 3.0);
    const vec dS = moereg_test::random_normal(r, static_cast<std::size_t>(T * E));
    const vec want = moereg_ref::sigmoid_norm_backward(Z, dS, T, E);
    INFO("T " << T << " E " << E);
    CHECK(moereg_test::rel_diff(run_sigmoid<double>(Z, dS, T, E), want) < 1e-12);
    CHECK(moereg_test::rel_diff(run_sigmoid<double>(Z, dS, T, E, {}, {}, true), want) < 1e-12);
    if (E > 1 && T > 0) CHECK(moereg_test::max_abs(want) > 1e-3);
  }
}

TEST_CASE("sigmoid_norm_backward matches finite differences", "[chain][gradcheck]") {
  moereg_test::rng r(602);
  const long long T = 6, E = 5;
  const vec Z = moereg_test::random_normal(r, T * E, 2.0), w = moereg_test::random_normal(r, T * E);
  auto f = [&](const double* z) {
    const vec S = sigmoid_norm(vec(z, z + T * E), T, E);
    double s = 0;
    for (std::size_t i = 0; i < S.size(); ++i) s += w[i] * S[i];
    return s;
  };
  const vec g = run_sigmoid<double>(Z, w, T, E);
  const auto rep = moereg::testing::gradcheck(f, Z, g);
  INFO(rep.summary());
  CHECK(rep.ok);
  CHECK(rep.checked == T * E);
  CHECK(moereg_test::max_abs(g) > 1e-3);
}

TEST_CASE("sigmoid_norm_backward stays finite for extreme logits", "[chain]") {
  // All logits far below zero: every sigmoid underflows in a naive evaluation, but S is
  // then softmax(Z) and 1 - sigmoid = 1, so dZ equals the softmax chain rule.
  const long long T = 3, E = 4;
  vec Z = {-1000, -1001, -999.5, -1002, -800, -800, -800, -800, -1e4, -1e4 + 1, -1e4 + 2, -1e4 + 3};
  const vec dS = {0.3, -1.0, 2.0, 0.5, 1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 0.5};
  const vec got = run_sigmoid<double>(Z, dS, T, E);
  const vec want = moereg_ref::softmax_backward(softmax(Z, T, E), dS, T, E);
  for (double x : got) CHECK(std::isfinite(x));
  CHECK(moereg_test::rel_diff(got, want) < 1e-12);
  const vec gotf = run_sigmoid<float>(Z, dS, T, E);
  for (double x : gotf) CHECK(std::isfinite(x));
  CHECK(moereg_test::rel_diff(gotf, want) < 1e-5);
  // Large positive logits: sigmoid rounds to 1, so 1 - sigmoid must come from exp(-z) rather
  // than a subtraction (which would give 0): S = sigma / sum, 1 - sigma = e / (1 + e), e = exp(-z).
  const vec Zp = {40, 41, 42, 43, 700, 701, 702, 703, 1e4, 1e4, 1e4, 1e4};
  const vec gp = run_sigmoid<double>(Zp, dS, T, E);
  for (long long t = 0; t < T; ++t) {
    double sum = 0, dot = 0;
    vec sig(static_cast<std::size_t>(E)), om(static_cast<std::size_t>(E));
    for (long long e = 0; e < E; ++e) {
      const double x = std::exp(-Zp[static_cast<std::size_t>(t * E + e)]);
      sig[static_cast<std::size_t>(e)] = 1.0 / (1.0 + x);
      om[static_cast<std::size_t>(e)] = x / (1.0 + x);
      sum += sig[static_cast<std::size_t>(e)];
    }
    for (long long e = 0; e < E; ++e)
      dot += sig[static_cast<std::size_t>(e)] / sum * dS[static_cast<std::size_t>(t * E + e)];
    for (long long e = 0; e < E; ++e) {
      const double want_e = sig[static_cast<std::size_t>(e)] / sum * om[static_cast<std::size_t>(e)] *
                            (dS[static_cast<std::size_t>(t * E + e)] - dot);
      const double got_e = gp[static_cast<std::size_t>(t * E + e)];
      CHECK(std::isfinite(got_e));
      CHECK(std::abs(got_e - want_e) <= 1e-12 * std::abs(want_e));
      if (t == 0) CHECK(got_e != 0.0);  // exp(-40) survives
    }
  }
}

TEST_CASE("sigmoid_norm_backward grad_scale, accumulate and in place", "[chain]") {
  moereg_test::rng r(603);
  const long long T = 29, E = 7;
  const vec Z = moereg_test::random_normal(r, T * E, 2.0), dS = moereg_test::random_normal(r, T * E);
  const vec init = moereg_test::random_normal(r, T * E);
  const vec ref = moereg_ref::sigmoid_norm_backward(Z, dS, T, E);
  const double gs = -0.75;
  vec want = init;
  for (std::size_t i = 0; i < want.size(); ++i) want[i] += gs * ref[i];
  CHECK(moereg_test::rel_diff(run_sigmoid<double>(Z, dS, T, E, {gs, true}, init, true), want) < 1e-12);
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = gs * ref[i];
  CHECK(moereg_test::rel_diff(run_sigmoid<double>(Z, dS, T, E, {gs, false}, init), want) < 1e-12);
  // grad_scores and grad_logits the same buffer (overwrite mode)
  vec buf = dS;
  moereg::sigmoid_norm_backward(moereg::routing_view<double>(Z.data(), T, E),
                                moereg::matrix_view<const double>(buf.data(), T, E),
                                moereg::matrix_view<double>(buf.data(), T, E), {gs, false});
  CHECK(moereg_test::rel_diff(buf, want) < 1e-12);
}

TEMPLATE_TEST_CASE("sigmoid_norm_backward 16-bit inputs agree with float", "[chain][half]", moereg::half,
                   moereg::bfloat16) {
  using S = TestType;
  const double tol = std::is_same<S, moereg::half>::value ? 2e-3 : 1.6e-2;
  moereg_test::rng r(604);
  const long long T = 300, E = 8;
  vec Z = moereg_test::random_normal(r, T * E, 2.0), dS = moereg_test::random_normal(r, T * E);
  for (auto& x : Z) x = static_cast<double>(static_cast<float>(static_cast<S>(x)));
  for (auto& x : dS) x = static_cast<double>(static_cast<float>(static_cast<S>(x)));
  const vec gs = run_sigmoid<S>(Z, dS, T, E), gf = run_sigmoid<float>(Z, dS, T, E);
  CHECK(moereg_test::rel_diff(gs, gf) < tol);
  CHECK(moereg_test::rel_diff(gf, moereg_ref::sigmoid_norm_backward(Z, dS, T, E)) < 1e-5);
}

TEMPLATE_TEST_CASE("chain helpers are bitwise identical for 1 and 2 threads", "[chain][determinism]", double, float) {
  using S = TestType;
  moereg_test::rng r(605);
  const long long T = 1000, E = 9;
  const vec Z = moereg_test::random_normal(r, T * E, 2.0), dS = moereg_test::random_normal(r, T * E);
  const vec a = run_sigmoid<S>(Z, dS, T, E, {}, {}, false, moereg::cpu{1});
  const vec b = run_sigmoid<S>(Z, dS, T, E, {}, {}, false, moereg::cpu{2});
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

TEST_CASE("sigmoid_norm_backward rejects bad shapes and leaves the buffer untouched", "[chain][validation]") {
  const long long T = 4, E = 3;
  const vec Z(T * E, 0.5), dS(T * E, 1.0);
  vec dz(T * E, std::numeric_limits<double>::quiet_NaN());
  std::vector<unsigned char> before(dz.size() * sizeof(double));
  std::memcpy(before.data(), dz.data(), before.size());
  using moereg::matrix_view;
  CHECK_THROWS_AS(moereg::sigmoid_norm_backward(moereg::routing_view<double>(Z.data(), T, E),
                                                matrix_view<const double>(dS.data(), T - 1, E),
                                                matrix_view<double>(dz.data(), T, E)),
                  moereg::error);
  CHECK_THROWS_AS(moereg::sigmoid_norm_backward(moereg::routing_view<double>(Z.data(), T, E),
                                                matrix_view<const double>(dS.data(), T, E),
                                                matrix_view<double>(dz.data(), T, E - 1)),
                  moereg::error);
  CHECK_THROWS_AS(
      moereg::sigmoid_norm_backward(moereg::routing_view<double>(nullptr, T, E),
                                    matrix_view<const double>(dS.data(), T, E), matrix_view<double>(dz.data(), T, E)),
      moereg::error);
  CHECK(std::memcmp(before.data(), dz.data(), before.size()) == 0);
}

TEST_CASE("softmax_backward matches the reference and finite differences", "[chain][gradcheck]") {
  moereg_test::rng r(606);
  const long long T = 7, E = 5;
  const vec Z = moereg_test::random_normal(r, T * E, 2.0), w = moereg_test::random_normal(r, T * E);
  const vec P = softmax(Z, T, E);
  vec dz(T * E);
  moereg::softmax_backward(moereg::routing_view<double>(P.data(), T, E),
                           moereg::matrix_view<const double>(w.data(), T, E),
                           moereg::matrix_view<double>(dz.data(), T, E));
  CHECK(moereg_test::rel_diff(dz, moereg_ref::softmax_backward(P, w, T, E)) < 1e-12);
  auto f = [&](const double* z) {
    const vec p = softmax(vec(z, z + T * E), T, E);
    double s = 0;
    for (std::size_t i = 0; i < p.size(); ++i) s += w[i] * p[i];
    return s;
  };
  const auto rep = moereg::testing::gradcheck(f, Z, dz);
  INFO(rep.summary());
  CHECK(rep.ok);
  CHECK(moereg_test::max_abs(dz) > 1e-3);
}
