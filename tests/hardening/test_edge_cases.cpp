// Numerical edge cases: huge logits, probabilities exactly 0 and 1, all-zero activation
// vectors, fully masked batches, k = E and E = 1. Every result is finite and matches the
// formula (the naive float64 reference of tests/reference where it applies).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <moereg/moereg.hpp>

#include "hardening/cases.hpp"
#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"

namespace {

using moereg::index_t;
using namespace moereg_hardening;

bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// |a - b| <= rtol * max(|b|_inf, floor), elementwise over the vectors.
void check_close(const std::vector<double>& got, const std::vector<double>& want, double rtol, double floor = 1e-30) {
  REQUIRE(got.size() == want.size());
  const double scale = std::max(moereg_test::max_abs(want), floor);
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i << ": got " << got[i] << ", want " << want[i]);
    CHECK(std::abs(got[i] - want[i]) <= rtol * scale);
  }
}

std::vector<long long> as_ll(const std::vector<std::int64_t>& v) {
  return std::vector<long long>(v.begin(), v.end());
}

template <class S>
void z_loss_huge_logits(double rtol_value, double rtol_grad) {
  // Rows mixing +-1e4 with ordinary values, a row of only -1e4 and one of only +1e4; the
  // 16-bit storage is rounded first and the reference sees the rounded values.
  const long long T = 5, E = 4;
  const std::vector<double> raw = {1e4, -1e4, 0.0,  3.0, -1e4, -1e4,   -1e4, -1e4, 1e4, 1e4,
                                   1e4, 1e4,  -1e4, 1e4, -5.0, 9999.0, 0.5,  -1e4, 1e4, -0.5};
  std::vector<S> z(raw.size());
  std::vector<double> zd(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) z[i] = static_cast<S>(raw[i]), zd[i] = static_cast<double>(z[i]);
  const std::vector<std::uint8_t> mask = {1, 1, 1, 1, 0};
  std::vector<S> g(raw.size());
  moereg::z_loss loss{};
  const double v = moereg_test::checked_matrix_into(
      g, loss, moereg::z_loss_inputs<S>{{z.data(), T, E}, moereg::mask_view(mask.data(), T)}, T, E);
  const auto ref = moereg_ref::z_loss(zd, std::vector<int>(mask.begin(), mask.end()), T, E, loss.cfg.coef);
  std::vector<double> gd(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) gd[i] = static_cast<double>(g[i]);
  REQUIRE(std::isfinite(v));
  REQUIRE(all_finite(gd));
  CHECK(std::abs(v - ref.value) <= rtol_value * std::abs(ref.value));
  check_close(gd, ref.grad, rtol_grad);
  CHECK(ref.value > 1e4);  // lse^2 ~ 1e8 times beta: the case is really extreme
}

}  // namespace

TEST_CASE("z-loss stays finite and exact for logits of magnitude 1e4", "[hardening][edge]") {
  SECTION("float") {
    z_loss_huge_logits<float>(1e-5, 1e-5);
  }
  SECTION("bfloat16") {
    z_loss_huge_logits<moereg::bfloat16>(1e-5, 1e-2);
  }
  SECTION("double") {
    z_loss_huge_logits<double>(1e-13, 1e-13);
  }
}

TEST_CASE("entropy with probabilities exactly 0 and 1", "[hardening][edge]") {
  const long long T = 4, E = 4;
  const std::vector<double> P = {1, 0, 0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 1, 0.25, 0.25, 0.25, 0.25};
  std::vector<double> g(P.size());
  const moereg::entropy_loss loss{};
  const double v =
      moereg_test::checked_matrix_into(g, loss, moereg::entropy_inputs<double>{{P.data(), T, E}, {}}, T, E);
  const auto ref = moereg_ref::entropy(P, {}, T, E, loss.cfg.coef);
  REQUIRE(std::isfinite(v));
  REQUIRE(all_finite(g));
  // Closed form: rows contribute 0, log 2, 0 and log 4.
  CHECK(v == Approx(loss.cfg.coef * (std::log(2.0) + std::log(4.0)) / 4).epsilon(1e-14));
  CHECK(v == Approx(ref.value).epsilon(1e-14));
  check_close(g, ref.grad, 1e-13);
  // float storage: same, at float precision
  const auto Pf = moereg_test::cast<float>(P);
  std::vector<float> gf(P.size());
  const double vf =
      moereg_test::checked_matrix_into(gf, loss, moereg::entropy_inputs<float>{{Pf.data(), T, E}, {}}, T, E);
  CHECK(vf == Approx(ref.value).epsilon(1e-6));
  check_close(moereg_test::cast<double>(gf), ref.grad, 1e-6);
}

