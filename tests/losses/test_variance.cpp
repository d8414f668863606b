// Tests of the variance loss (include/moereg/losses/variance.hpp): both axes, both
// reductions, against the naive reference and finite differences.
#include <catch2/catch.hpp>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/variance.hpp>
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
using moereg::variance_axis;
using moereg::variance_reduction;
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
  moereg::variance_inputs<S> in() const { return {x, m}; }
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

/// Scores after a top-k step: k of E entries of each row kept and renormalised.
vec topk_scores(moereg_test::rng& r, long long T, long long E, long long k) {
  vec p = moereg_test::random_probs(r, T, E);
  const auto I = moereg_test::random_topk<long long>(r, T, E, k, 0.0);
  vec s(p.size(), 0.0);
  for (long long t = 0; t < T; ++t) {
    double z = 0;
    for (long long j = 0; j < k; ++j) z += p[static_cast<std::size_t>(t * E + I[static_cast<std::size_t>(t * k + j)])];
    for (long long j = 0; j < k; ++j) {
      const std::size_t i = static_cast<std::size_t>(t * E + I[static_cast<std::size_t>(t * k + j)]);
      s[i] = p[i] / z;
    }
  }
  return s;
}

double rel(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-300);
}

const variance_axis axes[] = {variance_axis::tokens, variance_axis::experts};
const variance_reduction reductions[] = {variance_reduction::mean, variance_reduction::sum};

moereg_ref::result reference(const vec& S, const mask_t& mask, long long T, long long E, double gamma, variance_axis a,
                             variance_reduction red) {
  return moereg_ref::variance(S, moereg_test::to_int_mask(mask), T, E, gamma,
                              a == variance_axis::tokens ? "tokens" : "experts", red == variance_reduction::sum);
}

}  // namespace

TEST_CASE("variance matches the reference in double", "[variance]") {
  struct shape {
    long long T, E;
    bool mask, sparse;
    layout lay;
  };
  const std::vector<shape> shapes = {{37, 6, true, true, layout::row_major},
                                     {300, 8, true, false, layout::padded},
                                     {513, 5, false, true, layout::col_major},
                                     {40, 2, true, false, layout::row_major},
                                     {1, 4, false, false, layout::row_major}};
  std::uint64_t seed = 21;
  for (const auto& sh : shapes)
    for (auto a : axes)
      for (auto red : reductions) {
        moereg_test::rng r(seed++);
        const vec S = sh.sparse ? topk_scores(r, sh.T, sh.E, 2)
                                : moereg_test::random_normal(r, static_cast<std::size_t>(sh.T * sh.E));
        const mask_t mask = sh.mask ? moereg_test::random_mask(r, sh.T) : mask_t{};
        const auto ref = reference(S, mask, sh.T, sh.E, 0.43, a, red);
        call1<double> c(S, mask, sh.T, sh.E, sh.lay);
        const moereg::variance_loss loss{{0.43, a, red}};
        const double v = c.checked(loss);
        INFO("T " << sh.T << " E " << sh.E << " axis " << static_cast<int>(a) << " reduction "
                  << static_cast<int>(red));
        CHECK(rel(v, ref.value) < 1e-12);
        CHECK(moereg_test::rel_diff(c.grad(), ref.grad) < 1e-12);
        CHECK(rel(loss.value(c.in()), ref.value) < 1e-12);
        if (sh.T > 1 || a == variance_axis::experts) {
          CHECK(ref.value != 0.0);
          CHECK(moereg_test::max_abs(ref.grad) > 0.0);
        }
      }
}

TEST_CASE("variance gradients match finite differences", "[variance][gradcheck]") {
  std::uint64_t seed = 31;
  for (auto a : axes)
    for (auto red : reductions) {
      moereg_test::rng r(seed++);
      const long long T = 9, E = 5;
      const vec S = topk_scores(r, T, E, 3);
      const mask_t mask = moereg_test::random_mask(r, T, 0.3);
      const moereg::variance_loss loss{{1.0, a, red}};
      call1<double> c(S, mask, T, E);
      (void)c.checked(loss);
      auto f = [&](const double* x) {
        call1<double> cx(vec(x, x + T * E), mask, T, E);
        return loss.value(cx.in());
      };
      const auto rep = moereg::testing::gradcheck(f, S, c.grad());
      INFO(rep.summary());
      CHECK(rep.ok);
      CHECK(rep.checked == T * E);
      CHECK(moereg_test::max_abs(c.grad()) > 1e-3);
    }
}

