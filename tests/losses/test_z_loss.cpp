// Router z-loss (LOSSES.md section 2).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/z_loss.hpp>
#include <moereg/testing/gradcheck.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

using moereg::index_t;
using namespace moereg_test;

namespace {
moereg::z_loss_inputs<double> zin(const std::vector<double>& Z, const std::vector<std::uint8_t>& m, long long T,
                                  long long E) {
  return {{Z.data(), T, E}, m.empty() ? moereg::mask_view{} : moereg::mask_view(m.data(), T)};
}
}  // namespace

TEST_CASE("z-loss agrees with the naive reference and finite differences", "[z_loss]") {
  for (const auto& shape : {std::pair<long long, long long>{1, 1}, {9, 4}, {40, 17}, {513, 8}}) {
    // Plain variables, not structured bindings: C++17 lambdas cannot capture bindings (clang
    // refuses it; only C++20 allows it).
    const long long T = shape.first, E = shape.second;
    rng r(static_cast<std::uint64_t>(T + 100 * E));
    const auto Z = random_normal(r, static_cast<std::size_t>(T * E), 3.0);
    const auto m = random_mask(r, T);
    const moereg::z_loss loss{{0.5}};
    std::vector<double> g;
    const double v = checked_matrix_into(g, loss, zin(Z, m, T, E), T, E);
    const auto ref = moereg_ref::z_loss(Z, to_int_mask(m), T, E, 0.5);
    CHECK(v == Approx(ref.value).epsilon(1e-12));
    CHECK(rel_diff(g, ref.grad) < 1e-12);
    if (T * E <= 700) {
      auto f = [&](const double* z) {
        return loss.value(moereg::z_loss_inputs<double>{{z, T, E}, zin(Z, m, T, E).mask});
      };
      const auto rep = moereg::testing::gradcheck(f, Z, g);
      INFO(rep.summary());
      CHECK(rep.ok);
    }
  }
}

TEMPLATE_TEST_CASE("z-loss stays finite for logits of magnitude 1e4", "[z_loss][edge]", float, double,
                   moereg::bfloat16) {
  const long long T = 4, E = 3;
  const double vals[T * E] = {1e4, -1e4, 0, -1e4, -1e4, -1e4, 1e4, 1e4, 1e4, 3, -1e4, 1e4};
  std::vector<TestType> Z(T * E);
  for (int i = 0; i < T * E; ++i) Z[i] = static_cast<TestType>(static_cast<float>(vals[i]));
  const moereg::z_loss loss{{1.0}};
  const auto res = checked_matrix<TestType>(loss, moereg::z_loss_inputs<TestType>{{Z.data(), T, E}}, T, E);
  const double v = res.value;
  const auto& g = res.grad;
  // Exact value from the stored logits (bfloat16 rounds 1e4 to 9984), in double.
  double expect = 0;
  for (int t = 0; t < T; ++t) {
    double mx = -1e300, sum = 0;
    for (int e = 0; e < E; ++e) mx = std::max(mx, static_cast<double>(static_cast<float>(Z[t * E + e])));
    for (int e = 0; e < E; ++e) sum += std::exp(static_cast<double>(static_cast<float>(Z[t * E + e])) - mx);
    expect += std::pow(mx + std::log(sum), 2) / T;
  }
  const double lse0 = static_cast<double>(static_cast<float>(Z[0]));
  CHECK(std::isfinite(v));
  CHECK(v == Approx(expect).epsilon(std::is_same_v<TestType, double> ? 1e-12 : 1e-6));
  for (auto x : g) CHECK(std::isfinite(static_cast<double>(static_cast<float>(x))));
  // Row 0: dL/dZ = 2/T * lse * softmax = 0.5 * lse * (1, 0, 0).
  CHECK(static_cast<double>(static_cast<float>(g[0])) == Approx(0.5 * lse0).epsilon(1e-2));
}