TEST_CASE("all-zero activation vectors give finite values and gradients", "[hardening][edge]") {
  const auto c = make_case(31, 9, 6, 3, 7);
  auto H = c.H;
  // token 0: every vector zero; token 1: one zero vector; token 2: two zero vectors
  for (long long i = 0; i < c.k * c.d; ++i) H[static_cast<std::size_t>(i)] = 0;
  for (long long i = 0; i < c.d; ++i) H[static_cast<std::size_t>(c.k * c.d + i)] = 0;
  for (long long i = 0; i < 2 * c.d; ++i) H[static_cast<std::size_t>(2 * c.k * c.d + i)] = 0;
  const auto mask = moereg_test::to_int_mask(std::vector<std::uint8_t>(static_cast<std::size_t>(c.T), 1));
  const moereg::topk_view topk(c.I.data(), c.T, c.k);
  const auto layout = moereg::token_major_view<const double>(H.data(), c.T, c.k, c.d);
  std::vector<double> g(H.size());
  SECTION("specialization") {
    for (bool mean : {false, true}) {
      moereg::specialization_loss loss{};
      loss.cfg.pairs = mean ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
      const double v =
          loss.value_and_grad(moereg::specialization_inputs<double, moereg::token_major>{layout, topk, {}, c.E},
                              moereg::token_major_view<double>(g.data(), c.T, c.k, c.d));
      const auto ref =
          moereg_ref::specialization(H, as_ll(c.I), mask, c.T, c.k, c.d, loss.cfg.coef, mean, loss.cfg.eps);
      REQUIRE(std::isfinite(v));
      REQUIRE(all_finite(g));
      CHECK(v == Approx(ref.value).epsilon(1e-12));
      check_close(g, ref.grad, 1e-10);
      for (long long i = 0; i < c.k * c.d; ++i) CHECK(g[static_cast<std::size_t>(i)] == 0.0);  // token 0 has no signal
    }
  }
  SECTION("orthogonality") {
    for (auto variant : {moereg::ortho_variant::pairwise, moereg::ortho_variant::subspace}) {
      moereg::orthogonality_loss loss{};
      loss.cfg.variant = variant;
      const double v =
          loss.value_and_grad(moereg::orthogonality_inputs<double, moereg::token_major>{layout, topk, {}, c.E},
                              moereg::token_major_view<double>(g.data(), c.T, c.k, c.d));
      const auto ref =
          moereg_ref::orthogonality(H, as_ll(c.I), mask, c.T, c.k, c.d, loss.cfg.coef, false,
                                    variant == moereg::ortho_variant::pairwise ? "pairwise" : "subspace", loss.cfg.eps);
      REQUIRE(std::isfinite(v));
      REQUIRE(all_finite(g));
      CHECK(v == Approx(ref.value).epsilon(1e-10));
      check_close(g, ref.grad, 1e-9);
    }
  }
}

