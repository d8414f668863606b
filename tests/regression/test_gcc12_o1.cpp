// Regression test for the GCC 12 -O1 wrong-code bug in the Gram passes (docs/compiler-bugs.md).
// This file is always compiled at -O1 (tests/CMakeLists.txt), whatever the build type, because
// that is where GCC 12.2 dropped the stores of detail::gram_sweep: with the portable packs the
// Gram matrix of 4 or 8 valid slots was never written, and the specialization and orthogonality
// losses returned garbage (0, inf or NaN, changing from run to run). It checks the Gram pass
// itself for every vector count against plain dot products, and the losses that use it against
// the float64 reference, with the gradient buffers filled with NaN first so that an entry the
// library fails to write cannot pass.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/orthogonality.hpp>
#include <moereg/losses/specialization.hpp>

#include "reference/reference.hpp"
#include "support/random.hpp"

namespace {

using moereg::index_t;

template <class Acc>
Acc nan_v() {
  return std::numeric_limits<Acc>::quiet_NaN();
}

// Every vector count 2..16 through the dispatch the losses use (compile-time 2..8 and the
// run-time fallback), contiguous and strided, against dot products in double.
template <class T>
void check_gram_pass(index_t d, index_t stride) {
  using P = typename moereg::detail::gram_pack<T>::type;
  using Acc = typename P::acc_type;
  moereg_test::rng r(static_cast<std::uint64_t>(1000 + d * 7 + stride));
  constexpr int K = moereg::math::max_slots;
  std::vector<T> buf(static_cast<std::size_t>(K * d * stride));
  for (auto& v : buf) v = static_cast<T>(r.normal());
  const T* x[K];
  for (int s = 0; s < K; ++s) x[s] = buf.data() + s * d * stride;
  for (int n = 2; n <= K; ++n) {
    std::vector<Acc> G(static_cast<std::size_t>(n * n), nan_v<Acc>());
    if (stride == 1)
      moereg::detail::gram_dispatch<P, true>(n, x, d, stride, G.data(), x, 0);
    else
      moereg::detail::gram_dispatch<P, false>(n, x, d, stride, G.data(), x, 0);
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) {
        double want = 0, scale = 0;
        for (index_t i = 0; i < d; ++i) {
          const double xa = static_cast<double>(x[a][i * stride]), xb = static_cast<double>(x[b][i * stride]);
          want += xa * xb;
          scale += std::fabs(xa * xb);
        }
        const double got = static_cast<double>(G[static_cast<std::size_t>(a * n + b)]);
        INFO("n = " << n << ", d = " << d << ", stride = " << stride << ", G[" << a << "][" << b << "]");
        REQUIRE(std::isfinite(got));
        REQUIRE(std::fabs(got - want) <= (std::is_same_v<Acc, double> ? 1e-12 : 1e-5) * (scale + 1));
      }
  }
}

TEST_CASE("GCC 12 -O1: the Gram pass writes every entry for 2 to 16 vectors", "[regression][gram]") {
  for (index_t d : {1, 15, 16, 33, 64, 100})
    for (index_t stride : {1, 3}) {
      check_gram_pass<float>(d, stride);
      check_gram_pass<double>(d, stride);
    }
}

struct case_data {
  long long T, k, d;
  std::vector<double> H;
  std::vector<long long> I;
  std::vector<std::uint8_t> mask;
};

case_data make_case(std::uint64_t seed, long long T, long long k, long long d, bool dense) {
  moereg_test::rng r(seed);
  case_data c{T, k, d, moereg_test::random_normal(r, static_cast<std::size_t>(T * k * d)), {}, {}};
  if (dense) {  // the case: every slot valid, slots 0..k-1, no mask
    for (long long t = 0; t < T; ++t)
      for (long long s = 0; s < k; ++s) c.I.push_back(s);
  } else {
    c.I = moereg_test::random_topk(r, T, k + 3, k, 0.2);
    c.mask = moereg_test::random_mask(r, T, 0.2);
  }
  return c;
}

