// Tests of the auxiliary-loss-free bias update (include/moereg/losses/bias_update.hpp).
#include <catch2/catch.hpp>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/bias_update.hpp>
#include <moereg/losses/load_balancing.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "reference/reference.hpp"
#include "support/random.hpp"

namespace {
using vec = std::vector<double>;
}  // namespace

TEST_CASE("bias_update matches the reference", "[bias_update]") {
  moereg_test::rng r(501);
  for (long long E : {1LL, 2LL, 7LL, 64LL})
    for (bool center : {false, true}) {
      vec counts(static_cast<std::size_t>(E)), bias = moereg_test::random_normal(r, static_cast<std::size_t>(E), 0.1);
      for (auto& c : counts) c = r.uniform(0.0, 100.0);  // real-valued: no count equals the mean
      const double u = r.uniform(1e-4, 1e-2);
      const vec want = moereg_ref::bias_update(bias, counts, u, center);
      vec got = bias;
      moereg::bias_update({u, center}, counts, got);
      INFO("E " << E << " center " << center);
      CHECK(moereg_test::rel_diff(got, want, 1e-300) < 1e-12);
      if (E > 1) CHECK(moereg_test::rel_diff(got, bias) > 0.0);
      if (center) {
        double m = 0;
        for (double b : got) m += b;
        CHECK(std::abs(m / static_cast<double>(E)) < 1e-15);
      }
    }
}

TEST_CASE("bias_update signs and ties", "[bias_update]") {
  {  // counts equal to the mean leave the bias alone
    std::vector<double> b = {0.5, -0.25, 1.0, 0.0};
    const std::vector<std::int64_t> c = {2, 2, 2, 2};
    moereg::bias_update({0.1, false}, c, b);
    CHECK(b == std::vector<double>{0.5, -0.25, 1.0, 0.0});
  }
  {  // under-loaded experts go up, over-loaded down, the one at the mean stays
    std::vector<double> b(3, 0.0);
    const std::vector<int> c = {1, 3, 2};
    moereg::bias_update({0.125, false}, c, b);
    CHECK(b == std::vector<double>{0.125, -0.125, 0.0});
    moereg::bias_update({0.125, true}, std::vector<int>{5, 1, 3}, b);
    CHECK(b == std::vector<double>{0.0, 0.0, 0.0});
  }
  {  // E = 0 is a no-op
    std::vector<float> b;
    moereg::bias_update(moereg::bias_update_config{}, std::vector<double>{}, b);
    CHECK(b.empty());
  }
  CHECK(moereg::bias_update_config{}.rate == 1e-3);
  CHECK_FALSE(moereg::bias_update_config{}.center);
}

TEST_CASE("bias_update takes the reduced counts of load balancing's statistics", "[bias_update]") {
  moereg_test::rng r(502);
  const long long T = 301, E = 8, k = 2;
  const vec P = moereg_test::random_probs(r, T, E);
  const auto I = moereg_test::random_topk<std::int32_t>(r, T, E, k);
  const auto mask = moereg_test::random_mask(r, T);
  const moereg::load_balancing_inputs<double> in{{P.data(), T, E}, {I.data(), T, k}, {mask.data(), T}};
  const auto stats = moereg::load_balancing_loss{}.local_stats(in);
  REQUIRE(stats.size() == static_cast<std::size_t>(1 + E));
  const vec counts(stats.begin() + 1, stats.end());
  double total = 0;
  for (double c : counts) total += c;
  REQUIRE(std::fmod(total, static_cast<double>(E)) != 0.0);  // integer counts never equal the mean
  vec bias = moereg_test::random_normal(r, E, 0.01);
  for (bool center : {false, true}) {
    vec got = bias;
    moereg::bias_update({1e-3, center}, stats.data() + 1, E, got.data(), E);
    CHECK(moereg_test::rel_diff(got, moereg_ref::bias_update(bias, counts, 1e-3, center)) < 1e-12);
  }
}

TEMPLATE_TEST_CASE("bias_update in 16-bit and float storage", "[bias_update][half]", float, moereg::half,
                   moereg::bfloat16) {
  using B = TestType;
  moereg_test::rng r(503);
  const long long E = 16;
  vec counts(E), bias = moereg_test::random_normal(r, E, 0.5);
  for (auto& c : counts) c = static_cast<double>(r.integer(0, 1000)) + 0.5;
  for (auto& b : bias) b = static_cast<double>(static_cast<float>(static_cast<B>(b)));
  for (bool center : {false, true}) {
    std::vector<B> got(static_cast<std::size_t>(E));
    for (long long e = 0; e < E; ++e)
      got[static_cast<std::size_t>(e)] = static_cast<B>(bias[static_cast<std::size_t>(e)]);
    moereg::bias_update({0.0625, center}, counts, got);
    const vec want = moereg_ref::bias_update(bias, counts, 0.0625, center);
    const double tol = std::is_same<B, float>::value ? 1e-6 : std::is_same<B, moereg::half>::value ? 1e-3 : 8e-3;
    for (long long e = 0; e < E; ++e)
      CHECK(std::abs(static_cast<double>(static_cast<float>(got[static_cast<std::size_t>(e)])) -
                     want[static_cast<std::size_t>(e)]) <=
            tol * std::max(1.0, std::abs(want[static_cast<std::size_t>(e)])));
  }
}

TEST_CASE("bias_update rejects bad input and leaves the bias untouched", "[bias_update][validation]") {
  vec bias = {0.1, 0.2, 0.3};
  const vec before = bias;
  CHECK_THROWS_AS(moereg::bias_update({}, vec{1.0, 2.0}, bias), moereg::error);
  CHECK_THROWS_AS(moereg::bias_update({}, vec{1.0, std::numeric_limits<double>::quiet_NaN(), 2.0}, bias),
                  moereg::error);
  CHECK_THROWS_AS(moereg::bias_update({std::numeric_limits<double>::infinity()}, vec{1.0, 2.0, 3.0}, bias),
                  moereg::error);
  const double c3[] = {1.0, 2.0, 3.0};
  CHECK_THROWS_AS(moereg::bias_update({}, static_cast<const double*>(nullptr), 3, bias.data(), 3), moereg::error);
  CHECK_THROWS_AS(moereg::bias_update({}, c3, 3, static_cast<double*>(nullptr), 3), moereg::error);
  CHECK_THROWS_AS(moereg::bias_update({}, c3, -1, bias.data(), -1), moereg::error);
  CHECK(std::memcmp(bias.data(), before.data(), sizeof(double) * 3) == 0);
}