TEST_CASE("z-loss: statistics split, grad_scale, accumulate, padding", "[z_loss][stats]") {
  rng r(3);
  const long long T = 50, E = 6;
  const auto Z = random_normal(r, T * E, 2.0);
  const auto m = random_mask(r, T, 0.3);
  const moereg::z_loss loss{};
  std::vector<double> g_all;
  const double v_all = checked_matrix_into(g_all, loss, zin(Z, m, T, E), T, E);
  const long long cuts[4] = {0, 1, 31, 50};
  double tot = 0, v_sum = 0;
  for (int p = 0; p < 3; ++p) {
    const moereg::z_loss_inputs<double> in{{Z.data() + cuts[p] * E, cuts[p + 1] - cuts[p], E},
                                           {m.data() + cuts[p], cuts[p + 1] - cuts[p]}};
    tot += loss.local_stats(in)[0];
  }
  for (int p = 0; p < 3; ++p) {
    const long long n = cuts[p + 1] - cuts[p];
    const moereg::z_loss_inputs<double> in{{Z.data() + cuts[p] * E, n, E}, {m.data() + cuts[p], n}};
    std::vector<double> g(static_cast<std::size_t>(n * E), 1.0);
    v_sum += loss.value_and_grad(in, moereg::matrix_view<double>(g.data(), n, E), {2.0, true}, {&tot, 1});
    for (long long i = 0; i < n * E; ++i) CHECK(g[i] == Approx(1.0 + 2.0 * g_all[cuts[p] * E + i]).epsilon(1e-14));
  }
  CHECK(v_sum == Approx(v_all).epsilon(1e-13));
  for (long long t = 0; t < T; ++t)
    if (!m[t])
      for (long long e = 0; e < E; ++e) CHECK(g_all[t * E + e] == 0.0);
}

TEST_CASE("z-loss: empty, fully padded, determinism, 16-bit storage", "[z_loss][determinism]") {
  const moereg::z_loss loss{};
  CHECK(loss.value(moereg::z_loss_inputs<float>{{static_cast<const float*>(nullptr), 0, 8}}) == 0.0);
  rng r(9);
  const long long T = 2100, E = 33;
  const auto Zd = random_normal(r, T * E, 4.0);
  std::vector<std::uint8_t> none(T, 0);
  std::vector<double> g;
  CHECK(checked_matrix_into(g, loss, zin(Zd, none, T, E), T, E) == 0.0);
  for (double x : g) CHECK(x == 0.0);

  const std::vector<float> Z(Zd.begin(), Zd.end());
  const moereg::z_loss_inputs<float> in{{Z.data(), T, E}};
  const auto r1 = checked_matrix<float>(loss, in, T, E, {}, {}, moereg::cpu{1});
  const auto r2 = checked_matrix<float>(loss, in, T, E, {}, {}, moereg::cpu{2});
  const double v1 = r1.value, v2 = r2.value;
  const auto &g1 = r1.grad, &g2 = r2.grad;
  CHECK(std::memcmp(&v1, &v2, sizeof v1) == 0);
  CHECK(std::memcmp(g1.data(), g2.data(), g1.size() * sizeof(float)) == 0);

  std::vector<moereg::half> Zh(Z.size());
  for (std::size_t i = 0; i < Z.size(); ++i) Zh[i] = moereg::half(Z[i]);
  const double vh =
      checked_matrix<moereg::half>(loss, moereg::z_loss_inputs<moereg::half>{{Zh.data(), T, E}}, T, E).value;
  CHECK(vh == Approx(v1).epsilon(5e-3));
}

TEST_CASE("z-loss rejects bad input and writes nothing", "[z_loss][errors]") {
  const std::vector<double> Z(12, 0.5);
  std::vector<double> g(12, std::numeric_limits<double>::quiet_NaN());
  const moereg::z_loss loss{};
  const std::vector<std::uint8_t> m(5, 1);
  CHECK_THROWS_WITH(loss.value_and_grad(moereg::z_loss_inputs<double>{{Z.data(), 4, 3}, {m.data(), 5}},
                                        moereg::matrix_view<double>(g.data(), 4, 3)),
                    Catch::Contains("mask has 5 entries but there are T = 4"));
  CHECK_THROWS_WITH(
      loss.value_and_grad(moereg::z_loss_inputs<double>{{Z.data(), 4, 3}}, moereg::matrix_view<double>(g.data(), 3, 4)),
      Catch::Contains("grad_logits is [3, 4] but its input is [4, 3]"));
  const double two[2] = {1, 1};
  CHECK_THROWS_WITH(loss.value_and_grad(moereg::z_loss_inputs<double>{{Z.data(), 4, 3}},
                                        moereg::matrix_view<double>(g.data(), 4, 3), {}, {two, 2}),
                    Catch::Contains("reduced statistics have 2 entries"));
  for (double x : g) CHECK(std::isnan(x));
}
