// The public finite-difference checker must accept right gradients and reject wrong ones.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include <moereg/testing/gradcheck.hpp>

TEST_CASE("gradcheck accepts a correct gradient and reports the worst entries", "[gradcheck]") {
  auto f = [](const double* x) { return std::sin(x[0]) * x[1] + x[2] * x[2] * x[2]; };
  const std::vector<double> x{0.3, -1.2, 0.7};
  const std::vector<double> g{std::cos(0.3) * -1.2, std::sin(0.3), 3 * 0.49};
  const auto rep = moereg::testing::gradcheck(f, x, g);
  CHECK(rep.ok);
  CHECK(rep.checked == 3);
  CHECK(rep.max_abs_error < 1e-8);
  CHECK(rep.worst.size() == 3);
}

TEST_CASE("gradcheck rejects a wrong gradient, in full and directional mode", "[gradcheck]") {
  constexpr int n = 3000;
  auto f = [](const double* x) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += 0.5 * x[i] * x[i] * (1 + i % 3);
    return s;
  };
  std::vector<double> x(n), g(n);
  for (int i = 0; i < n; ++i) x[i] = std::sin(i), g[i] = x[i] * (1 + i % 3);
  moereg::testing::gradcheck_options full;
  full.full_max = 5000;
  CHECK(moereg::testing::gradcheck(f, x, g).ok);  // directional (n > 2048)
  CHECK(moereg::testing::gradcheck(f, x, g, full).ok);
  g[1234] *= 1.01;
  const auto rep_full = moereg::testing::gradcheck(f, x, g, full);
  CHECK(!rep_full.ok);
  REQUIRE(!rep_full.worst.empty());
  CHECK(rep_full.worst.front().index == 1234);
  for (auto& gi : g) gi *= 1.001;  // every entry off by 0.1 %: directional checks see it
  CHECK(!moereg::testing::gradcheck(f, x, g).ok);
  CHECK_THROWS_AS(moereg::testing::gradcheck(f, x, std::vector<double>(3)), moereg::error);
}

TEST_CASE("gradcheck flags NaN gradients", "[gradcheck]") {
  auto f = [](const double* x) { return x[0] * x[0]; };
  CHECK(!moereg::testing::gradcheck(f, {1.0}, {std::nan("")}).ok);
}