TEST_CASE("variance odd sizes: T = 0, T = 1, all masked, E = 1", "[variance]") {
  for (auto a : axes)
    for (auto red : reductions) {
      const moereg::variance_loss loss{{1.0, a, red}};
      INFO("axis " << static_cast<int>(a) << " reduction " << static_cast<int>(red));
      {  // T = 0
        call1<double> c({}, {}, 0, 4);
        CHECK(c.checked(loss) == 0.0);
        CHECK(loss.local_stats(c.in())[0] == 0.0);
      }
      {  // all masked: 0, zeros written, accumulate leaves the buffer
        moereg_test::rng r(3);
        const vec S = moereg_test::random_normal(r, 5 * 3);
        const mask_t mask(5, 0);
        call1<double> c(S, mask, 5, 3);
        std::fill(c.G.begin(), c.G.end(), 2.0);
        CHECK(loss.value_and_grad(c.in(), c.g, {1.0, true}) == 0.0);
        CHECK(moereg_test::max_abs(c.grad()) == 2.0);
        CHECK(c.checked(loss) == 0.0);
        CHECK(moereg_test::max_abs(c.grad()) == 0.0);
      }
      for (long long T : {1LL, 14LL})
        for (long long E : {1LL, 3LL}) {  // T = 1; E = 1 (experts axis: variance of one value is 0)
          moereg_test::rng r(static_cast<std::uint64_t>(T * 10 + E));
          const vec S = moereg_test::random_normal(r, static_cast<std::size_t>(T * E));
          const mask_t mask = T > 1 ? moereg_test::random_mask(r, T) : mask_t{};
          const auto ref = reference(S, mask, T, E, 0.5, a, red);
          call1<double> c(S, mask, T, E);
          std::fill(c.G.begin(), c.G.end(), 5.0);
          const double v = c.checked(moereg::variance_loss{{0.5, a, red}});
          CHECK(std::abs(v - ref.value) <= 1e-12 * std::abs(ref.value));
          CHECK(moereg_test::rel_diff(c.grad(), ref.grad, 1.0) < 1e-12);
        }
    }
}

TEMPLATE_TEST_CASE("variance 16-bit inputs agree with float", "[variance][half]", moereg::half, moereg::bfloat16) {
  using S = TestType;
  const double tol = std::is_same<S, moereg::half>::value ? 2e-3 : 1.6e-2;
  std::uint64_t seed = 41;
  for (auto a : axes)
    for (auto red : reductions) {
      moereg_test::rng r(seed++);
      const long long T = 700, E = 6;
      vec X = topk_scores(r, T, E, 2);
      for (auto& x : X) x = static_cast<double>(static_cast<float>(static_cast<S>(x)));
      const mask_t mask = moereg_test::random_mask(r, T);
      const moereg::variance_loss loss{{1.0, a, red}};
      call1<S> cs(X, mask, T, E, layout::padded);
      call1<float> cf(X, mask, T, E);
      const double vs = cs.checked(loss), vf = cf.checked(loss);
      CHECK(rel(vs, vf) < 1e-5);
      CHECK(moereg_test::rel_diff(cs.grad(), cf.grad()) < tol);
      const auto ref = reference(X, mask, T, E, 1.0, a, red);
      CHECK(rel(vf, ref.value) < 1e-4);
      CHECK(moereg_test::rel_diff(cf.grad(), ref.grad) < 1e-4);
    }
}

TEST_CASE("variance grad_scale and accumulate", "[variance]") {
  std::uint64_t seed = 51;
  for (auto a : axes)
    for (auto red : reductions) {
      moereg_test::rng r(seed++);
      const long long T = 33, E = 4;
      const vec S = topk_scores(r, T, E, 2);
      const mask_t mask = moereg_test::random_mask(r, T);
      const auto ref = reference(S, mask, T, E, 0.7, a, red);
      call1<double> c(S, mask, T, E, layout::col_major);
      for (auto& x : c.G) x = r.normal();
      const vec init = c.grad();
      const double gs = 3.25;
      const moereg::variance_loss loss{{0.7, a, red}};
      CHECK(rel(loss.value_and_grad(c.in(), c.g, {gs, true}), ref.value) < 1e-12);
      vec want = init;
      for (std::size_t i = 0; i < want.size(); ++i) want[i] += gs * ref.grad[i];
      CHECK(moereg_test::rel_diff(c.grad(), want) < 1e-12);
      moereg_test::fill_sentinel(c.G);  // an entry backward() does not write stays NaN
      loss.backward(c.in(), c.g, {gs, false});
      for (std::size_t i = 0; i < want.size(); ++i) want[i] = gs * ref.grad[i];
      CHECK(moereg_test::rel_diff(c.grad(), want) < 1e-12);
    }
}

TEMPLATE_TEST_CASE("variance is bitwise identical for 1 and 2 threads", "[variance][determinism]", double, float) {
  using S = TestType;
  std::uint64_t seed = 61;
  for (auto a : axes)
    for (auto red : reductions) {
      moereg_test::rng r(seed++);
      const long long T = 1000, E = 7;
      const vec X = topk_scores(r, T, E, 3);
      const mask_t mask = moereg_test::random_mask(r, T);
      const moereg::variance_loss loss{{1.0, a, red}};
      call1<S> c1(X, mask, T, E), c2(X, mask, T, E);
      const double v1 = c1.checked(loss, {}, {}, moereg::cpu{1});
      const double v2 = c2.checked(loss, {}, {}, moereg::cpu{2});
      CHECK(std::memcmp(&v1, &v2, sizeof v1) == 0);
      CHECK(std::memcmp(c1.G.data(), c2.G.data(), c1.G.size() * sizeof(S)) == 0);
      const auto s1 = loss.local_stats(c1.in(), moereg::cpu{1}), s2 = loss.local_stats(c2.in(), moereg::cpu{2});
      CHECK(std::memcmp(s1.data(), s2.data(), s1.size() * sizeof(double)) == 0);
    }
}