TEST_CASE("a fully masked batch gives 0 and an all-zero gradient for every loss", "[hardening][edge]") {
  const auto c = make_case(77, 300, 5, 2, 4);  // more than one CPU block
  const std::vector<std::uint8_t> none(static_cast<std::size_t>(c.T), 0);
  const moereg::mask_view mask(none.data(), c.T);
  const moereg::topk_view topk(c.I.data(), c.T, c.k);
  const index_t T = c.T, E = c.E;
  auto expect_zero = [](double v, const std::vector<double>& g) {
    CHECK(v == 0.0);
    CHECK(moereg_test::max_abs(g) == 0.0);
    CHECK(all_finite(g));
  };
  std::vector<double> g(c.P.size(), 5.0), g2(2 * c.P.size(), 5.0), gh(c.H.size(), 5.0);
  SECTION("load balancing, every scope") {
    for (auto scope : {moereg::lb_scope::micro, moereg::lb_scope::sequence, moereg::lb_scope::global}) {
      moereg::load_balancing_loss loss{};
      loss.cfg.scope = scope;
      if (scope == moereg::lb_scope::sequence) loss.cfg.seq_len = 100;
      expect_zero(moereg_test::checked_matrix_into(
                      g, loss, moereg::load_balancing_inputs<double>{{c.P.data(), T, E}, topk, mask}, T, E),
                  g);
    }
  }
  SECTION("z-loss") {
    expect_zero(moereg_test::checked_matrix_into(g, moereg::z_loss{},
                                                 moereg::z_loss_inputs<double>{{c.Z.data(), T, E}, mask}, T, E),
                g);
  }
  SECTION("variance, both axes") {
    for (auto axis : {moereg::variance_axis::tokens, moereg::variance_axis::experts}) {
      moereg::variance_loss loss{};
      loss.cfg.axis = axis;
      expect_zero(
          moereg_test::checked_matrix_into(g, loss, moereg::variance_inputs<double>{{c.P.data(), T, E}, mask}, T, E),
          g);
    }
  }
  SECTION("entropy") {
    expect_zero(moereg_test::checked_matrix_into(g, moereg::entropy_loss{},
                                                 moereg::entropy_inputs<double>{{c.P.data(), T, E}, mask}, T, E),
                g);
  }
  SECTION("importance") {
    expect_zero(moereg_test::checked_matrix_into(g, moereg::importance_loss{},
                                                 moereg::importance_inputs<double>{{c.P.data(), T, E}, mask}, T, E),
                g);
  }
  SECTION("coupling, every form") {
    for (auto form : {moereg::coupling_form::token, moereg::coupling_form::log, moereg::coupling_form::batch}) {
      moereg::coupling_loss loss{};
      loss.cfg.form = form;
      const moereg::routing_view<double> P[2] = {{c.P.data(), T, E}, {c.P2.data(), T, E}};
      const moereg::topk_view I[2] = {topk, {c.I2.data(), T, c.k}};
      const moereg::matrix_view<double> G[2] = {{g2.data(), T, E}, {g2.data() + T * E, T, E}};
      expect_zero(loss.value_and_grad(moereg::coupling_inputs<double>{P, I, 2, mask}, G), g2);
    }
  }
  SECTION("specialization and orthogonality") {
    const auto acts = moereg::token_major_view<const double>(c.H.data(), T, c.k, c.d);
    expect_zero(moereg::specialization_loss{}.value_and_grad(
                    moereg::specialization_inputs<double, moereg::token_major>{acts, topk, mask, E},
                    moereg::token_major_view<double>(gh.data(), T, c.k, c.d)),
                gh);
    std::fill(gh.begin(), gh.end(), 5.0);
    expect_zero(moereg::orthogonality_loss{}.value_and_grad(
                    moereg::orthogonality_inputs<double, moereg::token_major>{acts, topk, mask, E},
                    moereg::token_major_view<double>(gh.data(), T, c.k, c.d)),
                gh);
  }
}

TEST_CASE("k = E: every expert selected by every token", "[hardening][edge]") {
  const long long T = 23, E = 4, k = 4, d = 6;
  moereg_test::rng r(5);
  const auto P = moereg_test::random_probs(r, T, E);
  const auto I = moereg_test::random_topk<std::int64_t>(r, T, E, k, 0.0);  // no drops: a permutation per row
  const auto H = moereg_test::random_normal(r, static_cast<std::size_t>(T * k * d));
  const auto m8 = moereg_test::random_mask(r, T);
  const auto mask = moereg_test::to_int_mask(m8);
  std::vector<double> g(P.size());
  const moereg::load_balancing_loss lb{};
  const double v = moereg_test::checked_matrix_into(
      g, lb, moereg::load_balancing_inputs<double>{{P.data(), T, E}, {I.data(), T, k}, moereg::mask_view(m8.data(), T)},
      T, E);
  const auto ref = moereg_ref::load_balancing(P, as_ll(I), mask, T, E, k, lb.cfg.coef);
  CHECK(v == Approx(ref.value).epsilon(1e-13));
  check_close(g, ref.grad, 1e-13);
  // f_e = 1/E for every expert, so L = alpha * sum_e pbar_e = alpha (rows of P sum to 1).
  CHECK(v == Approx(lb.cfg.coef).epsilon(1e-13));

  std::vector<double> gh(H.size());
  const moereg::specialization_loss sp{};
  const double vs = sp.value_and_grad(
      moereg::specialization_inputs<double, moereg::token_major>{
          moereg::token_major_view<const double>(H.data(), T, k, d),
          {I.data(), T, k},
          moereg::mask_view(m8.data(), T),
          E},
      moereg::token_major_view<double>(gh.data(), T, k, d));
  const auto rs = moereg_ref::specialization(H, as_ll(I), mask, T, k, d, sp.cfg.coef, false, sp.cfg.eps);
  CHECK(vs == Approx(rs.value).epsilon(1e-12));
  check_close(gh, rs.grad, 1e-11);
}