// value_and_grad of one Gram loss against the reference; loss_fn(in, grad_view) runs it.
template <class T, class Run, class Ref>
void check_loss(const case_data& c, Run run, Ref ref, double tol) {
  using lay = moereg::token_major;
  std::vector<T> h(c.H.size()), g(c.H.size(), static_cast<T>(nan_v<double>()));
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = static_cast<T>(c.H[i]);
  std::vector<double> hd(h.begin(), h.end());  // the reference sees the rounded inputs
  const std::vector<std::int64_t> ids(c.I.begin(), c.I.end());
  const moereg::topk_view I(ids.data(), c.T, c.k);
  const moereg::mask_view m = c.mask.empty() ? moereg::mask_view{} : moereg::mask_view(c.mask.data(), c.T);
  const double v = run(moereg::activation_view<const T, lay>{h.data(), lay(c.T, c.k, c.d)}, I, m,
                       moereg::activation_view<T, lay>{g.data(), lay(c.T, c.k, c.d)});
  const moereg_ref::result want = ref(hd, c.I, moereg_test::to_int_mask(c.mask));
  REQUIRE(std::isfinite(v));
  REQUIRE(std::fabs(v - want.value) <= tol * (std::fabs(want.value) + 1e-12));
  double gmax = 0;
  for (double x : want.grad) gmax = std::fmax(gmax, std::fabs(x));
  for (std::size_t i = 0; i < g.size(); ++i) {
    INFO("gradient entry " << i);
    REQUIRE(std::isfinite(static_cast<double>(g[i])));
    REQUIRE(std::fabs(static_cast<double>(g[i]) - want.grad[i]) <= tol * gmax + 1e-30);
  }
}

template <class T>
void check_all_losses(double tol) {
  for (long long k : {2, 3, 4, 5, 6, 8, 9})
    for (bool dense : {true, false}) {
      const case_data c = make_case(static_cast<std::uint64_t>(k * 10 + dense), 64, k, 33, dense);
      INFO("k = " << k << (dense ? ", every slot valid" : ", masks and dropped slots"));
      {
        const moereg::specialization_loss sp{};
        check_loss<T>(
            c,
            [&](auto x, moereg::topk_view I, moereg::mask_view m, auto g) {
              return sp.value_and_grad(moereg::specialization_inputs<T, moereg::token_major>{x, I, m}, g);
            },
            [&](const std::vector<double>& H, const std::vector<long long>& Iv, const std::vector<int>& mk) {
              return moereg_ref::specialization(H, Iv, mk, c.T, c.k, c.d, sp.cfg.coef, false, sp.cfg.eps);
            },
            tol);
      }
      for (auto variant : {moereg::ortho_variant::pairwise, moereg::ortho_variant::subspace}) {
        moereg::orthogonality_loss o{};
        o.cfg.variant = variant;
        check_loss<T>(
            c,
            [&](auto x, moereg::topk_view I, moereg::mask_view m, auto g) {
              return o.value_and_grad(moereg::orthogonality_inputs<T, moereg::token_major>{x, I, m}, g);
            },
            [&](const std::vector<double>& H, const std::vector<long long>& Iv, const std::vector<int>& mk) {
              return moereg_ref::orthogonality(H, Iv, mk, c.T, c.k, c.d, o.cfg.coef, false,
                                               variant == moereg::ortho_variant::pairwise ? "pairwise" : "subspace",
                                               o.cfg.eps);
            },
            tol);
      }
    }
}

TEST_CASE("GCC 12 -O1: specialization and orthogonality against the reference", "[regression][gram]") {
  SECTION("double") {
    check_all_losses<double>(1e-9);
  }
  SECTION("float") {
    check_all_losses<float>(2e-4);
  }
}

}  // namespace