TEST_CASE("variance statistics: three uneven parts reproduce the whole batch", "[variance][stats]") {
  std::uint64_t seed = 71;
  for (auto a : axes)
    for (auto red : reductions) {
      moereg_test::rng r(seed++);
      const long long T = 777, E = 6, cuts[] = {0, 5, 300, 777};
      const vec S = topk_scores(r, T, E, 2);
      const mask_t mask = moereg_test::random_mask(r, T);
      const moereg::variance_loss loss{{0.9, a, red}};
      call1<double> whole(S, mask, T, E);
      const double vw = whole.checked(loss);
      const vec gw = whole.grad();
      std::vector<call1<double>> parts;
      parts.reserve(3);
      for (int i = 0; i < 3; ++i) {
        const long long n = cuts[i + 1] - cuts[i];
        parts.emplace_back(vec(S.begin() + cuts[i] * E, S.begin() + cuts[i + 1] * E),
                           mask_t(mask.begin() + cuts[i], mask.begin() + cuts[i + 1]), n, E);
      }
      vec reduced(static_cast<std::size_t>(loss.stats_size(whole.in())), 0.0);
      for (auto& p : parts) {
        const auto s = loss.local_stats(p.in());
        REQUIRE(s.size() == reduced.size());
        for (std::size_t i = 0; i < s.size(); ++i) reduced[i] += s[i];
      }
      CHECK(moereg_test::rel_diff(reduced, loss.local_stats(whole.in())) < 1e-12);
      const moereg::stats_view st{reduced.data(), static_cast<index_t>(reduced.size())};
      double vsum = 0;
      for (int i = 0; i < 3; ++i) {
        auto& p = parts[static_cast<std::size_t>(i)];
        vsum += p.checked(loss, {}, st);
        const vec want(gw.begin() + cuts[i] * E, gw.begin() + cuts[i + 1] * E);
        CHECK(moereg_test::rel_diff(p.grad(), want, moereg_test::max_abs(gw)) < 1e-12);
      }
      CHECK(rel(vsum, vw) < 1e-12);
    }
}

TEST_CASE("variance rejects bad input and leaves the gradient untouched", "[variance][validation]") {
  moereg_test::rng r(81);
  const long long T = 10, E = 4;
  const vec S = topk_scores(r, T, E, 2);
  const mask_t mask = moereg_test::random_mask(r, T);
  for (auto a : axes) {
    const moereg::variance_loss loss{{1.0, a}};
    call1<double> c(S, mask, T, E);
    std::fill(c.G.begin(), c.G.end(), std::numeric_limits<double>::quiet_NaN());
    std::vector<unsigned char> before(c.G.size() * sizeof(double));
    std::memcpy(before.data(), c.G.data(), before.size());
    auto bad_grad = c.g;
    bad_grad.cols = 3;  // shape mismatch
    CHECK_THROWS_AS(loss.value_and_grad(c.in(), bad_grad), moereg::error);
    auto in = c.in();
    in.mask = moereg::mask_view(mask.data(), T - 1);  // mask length
    CHECK_THROWS_AS(loss.value_and_grad(in, c.g), moereg::error);
    in = c.in();
    in.scores = moereg::matrix_view<const double>(nullptr, T, E);  // null data
    CHECK_THROWS_AS(loss.value_and_grad(in, c.g), moereg::error);
    in.scores = moereg::matrix_view<const double>(S.data(), T, 0);  // E = 0 with T > 0
    CHECK_THROWS_AS(loss.value(in), moereg::error);
    vec st = loss.local_stats(c.in());
    vec wrong = st;
    wrong.push_back(0.0);
    CHECK_THROWS_AS(loss.value_and_grad(c.in(), c.g, {}, {wrong.data(), static_cast<index_t>(wrong.size())}),
                    moereg::error);
    wrong = st;
    wrong[0] = -1.0;  // negative T_v
    CHECK_THROWS_AS(loss.value_and_grad(c.in(), c.g, {}, {wrong.data(), static_cast<index_t>(wrong.size())}),
                    moereg::error);
    wrong = st;
    wrong.back() = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(loss.value_and_grad(c.in(), c.g, {}, {wrong.data(), static_cast<index_t>(wrong.size())}),
                    moereg::error);
    CHECK(std::memcmp(before.data(), c.G.data(), before.size()) == 0);
    // negative column sums are legal statistics (scores need not be probabilities)
    vec neg = moereg_test::random_normal(r, static_cast<std::size_t>(T * E));
    for (auto& x : neg) x = -std::abs(x);
    call1<double> cn(neg, {}, T, E);
    const vec sn = loss.local_stats(cn.in());
    CHECK_NOTHROW(cn.checked(loss, {}, {sn.data(), static_cast<index_t>(sn.size())}));
  }
}
