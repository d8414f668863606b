// The CPU Gram engine (backend/cpu/gram_engine.hpp): a Gram loss described in this file alone
// (losses/gram.hpp's protocol) runs on the engine with no change to the library: against its
// naive reference and finite differences, in every path of the engine (2..8 contiguous slots,
// more slots, strided vectors), with masks and dropped slots, in float and double, split by
// reduced statistics, and bitwise independent of the thread count.
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/testing/gradcheck.hpp>

#include "support/grad_buffers.hpp"
#include "support/random.hpp"

using moereg::index_t;
using namespace moereg_test;

// A Gram loss the library does not know: the squared unnormalised overlaps of a token's valid
// vectors, L = c (1 / T_v) sum_t m_t sum_{s != r in A_t} <h_s, h_r>^2, statistics [T_v].
// With the entries of G as independent variables D[s][r] = 2 G[s][r] (s != r), so
// W = D + D^T = 4 G off the diagonal and 0 on it, and dL/dh_s = 4 c / T_v sum_{r != s} G[s][r] h_r.
namespace outside {

struct overlap_config {
  double coef = 0.25;
  double eps = 1.0;  // the Gram losses' shared checks ask every Gram loss for a positive eps
};
struct overlap_loss;
template <class T, class Layout>
struct overlap_inputs {
  using loss_type = overlap_loss;
  using grad_type = moereg::activation_view<T, Layout>;
  moereg::activation_view<const T, Layout> acts;
  moereg::topk_view topk;
  moereg::mask_view mask{};
  index_t num_experts = 0;
};
struct overlap_loss : moereg::loss_api<overlap_loss, overlap_config> {
  static constexpr const char* name = "overlap_loss";
  static constexpr const char* label = "overlap";
  template <class T, class Layout>
  index_t stats_size(const overlap_inputs<T, Layout>&) const {
    return 1;
  }
};

template <class Acc>
struct overlap_kernel {
  Acc operator()(int n, const Acc* G, Acc* W) const {
    Acc f = Acc(0);
    for (int s = 0; s < n; ++s)
      for (int r = 0; r < n; ++r) {
        const Acc g = s == r ? Acc(0) : G[s * n + r];
        f += g * g;
        if (W != nullptr) W[s * n + r] = Acc(4) * g;
      }
    return f;
  }
};

template <class T, class Layout, class F>
decltype(auto) visit_gram_kernel(const overlap_loss& loss, const overlap_inputs<T, Layout>&, double tv, F&& f) {
  return f(tv > 0 ? loss.cfg.coef / tv : 0.0, overlap_kernel<moereg::accumulator_t<T>>{});
}

}  // namespace outside

namespace {

struct reference {
  double value = 0;
  std::vector<double> grad;  // token-major [T, k, d]
};

// The naive reference in double: every pair of valid slots, dot products from scratch.
reference overlap_ref(const std::vector<double>& x, const std::vector<long long>& I, const std::vector<std::uint8_t>& m,
                      long long T, long long k, long long d, double c) {
  reference r;
  r.grad.assign(static_cast<std::size_t>(T * k * d), 0.0);
  double tv = 0;
  for (long long t = 0; t < T; ++t) tv += m[static_cast<std::size_t>(t)] != 0;
  if (tv == 0) return r;
  const auto at = [&](long long t, long long s) { return x.data() + (t * k + s) * d; };
  for (long long t = 0; t < T; ++t) {
    if (m[static_cast<std::size_t>(t)] == 0) continue;
    for (long long s = 0; s < k; ++s)
      for (long long q = 0; q < k; ++q) {
        if (s == q || I[static_cast<std::size_t>(t * k + s)] < 0 || I[static_cast<std::size_t>(t * k + q)] < 0)
          continue;
        double g = 0;
        for (long long i = 0; i < d; ++i) g += at(t, s)[i] * at(t, q)[i];
        r.value += c * g * g / tv;
        for (long long i = 0; i < d; ++i)
          r.grad[static_cast<std::size_t>((t * k + s) * d + i)] += 4 * c * g * at(t, q)[i] / tv;
      }
  }
  return r;
}

struct acts_batch {
  long long T, k, d;
  std::vector<double> x;
  std::vector<long long> I;
  std::vector<std::uint8_t> m;
  acts_batch(long long T_, long long k_, long long d_, std::uint64_t seed) : T(T_), k(k_), d(d_) {
    rng r(seed);
    x = random_normal(r, static_cast<std::size_t>(T * k * d), 0.5);
    I = random_topk(r, T, 2 * k, k, 0.2);
    m = random_mask(r, T, 0.25);
  }
  moereg::topk_view topk(long long r0 = 0, long long n = -1) const {
    return {reinterpret_cast<const std::int64_t*>(I.data() + r0 * k), n < 0 ? T : n, k};
  }
  moereg::mask_view mask() const { return {m.data(), T}; }
};

const outside::overlap_loss ov{{0.25}};

}  // namespace