TEST_CASE("E = 1: a single expert", "[hardening][edge]") {
  const long long T = 17, E = 1;
  moereg_test::rng r(8);
  const std::vector<double> P(static_cast<std::size_t>(T), 1.0);
  const auto Z = moereg_test::random_normal(r, static_cast<std::size_t>(T), 4.0);
  const std::vector<std::int64_t> I(static_cast<std::size_t>(T), 0);
  const auto m8 = moereg_test::random_mask(r, T);
  const auto mask = moereg_test::to_int_mask(m8);
  const moereg::mask_view mv(m8.data(), T);
  const double tv = static_cast<double>(moereg::detail::count_valid(mv, T));
  std::vector<double> g(static_cast<std::size_t>(T));

  SECTION("load balancing: f = 1, pbar = 1, L = alpha") {
    const moereg::load_balancing_loss loss{};
    const double v = moereg_test::checked_matrix_into(
        g, loss, moereg::load_balancing_inputs<double>{{P.data(), T, E}, {I.data(), T, 1}, mv}, T, E);
    const auto ref = moereg_ref::load_balancing(P, as_ll(I), mask, T, E, 1, loss.cfg.coef);
    CHECK(v == Approx(loss.cfg.coef).epsilon(1e-14));
    CHECK(v == Approx(ref.value).epsilon(1e-14));
    check_close(g, ref.grad, 1e-14);
  }
  SECTION("z-loss: lse = z, L = beta * mean z^2") {
    const moereg::z_loss loss{};
    const double v =
        moereg_test::checked_matrix_into(g, loss, moereg::z_loss_inputs<double>{{Z.data(), T, E}, mv}, T, E);
    double want = 0;
    for (long long t = 0; t < T; ++t)
      want += m8[static_cast<std::size_t>(t)] ? Z[static_cast<std::size_t>(t)] * Z[static_cast<std::size_t>(t)] : 0.0;
    want *= loss.cfg.coef / tv;
    CHECK(v == Approx(want).epsilon(1e-13));
    const auto ref = moereg_ref::z_loss(Z, mask, T, E, loss.cfg.coef);
    check_close(g, ref.grad, 1e-13);
  }
  SECTION("entropy: 0, with the gradient of -p log p at p = 1") {
    const moereg::entropy_loss loss{};
    const double v =
        moereg_test::checked_matrix_into(g, loss, moereg::entropy_inputs<double>{{P.data(), T, E}, mv}, T, E);
    const auto ref = moereg_ref::entropy(P, mask, T, E, loss.cfg.coef);
    CHECK(v == 0.0);
    check_close(g, ref.grad, 1e-14);
  }
  SECTION("variance: experts axis gives 0, tokens axis matches the formula") {
    const auto S = moereg_test::random_normal(r, static_cast<std::size_t>(T), 0.3);
    for (auto axis : {moereg::variance_axis::tokens, moereg::variance_axis::experts}) {
      moereg::variance_loss loss{};
      loss.cfg.axis = axis;
      const double v =
          moereg_test::checked_matrix_into(g, loss, moereg::variance_inputs<double>{{S.data(), T, E}, mv}, T, E);
      const auto ref = moereg_ref::variance(S, mask, T, E, loss.cfg.coef,
                                            axis == moereg::variance_axis::tokens ? "tokens" : "experts", false);
      if (axis == moereg::variance_axis::experts) {
        CHECK(v == 0.0);
        CHECK(moereg_test::max_abs(g) == 0.0);
      } else {
        CHECK(v < 0.0);
      }
      CHECK(v == Approx(ref.value).epsilon(1e-13));
      check_close(g, ref.grad, 1e-13, 1e-300);
    }
  }
  SECTION("importance: CV^2 of one expert is 0") {
    const moereg::importance_loss loss{};
    const double v =
        moereg_test::checked_matrix_into(g, loss, moereg::importance_inputs<double>{{P.data(), T, E}, mv}, T, E);
    const auto ref = moereg_ref::importance(P, mask, T, E, loss.cfg.coef);
    CHECK(v == 0.0);
    CHECK(v == Approx(ref.value).margin(1e-15));
    check_close(g, ref.grad, 1e-14);
  }
}
