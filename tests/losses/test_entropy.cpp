// Tests of the router entropy (include/moereg/losses/entropy.hpp) against the naive
// reference and finite differences.
#include <catch2/catch.hpp>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/entropy.hpp>
#include <moereg/testing/gradcheck.hpp>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

namespace {

using moereg::index_t;
using vec = std::vector<double>;
using mask_t = std::vector<std::uint8_t>;

enum class layout { row_major, padded, col_major };

/// One [T, E] input and its gradient buffer in storage type S, laid out as asked.
template <class S>
struct call1 {
  long long T, E;
  layout lay;
  std::vector<S> X, G;
  mask_t M;  // own copy: the view below points into it
  moereg::matrix_view<const S> x;
  moereg::matrix_view<S> g;
  moereg::mask_view m;

  call1(const vec& data, const mask_t& mask, long long T_, long long E_, layout l = layout::row_major)
      : T(T_), E(E_), lay(l) {
    const std::size_t n = static_cast<std::size_t>(lay == layout::padded ? T * (E + 2) : T * E);
    X.assign(n, S(-9.0f));
    G.assign(n, S(0.0f));
    for (long long t = 0; t < T; ++t)
      for (long long e = 0; e < E; ++e) X[off(t, e)] = static_cast<S>(data[static_cast<std::size_t>(t * E + e)]);
    x = view<const S>(X.data());
    g = view<S>(G.data());
    M = mask;
    if (!M.empty()) m = moereg::mask_view(M.data(), T);
  }
  call1(const call1&) = delete;  // views point into the buffers
  call1(call1&&) noexcept = default;
  std::size_t off(long long t, long long e) const {
    return static_cast<std::size_t>(lay == layout::padded      ? t * (E + 2) + e
                                    : lay == layout::col_major ? e * T + t
                                                               : t * E + e);
  }
  template <class U>
  moereg::matrix_view<U> view(U* d) const {
    if (lay == layout::padded) return moereg::matrix_view<U>(d, T, E, E + 2, 1);
    if (lay == layout::col_major) return moereg::matrix_view<U>(d, T, E, 1, T);
    return moereg::matrix_view<U>(d, T, E);
  }
  vec grad() const {
    vec out(static_cast<std::size_t>(T * E));
    for (long long t = 0; t < T; ++t)
      for (long long e = 0; e < E; ++e) out[static_cast<std::size_t>(t * E + e)] = static_cast<double>(G[off(t, e)]);
    return out;
  }
  moereg::entropy_inputs<S> in() const { return {x, m}; }
  /// value_and_grad through moereg_test::checked_grad (support/grad_buffers.hpp): NaN in every
  /// entry before the overwrite call, random values before an accumulate call, and the entries
  /// of the padded layout that map to no (t, e) must stay untouched. G holds the overwrite-mode
  /// gradient afterwards (NaN in the unmapped entries).
  template <class Loss>
  double checked(const Loss& loss, moereg::grad_options o = {}, moereg::stats_view st = {}, moereg::cpu be = {}) {
    std::vector<char> mapped(G.size(), 0);
    for (long long t = 0; t < T; ++t)
      for (long long e = 0; e < E; ++e) mapped[off(t, e)] = 1;
    moereg_test::grad_check_options chk;
    chk.mapped = &mapped;
    auto r = moereg_test::checked_grad<S>(
        G.size(), [&](S* b, moereg::grad_options go) { return loss.value_and_grad(in(), view<S>(b), go, st, be); }, o,
        chk);
    G = r.grad;
    g = view<S>(G.data());
    return r.value;
  }
};

double rel(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-300);
}

/// Softmax probabilities with a few exact zeros and values below tiny = 1e-30.
vec probs_with_zeros(moereg_test::rng& r, long long T, long long E) {
  vec p = moereg_test::random_probs(r, T, E, 2.0);
  for (auto& x : p) {
    const double u = r.uniform();
    if (u < 0.05)
      x = 0.0;
    else if (u < 0.08)
      x = 1e-40;
  }
  return p;
}

moereg_ref::result reference(const vec& P, const mask_t& mask, long long T, long long E, double eta) {
  return moereg_ref::entropy(P, moereg_test::to_int_mask(mask), T, E, eta);
}

}  // namespace

TEST_CASE("entropy matches the reference in double", "[entropy]") {
  struct shape {
    long long T, E;
    bool mask;
    layout lay;
  };
  const std::vector<shape> shapes = {{37, 6, true, layout::row_major},
                                     {300, 8, true, layout::padded},
                                     {513, 5, false, layout::col_major},
                                     {1, 3, false, layout::row_major},
                                     {20, 1, true, layout::row_major}};
  std::uint64_t seed = 121;
  for (const auto& sh : shapes) {
    moereg_test::rng r(seed++);
    const vec P = probs_with_zeros(r, sh.T, sh.E);
    const mask_t mask = sh.mask ? moereg_test::random_mask(r, sh.T) : mask_t{};
    const auto ref = reference(P, mask, sh.T, sh.E, 0.61);
    call1<double> c(P, mask, sh.T, sh.E, sh.lay);
    const moereg::entropy_loss loss{{0.61}};
    const double v = c.checked(loss);
    INFO("T " << sh.T << " E " << sh.E);
    CHECK(rel(v, ref.value) < 1e-12);
    CHECK(moereg_test::rel_diff(c.grad(), ref.grad) < 1e-12);
    CHECK(rel(loss.value(c.in()), ref.value) < 1e-12);
    if (sh.E > 1) CHECK(ref.value != 0.0);
    CHECK(moereg_test::max_abs(ref.grad) > 0.0);
  }
}