TEST_CASE("Gram engine: a loss described outside the library, against its reference and finite differences",
          "[gram_engine]") {
  // k = 2..8 takes the specialised contiguous passes, k = 11 the run-time pass; d = 19 leaves a
  // tail chunk in every pack width.
  for (const auto& shape :
       {std::array<long long, 3>{0, 2, 3}, {1, 1, 4}, {9, 2, 19}, {300, 4, 19}, {40, 8, 33}, {30, 11, 7}}) {
    const long long T = shape[0], k = shape[1], d = shape[2];
    CAPTURE(T, k, d);
    const acts_batch b(T, k, d, static_cast<std::uint64_t>(97 * T + 7 * k + d));
    const outside::overlap_inputs<double, moereg::token_major> in{
        moereg::token_major_view<const double>(b.x.data(), T, k, d), b.topk(), b.mask(), 2 * k};
    std::vector<double> g;
    const double v = checked_acts_into(g, ov, in, T, k, d);
    const auto ref = overlap_ref(b.x, b.I, b.m, T, k, d, 0.25);
    CHECK(v == Approx(ref.value).epsilon(1e-12).margin(1e-300));
    CHECK(rel_diff(g, ref.grad) < 1e-12);
    CHECK(ov.value(in) == v);
    CHECK(ov.local_stats(in) == std::vector<double>{static_cast<double>(moereg::detail::count_valid(in.mask, T))});
    if (T > 0 && T * k * d <= 400) {
      const auto f = [&](const double* p) {
        return ov.value(outside::overlap_inputs<double, moereg::token_major>{
            moereg::token_major_view<const double>(p, T, k, d), in.topk, in.mask, in.num_experts});
      };
      const auto rep = moereg::testing::gradcheck(f, b.x, g);
      INFO(rep.summary());
      CHECK(rep.ok);
    }
    // float storage: the same loss, to float precision.
    const auto xf = cast<float>(b.x);
    std::vector<float> gf;
    const double vf = checked_acts_into(
        gf, ov,
        outside::overlap_inputs<float, moereg::token_major>{moereg::token_major_view<const float>(xf.data(), T, k, d),
                                                            in.topk, in.mask, in.num_experts},
        T, k, d);
    CHECK(vf == Approx(ref.value).epsilon(1e-4).margin(1e-30));
    CHECK(rel_diff(cast<double>(gf), ref.grad, 1e-4) < 1e-4);
  }
}

TEST_CASE("Gram engine: strided vectors, thread counts and reduced statistics for the outside loss", "[gram_engine]") {
  const long long T = 600, k = 5, d = 13, cut = 257;
  const acts_batch b(T, k, d, 11);
  const auto in_at = [&](const double* x, long long r0, long long n) {
    return outside::overlap_inputs<double, moereg::token_major>{
        moereg::token_major_view<const double>(x + r0 * k * d, n, k, d), b.topk(r0, n), {b.m.data() + r0, n}};
  };
  std::vector<double> g(static_cast<std::size_t>(T * k * d));
  const double v = ov.value_and_grad(in_at(b.x.data(), 0, T), moereg::token_major_view<double>(g.data(), T, k, d), {},
                                     {}, moereg::cpu{1});
  // The same data with every element 3 apart (the run-time, strided pass): the same bits.
  std::vector<double> xs(b.x.size() * 3, 0.0), gs(g.size() * 3, 0.0);
  for (std::size_t i = 0; i < b.x.size(); ++i) xs[3 * i] = b.x[i];
  const moereg::token_major strided(T, k, d, k * d * 3, d * 3, 3);
  const double vs =
      ov.value_and_grad(outside::overlap_inputs<double, moereg::token_major>{{xs.data(), strided}, b.topk(), b.mask()},
                        moereg::activation_view<double, moereg::token_major>{gs.data(), strided});
  CHECK(vs == v);
  bool same = true;
  for (std::size_t i = 0; i < g.size(); ++i) same = same && gs[3 * i] == g[i];
  CHECK(same);
  // Any thread count: the same bits.
  for (int threads : {2, 3}) {
    std::vector<double> gt(g.size());
    CHECK(ov.value_and_grad(in_at(b.x.data(), 0, T), moereg::token_major_view<double>(gt.data(), T, k, d), {}, {},
                            moereg::cpu{threads}) == v);
    CHECK(gt == g);
  }
  // Two parts with the whole batch's T_v: the parts' values sum to the whole value and each
  // part's gradient rows are the whole batch's.
  const auto part_a = in_at(b.x.data(), 0, cut);
  const auto part_b = in_at(b.x.data(), cut, T - cut);
  auto red = ov.local_stats(part_a);
  red[0] += ov.local_stats(part_b)[0];
  const moereg::stats_view rv{red.data(), 1};
  std::vector<double> gp(g.size());
  const double va = ov.value_and_grad(part_a, moereg::token_major_view<double>(gp.data(), cut, k, d), {}, rv);
  const double vb =
      ov.value_and_grad(part_b, moereg::token_major_view<double>(gp.data() + cut * k * d, T - cut, k, d), {}, rv);
  CHECK(va + vb == Approx(v).epsilon(1e-13));
  CHECK(rel_diff(gp, g) < 1e-14);
}

TEST_CASE("Gram engine: the outside loss is checked like the library's Gram losses", "[gram_engine][errors]") {
  const long long T = 4, k = 3, d = 2;
  const acts_batch b(T, k, d, 3);
  std::vector<double> g(static_cast<std::size_t>(T * k * d), -7.0);
  const auto gv = moereg::token_major_view<double>(g.data(), T, k, d);
  const outside::overlap_inputs<double, moereg::token_major> bad_shape{
      moereg::token_major_view<const double>(b.x.data(), T, k - 1, d), b.topk(), b.mask()};
  CHECK_THROWS_WITH(ov.value_and_grad(bad_shape, moereg::token_major_view<double>(g.data(), T, k - 1, d)),
                    Catch::Contains("overlap") && Catch::Contains("acts layout"));
  const outside::overlap_loss nan_coef{{std::nan("")}};
  const outside::overlap_inputs<double, moereg::token_major> in{
      moereg::token_major_view<const double>(b.x.data(), T, k, d), b.topk(), b.mask()};
  CHECK_THROWS_WITH(nan_coef.value_and_grad(in, gv), Catch::Contains("coefficient"));
  for (double e : g) CHECK(e == -7.0);
}