TEST_CASE("entropy gradient at and below tiny is -log(tiny)", "[entropy]") {
  const vec P = {0.0, 1e-40, 0.5, 0.5 - 1e-40};
  call1<double> c(P, {}, 1, 4);
  const double v = c.checked(moereg::entropy_loss{{1.0}});
  const vec g = c.grad();
  CHECK(g[0] == -std::log(1e-30));
  CHECK(g[1] == -std::log(1e-30));
  CHECK(g[2] == Approx(-(std::log(0.5) + 1.0)).epsilon(1e-15));
  CHECK(v == Approx(-0.5 * std::log(0.5) - (0.5 - 1e-40) * std::log(0.5) + 1e-40 * std::log(1e-30)).epsilon(1e-15));
  CHECK(std::isfinite(v));
}

TEST_CASE("entropy gradient matches finite differences", "[entropy][gradcheck]") {
  for (std::uint64_t seed : {131u, 132u}) {
    moereg_test::rng r(seed);
    const long long T = 9, E = 6;
    const vec P = moereg_test::random_probs(r, T, E);
    const mask_t mask = moereg_test::random_mask(r, T, 0.3);
    const moereg::entropy_loss loss{{1.0}};
    call1<double> c(P, mask, T, E);
    (void)c.checked(loss);
    auto f = [&](const double* x) {
      call1<double> cx(vec(x, x + T * E), mask, T, E);
      return loss.value(cx.in());
    };
    const auto rep = moereg::testing::gradcheck(f, P, c.grad());
    INFO(rep.summary());
    CHECK(rep.ok);
    CHECK(rep.checked == T * E);
    CHECK(moereg_test::max_abs(c.grad()) > 1e-3);
  }
}

TEST_CASE("entropy odd sizes: T = 0, all masked, E = 1", "[entropy]") {
  const moereg::entropy_loss loss{{1.0}};
  {
    call1<double> c({}, {}, 0, 4);
    CHECK(c.checked(loss) == 0.0);
    CHECK(loss.local_stats(c.in())[0] == 0.0);
  }
  {
    moereg_test::rng r(3);
    const vec P = moereg_test::random_probs(r, 6, 3);
    call1<double> c(P, mask_t(6, 0), 6, 3);
    std::fill(c.G.begin(), c.G.end(), 2.0);
    CHECK(loss.value_and_grad(c.in(), c.g, {1.0, true}) == 0.0);
    CHECK(moereg_test::max_abs(c.grad()) == 2.0);
    CHECK(c.checked(loss) == 0.0);
    CHECK(moereg_test::max_abs(c.grad()) == 0.0);
  }
  {  // E = 1: P = 1 gives entropy 0 and gradient -eta / T_v per valid token
    const vec P(5, 1.0);
    const mask_t mask = {1, 0, 1, 1, 0};
    call1<double> c(P, mask, 5, 1);
    CHECK(c.checked(loss) == 0.0);
    const vec want = {-1.0 / 3, 0.0, -1.0 / 3, -1.0 / 3, 0.0};
    CHECK(moereg_test::rel_diff(c.grad(), want) < 1e-15);
    CHECK(moereg_test::rel_diff(c.grad(), reference(P, mask, 5, 1, 1.0).grad) < 1e-15);
  }
}

TEMPLATE_TEST_CASE("entropy 16-bit inputs agree with float", "[entropy][half]", moereg::half, moereg::bfloat16) {
  using S = TestType;
  const double tol = std::is_same<S, moereg::half>::value ? 2e-3 : 1.6e-2;
  moereg_test::rng r(141);
  const long long T = 700, E = 6;
  vec X = probs_with_zeros(r, T, E);
  for (auto& x : X) x = static_cast<double>(static_cast<float>(static_cast<S>(x)));
  const mask_t mask = moereg_test::random_mask(r, T);
  const moereg::entropy_loss loss{{1.0}};
  call1<S> cs(X, mask, T, E, layout::padded);
  call1<float> cf(X, mask, T, E);
  const double vs = cs.checked(loss), vf = cf.checked(loss);
  CHECK(rel(vs, vf) < 1e-5);
  CHECK(moereg_test::rel_diff(cs.grad(), cf.grad()) < tol);
  const auto ref = reference(X, mask, T, E, 1.0);
  CHECK(rel(vf, ref.value) < 1e-5);
  CHECK(moereg_test::rel_diff(cf.grad(), ref.grad) < 1e-5);
}

TEST_CASE("entropy grad_scale and accumulate", "[entropy]") {
  moereg_test::rng r(151);
  const long long T = 33, E = 4;
  const vec P = probs_with_zeros(r, T, E);
  const mask_t mask = moereg_test::random_mask(r, T);
  const auto ref = reference(P, mask, T, E, 0.7);
  call1<double> c(P, mask, T, E, layout::col_major);
  for (auto& x : c.G) x = r.normal();
  const vec init = c.grad();
  const double gs = -1.75;
  const moereg::entropy_loss loss{{0.7}};
  CHECK(rel(loss.value_and_grad(c.in(), c.g, {gs, true}), ref.value) < 1e-12);
  vec want = init;
  for (std::size_t i = 0; i < want.size(); ++i) want[i] += gs * ref.grad[i];
  CHECK(moereg_test::rel_diff(c.grad(), want) < 1e-12);
  moereg_test::fill_sentinel(c.G);  // an entry backward() does not write stays NaN
  loss.backward(c.in(), c.g, {gs, false});
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = gs * ref.grad[i];
  CHECK(moereg_test::rel_diff(c.grad(), want) < 1e-12);
}

TEMPLATE_TEST_CASE("entropy is bitwise identical for 1 and 2 threads", "[entropy][determinism]", double, float) {
  using S = TestType;
  moereg_test::rng r(161);
  const long long T = 1000, E = 7;
  const vec X = probs_with_zeros(r, T, E);
  const mask_t mask = moereg_test::random_mask(r, T);
  const moereg::entropy_loss loss{{1.0}};
  call1<S> c1(X, mask, T, E), c2(X, mask, T, E);
  const double v1 = c1.checked(loss, {}, {}, moereg::cpu{1});
  const double v2 = c2.checked(loss, {}, {}, moereg::cpu{2});
  CHECK(std::memcmp(&v1, &v2, sizeof v1) == 0);
  CHECK(std::memcmp(c1.G.data(), c2.G.data(), c1.G.size() * sizeof(S)) == 0);
}

TEST_CASE("entropy statistics: three uneven parts reproduce the whole batch", "[entropy][stats]") {
  moereg_test::rng r(171);
  const long long T = 777, E = 6, cuts[] = {0, 250, 251, 777};
  const vec P = probs_with_zeros(r, T, E);
  const mask_t mask = moereg_test::random_mask(r, T);
  const moereg::entropy_loss loss{{0.9}};
  call1<double> whole(P, mask, T, E);
  const double vw = whole.checked(loss);
  const vec gw = whole.grad();
  std::vector<call1<double>> parts;
  parts.reserve(3);
  for (int i = 0; i < 3; ++i)
    parts.emplace_back(vec(P.begin() + cuts[i] * E, P.begin() + cuts[i + 1] * E),
                       mask_t(mask.begin() + cuts[i], mask.begin() + cuts[i + 1]), cuts[i + 1] - cuts[i], E);
  vec reduced(1, 0.0);
  for (auto& p : parts) reduced[0] += loss.local_stats(p.in())[0];
  CHECK(reduced == loss.local_stats(whole.in()));
  double vsum = 0;
  for (int i = 0; i < 3; ++i) {
    auto& p = parts[static_cast<std::size_t>(i)];
    vsum += p.checked(loss, {}, {reduced.data(), 1});
    const vec want(gw.begin() + cuts[i] * E, gw.begin() + cuts[i + 1] * E);
    CHECK(moereg_test::rel_diff(p.grad(), want, moereg_test::max_abs(gw)) < 1e-12);
  }
  CHECK(rel(vsum, vw) < 1e-12);
}

TEST_CASE("entropy rejects bad input and leaves the gradient untouched", "[entropy][validation]") {
  moereg_test::rng r(181);
  const long long T = 10, E = 4;
  const vec P = moereg_test::random_probs(r, T, E);
  const mask_t mask = moereg_test::random_mask(r, T);
  const moereg::entropy_loss loss{};
  call1<double> c(P, mask, T, E);
  std::fill(c.G.begin(), c.G.end(), std::numeric_limits<double>::quiet_NaN());
  std::vector<unsigned char> before(c.G.size() * sizeof(double));
  std::memcpy(before.data(), c.G.data(), before.size());
  auto bad = c.g;
  bad.rows = T + 1;
  CHECK_THROWS_AS(loss.value_and_grad(c.in(), bad), moereg::error);
  auto in = c.in();
  in.mask = moereg::mask_view(mask.data(), T + 1);
  CHECK_THROWS_AS(loss.value_and_grad(in, c.g), moereg::error);
  in = c.in();
  in.probs.cols = 0;
  CHECK_THROWS_AS(loss.value_and_grad(in, c.g), moereg::error);
  const double two[] = {3.0, 4.0}, neg[] = {-1.0};
  CHECK_THROWS_AS(loss.value_and_grad(c.in(), c.g, {}, {two, 2}), moereg::error);
  CHECK_THROWS_AS(loss.value_and_grad(c.in(), c.g, {}, {neg, 1}), moereg::error);
  CHECK_THROWS_AS((moereg::entropy_loss{{1.0, 0.0}}.value_and_grad(c.in(), c.g)), moereg::error);
  CHECK(std::memcmp(before.data(), c.G.data(), before.size()) == 0);
}
