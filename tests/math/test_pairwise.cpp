// The per-token k x k math of math/pairwise.hpp (value F(G) and W = D + D^T, D = dF/dG),
// checked by finite differences with respect to G and to the vectors, and the CPU Gram and
// gradient passes of the Gram-based losses checked against plain loops.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/specialization.hpp>
#include <moereg/math/pairwise.hpp>
#include <moereg/testing/gradcheck.hpp>

#include "support/random.hpp"

namespace {

using moereg::index_t;

// The three token functions behind one signature: F(n, G, W).
enum class fn_kind { sp_sum, sp_mean, orth_pairwise, orth_subspace };

double token_value(fn_kind f, int n, const double* G, double eps, double* W) {
  switch (f) {
    case fn_kind::sp_sum:
      return moereg::math::specialization_token(n, G, eps, false, W);
    case fn_kind::sp_mean:
      return moereg::math::specialization_token(n, G, eps, true, W);
    case fn_kind::orth_pairwise:
      return moereg::math::orthogonality_pairwise_token(n, G, eps, W);
    default:
      return moereg::math::orthogonality_subspace_token(n, G, eps, W);
  }
}

// G = H^T H for n vectors of length d stored one after another.
std::vector<double> gram_of(const std::vector<double>& H, int n, int d) {
  std::vector<double> G(static_cast<std::size_t>(n * n));
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) {
      double s = 0;
      for (int i = 0; i < d; ++i) s += H[static_cast<std::size_t>(a * d + i)] * H[static_cast<std::size_t>(b * d + i)];
      G[static_cast<std::size_t>(a * n + b)] = s;
    }
  return G;
}

const fn_kind all_fns[] = {fn_kind::sp_sum, fn_kind::sp_mean, fn_kind::orth_pairwise, fn_kind::orth_subspace};

}  // namespace

TEST_CASE("pairwise: W is the symmetric derivative of F with respect to G", "[pairwise]") {
  moereg_test::rng r(11);
  for (fn_kind f : all_fns)
    for (int n = 1; n <= moereg::math::max_slots; ++n) {
      CAPTURE(static_cast<int>(f), n);
      const int d = n + 3;
      const auto H = moereg_test::random_normal(r, static_cast<std::size_t>(n * d));
      std::vector<double> G = gram_of(H, n, d), W(static_cast<std::size_t>(n * n), -7.0);
      const double eps = 1e-3;
      const double F = token_value(f, n, G.data(), eps, W.data());
      REQUIRE(std::isfinite(F));
      // dF = sum_ab D_ab dG_ab: a symmetric off-diagonal step moves F by W_ab, a diagonal step by W_aa / 2.
      const double h = 1e-6;
      for (int a = 0; a < n; ++a)
        for (int b = a; b < n; ++b) {
          auto Gp = G, Gm = G;
          for (auto* g : {&Gp, &Gm}) {
            const double s = g == &Gp ? h : -h;
            (*g)[static_cast<std::size_t>(a * n + b)] += s;
            if (a != b) (*g)[static_cast<std::size_t>(b * n + a)] += s;
          }
          const double num =
              (token_value(f, n, Gp.data(), eps, nullptr) - token_value(f, n, Gm.data(), eps, nullptr)) / (2 * h);
          const double ana =
              a == b ? W[static_cast<std::size_t>(a * n + a)] / 2 : W[static_cast<std::size_t>(a * n + b)];
          CAPTURE(a, b);
          REQUIRE(ana == Approx(num).epsilon(1e-6).margin(1e-8));
        }
      for (int a = 0; a < n; ++a)
        for (int b = 0; b < n; ++b)
          REQUIRE(W[static_cast<std::size_t>(a * n + b)] == W[static_cast<std::size_t>(b * n + a)]);
    }
}

TEST_CASE("pairwise: sum_r W[s][r] h_r is the gradient with respect to the vectors", "[pairwise]") {
  moereg_test::rng r(12);
  for (fn_kind f : all_fns)
    for (int n : {2, 3, 5, 8, 13}) {
      CAPTURE(static_cast<int>(f), n);
      const int d = 6;
      const auto H = moereg_test::random_normal(r, static_cast<std::size_t>(n * d));
      const double eps = 1e-4;
      auto F = [&](const double* x) {
        const std::vector<double> Hx(x, x + n * d);
        const auto G = gram_of(Hx, n, d);
        return token_value(f, n, G.data(), eps, nullptr);
      };
      const auto G = gram_of(H, n, d);
      std::vector<double> W(static_cast<std::size_t>(n * n)), grad(H.size(), 0.0);
      token_value(f, n, G.data(), eps, W.data());
      for (int s = 0; s < n; ++s)
        for (int q = 0; q < n; ++q)
          for (int i = 0; i < d; ++i)
            grad[static_cast<std::size_t>(s * d + i)] +=
                W[static_cast<std::size_t>(s * n + q)] * H[static_cast<std::size_t>(q * d + i)];
      const auto rep = moereg::testing::gradcheck(F, H, grad);
      INFO(rep.summary());
      REQUIRE(rep.ok);
    }
}

TEST_CASE("pairwise: closed forms on small cases", "[pairwise]") {
  // Two orthogonal vectors: no cosine, no projection.
  const double Go[4] = {4, 0, 0, 9};
  double W[4];
  REQUIRE(moereg::math::specialization_token(2, Go, 1e-8, false, W) == 0.0);
  REQUIRE(moereg::math::orthogonality_pairwise_token(2, Go, 1e-6, W) == 0.0);
  REQUIRE(moereg::math::orthogonality_subspace_token(2, Go, 1e-6, W) == 0.0);
  // Two parallel vectors: c = 1 for both ordered pairs.
  const double Gp[4] = {4, 6, 6, 9};
  REQUIRE(moereg::math::specialization_token(2, Gp, 1e-8, false, W) == Approx(2.0));
  REQUIRE(moereg::math::specialization_token(2, Gp, 1e-8, true, W) == Approx(1.0));
  // pairwise: a^2 q_s / (q_s + eps)^2 summed over both orders (eps negligible) = 36 * 9 / 81 + 36 * 4 / 16.
  REQUIRE(moereg::math::orthogonality_pairwise_token(2, Gp, 1e-12, W) == Approx(36.0 / 9 + 36.0 / 4));
  // subspace: projecting h_0 on span(h_1) gives back h_0 (||h_0||^2 = 4), and h_1 on span(h_0) gives 9.
  REQUIRE(moereg::math::orthogonality_subspace_token(2, Gp, 1e-12, W) == Approx(13.0));
  // Fewer than two vectors: zero value and zero W.
  const double G1[1] = {3};
  W[0] = 5;
  REQUIRE(moereg::math::specialization_token(1, G1, 1e-8, false, W) == 0.0);
  REQUIRE(W[0] == 0.0);
  REQUIRE(moereg::math::orthogonality_subspace_token(0, G1, 1e-6, nullptr) == 0.0);
}

TEST_CASE("pairwise: eps clamp of the specialization norm", "[pairwise]") {
  // h_0 = 0: c = 0 everywhere and the norm of h_0 is the constant eps (no diagonal term).
  const double G[4] = {0, 0, 0, 2};
  double W[4];
  REQUIRE(moereg::math::specialization_token(2, G, 1e-8, false, W) == 0.0);
  for (double w : W) REQUIRE(w == 0.0);
  // A vector shorter than eps: n_0 = eps, c = G01 / (eps n_1), and W[0][0] = 0.
  const double eps = 0.5;
  const double Gs[4] = {0.01, 0.05, 0.05, 1.0};  // ||h_0|| = 0.1 < eps
  const double c = 0.05 / (eps * 1.0);
  REQUIRE(moereg::math::specialization_token(2, Gs, eps, false, W) == Approx(2 * c * c));
  REQUIRE(W[0] == 0.0);
  REQUIRE(W[1] == Approx(4 * c / (eps * 1.0)));
  REQUIRE(W[3] == Approx(-4 * c * c / 1.0));
}

TEST_CASE("pairwise: lane-wise LDL^T solve and the pivot floor", "[pairwise]") {
  namespace sd = moereg::math::subspace_detail;
  moereg_test::rng r(13);
  for (int m = 1; m < moereg::math::max_slots; ++m) {
    CAPTURE(m);
    // Lane j: A_j = B_j B_j^T + I, well conditioned, a different matrix in every lane.
    std::vector<double> A(static_cast<std::size_t>(m * m * sd::lanes));
    auto at = [&](int i, int q, int j) -> double& { return A[static_cast<std::size_t>((i * m + q) * sd::lanes + j)]; };
    for (int j = 0; j < sd::lanes; ++j) {
      const auto B = moereg_test::random_normal(r, static_cast<std::size_t>(m * m));
      for (int i = 0; i < m; ++i)
        for (int q = 0; q < m; ++q) {
          double s = i == q ? 1.0 : 0.0;
          for (int p = 0; p < m; ++p)
            s += B[static_cast<std::size_t>(i * m + p)] * B[static_cast<std::size_t>(q * m + p)];
          at(i, q, j) = s;
        }
    }
    double L[sd::tri(sd::mm)][sd::lanes], rhs[sd::mm][sd::lanes], x[sd::mm][sd::lanes];
    for (int i = 0; i < m; ++i)
      for (int q = 0; q <= i; ++q)
        for (int j = 0; j < sd::lanes; ++j) L[sd::tri(i) + q][j] = at(i, q, j);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < sd::lanes; ++j) rhs[i][j] = r.normal();
    sd::ldlt_factor_lanes(m, L, 1e-300);
    sd::ldlt_solve_lanes(m, L, rhs, x);
    for (int j = 0; j < sd::lanes; ++j)
      for (int i = 0; i < m; ++i) {
        double s = 0;
        for (int q = 0; q < m; ++q) s += at(i, q, j) * x[q][j];
        REQUIRE(s == Approx(rhs[i][j]).margin(1e-10));
      }
    // Solving in place (x aliasing the right-hand side) gives the same result.
    double y[sd::mm][sd::lanes];
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < sd::lanes; ++j) y[i][j] = rhs[i][j];
    sd::ldlt_solve_lanes(m, L, y, y);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < sd::lanes; ++j) REQUIRE(y[i][j] == x[i][j]);
  }
  // Three identical vectors in float: S + eps I is singular to working precision; the clamp
  // keeps the subspace term finite and close to the exact value (each projection returns h).
  const float q = 1000.f;
  const float G[9] = {q, q, q, q, q, q, q, q, q};
  float W[9];
  const float F = moereg::math::orthogonality_subspace_token(3, G, 1e-6f, W);
  REQUIRE(std::isfinite(F));
  for (float w : W) REQUIRE(std::isfinite(w));
  REQUIRE(F == Approx(3 * q).epsilon(1e-3));
}

// ---------------------------------------------------------------------------------------------
// The CPU passes: gram_dispatch and apply_dispatch (specialised N = 2..8 and the
// run-time fallback) against plain loops, for every storage type, contiguous and strided.

namespace {

template <class T>
T to_t(double v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return static_cast<T>(static_cast<float>(v));
}
template <class T>
double to_d(T v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return static_cast<double>(static_cast<float>(v));
}

template <class T>
void check_passes(int n, index_t d, index_t stride, double tol) {
  using P = typename moereg::detail::gram_pack<T>::type;
  using Acc = moereg::accumulator_t<T>;
  CAPTURE(n, d, stride, moereg::type_name<T>());
  moereg_test::rng r(static_cast<std::uint64_t>(100 + n * 1000 + d * 7 + stride));
  const index_t len = d * stride + 5;
  std::vector<T> xs(static_cast<std::size_t>(n * len)), gs(static_cast<std::size_t>(n * len), to_t<T>(-3.0));
  for (auto& v : xs) v = to_t<T>(r.normal());
  const T* x[moereg::math::max_slots];
  T* g[moereg::math::max_slots];
  for (int a = 0; a < n; ++a) {
    x[a] = xs.data() + a * len;
    g[a] = gs.data() + a * len;
  }
  Acc G[256], Wm[256];
  if (stride == 1)
    moereg::detail::gram_dispatch<P, true>(n, x, d, 1, G, x, 0);
  else
    moereg::detail::gram_dispatch<P, false>(n, x, d, stride, G, x, 0);
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) {
      double s = 0, sa = 0;
      for (index_t i = 0; i < d; ++i) {
        const double p = to_d(x[a][i * stride]) * to_d(x[b][i * stride]);
        s += p;
        sa += std::abs(p);
      }
      REQUIRE(static_cast<double>(G[a * n + b]) == Approx(s).margin(tol * (sa + 1)));
    }
  for (int i = 0; i < n * n; ++i) Wm[i] = static_cast<Acc>(r.normal());
  for (bool accumulate : {false, true}) {
    const auto before = gs;
    if (stride == 1)
      moereg::detail::apply_dispatch<P, true, false>(n, x, g, d, 1, 1, Wm, accumulate, x, 0);
    else
      moereg::detail::apply_dispatch<P, false, false>(n, x, g, d, stride, stride, Wm, accumulate, x, 0);
    for (int s = 0; s < n; ++s)
      for (index_t j = 0; j < len; ++j) {
        const std::size_t o = static_cast<std::size_t>(s * len + j);
        if (j % stride != 0 || j / stride >= d) {
          REQUIRE(to_d(gs[o]) == to_d(before[o]));  // between and after the elements: untouched
          continue;
        }
        const index_t i = j / stride;
        double v = accumulate ? to_d(before[o]) : 0.0, va = std::abs(v);
        for (int q = 0; q < n; ++q) {
          v += static_cast<double>(Wm[s * n + q]) * to_d(x[q][i * stride]);
          va += std::abs(static_cast<double>(Wm[s * n + q]) * to_d(x[q][i * stride]));
        }
        REQUIRE(to_d(gs[o]) == Approx(v).margin(tol * (va + 1)));
      }
  }
}

}  // namespace

TEST_CASE("pairwise: CPU Gram and gradient passes against plain loops", "[pairwise]") {
  for (int n = 1; n <= moereg::math::max_slots; ++n)
    for (index_t d : {1, 15, 16, 17, 64, 100})
      for (index_t stride : {1, 3}) {
        check_passes<double>(n, d, stride, 1e-14);
        check_passes<float>(n, d, stride, 1e-6);
        check_passes<moereg::half>(n, d, stride, 2e-3);
        check_passes<moereg::bfloat16>(n, d, stride, 1e-2);
      }
}

TEST_CASE("pairwise: contiguous and strided passes agree bitwise", "[pairwise]") {
  // Contiguous 2..8 vectors take the specialised passes, strided ones the run-time pass (blocks
  // of 4 x 4 pairs): both form every pair's sum over the chunks in the same order.
  using T = float;
  using P = moereg::detail::gram_pack<T>::type;
  moereg_test::rng r(21);
  for (int n : {2, 3, 5, 7, 8, 12})
    for (index_t d : {7, 48, 70}) {
      std::vector<T> a(static_cast<std::size_t>(n * d)), b(static_cast<std::size_t>(2 * n * d));
      for (std::size_t i = 0; i < a.size(); ++i) a[i] = b[2 * i] = static_cast<T>(r.normal());
      const T *xa[16], *xb[16];
      for (int s = 0; s < n; ++s) xa[s] = a.data() + s * d, xb[s] = b.data() + 2 * s * d;
      float Ga[256], Gb[256];
      moereg::detail::gram_dispatch<P, true>(n, xa, d, 1, Ga, xa, 0);
      moereg::detail::gram_dispatch<P, false>(n, xb, d, 2, Gb, xb, 0);
      for (int i = 0; i < n * n; ++i) REQUIRE(Ga[i] == Gb[i]);
      // The gradient pass: each output sums its inputs in order, in both forms.
      float Wm[256];
      for (int i = 0; i < n * n; ++i) Wm[i] = static_cast<float>(r.normal());
      std::vector<T> ga(a.size(), 0.5f), gb(b.size(), 0.5f);
      T *pa[16], *pb[16];
      for (int s = 0; s < n; ++s) pa[s] = ga.data() + s * d, pb[s] = gb.data() + 2 * s * d;
      for (bool accumulate : {false, true}) {
        moereg::detail::apply_dispatch<P, true, false>(n, xa, pa, d, 1, 1, Wm, accumulate, xa, 0);
        moereg::detail::apply_dispatch<P, false, false>(n, xb, pb, d, 2, 2, Wm, accumulate, xb, 0);
        for (std::size_t i = 0; i < ga.size(); ++i) REQUIRE(ga[i] == gb[2 * i]);
      }
    }
}

namespace {

struct always_stream {
  static constexpr index_t stream_min_bytes = 0;
};

/// A pointer into `v` aligned to 64 bytes, plus `shift` elements.
template <class T>
T* aligned_in(std::vector<T>& v, std::size_t shift) {
  void* p = v.data();
  std::size_t space = v.size() * sizeof(T);
  REQUIRE(std::align(64, sizeof(T), p, space) != nullptr);
  return static_cast<T*>(p) + shift;
}

template <class T>
void check_stream(index_t d, std::size_t shift) {
  using Acc = moereg::accumulator_t<T>;
  CAPTURE(moereg::type_name<T>(), d, shift);
  const index_t ntok = 300, k = 6;
  const std::size_t n = static_cast<std::size_t>(ntok * k * d);
  moereg_test::rng r(static_cast<std::uint64_t>(d));
  std::vector<T> xs(n + 64), g1s(n + 64, to_t<T>(7.0)), g2s(n + 64, to_t<T>(7.0));
  T* x = aligned_in(xs, 0);
  for (std::size_t i = 0; i < n; ++i) x[i] = to_t<T>(r.normal());
  const auto I = moereg_test::random_topk<std::int64_t>(r, ntok, k + 2, k, 0.2);
  const auto mask = moereg_test::random_mask(r, ntok);
  const moereg::topk_view iv(I.data(), ntok, k);
  const moereg::mask_view mv(mask.data(), ntok);
  const moereg::activation_view<const T, moereg::token_major> xv{x, moereg::token_major(ntok, k, d)};
  const moereg::activation_view<T, moereg::token_major> gv1{aligned_in(g1s, shift), moereg::token_major(ntok, k, d)},
      gv2{aligned_in(g2s, shift), moereg::token_major(ntok, k, d)};
  auto fn = [](int nn, const Acc* G, Acc* W) { return moereg::math::specialization_token(nn, G, Acc(1e-8), false, W); };
  const double v1 = moereg::detail::gram_loss_run(moereg::cpu{2}, xv, iv, mv, &gv1, {}, 1e-2, fn);
  const double v2 = moereg::detail::gram_loss_run<always_stream>(moereg::cpu{2}, xv, iv, mv, &gv2, {}, 1e-2, fn);
  REQUIRE(v1 == v2);
  for (std::size_t i = 0; i < n; ++i) REQUIRE(to_d(gv1.data[i]) == to_d(gv2.data[i]));
  // Nothing outside the gradient was written.
  for (T* base : {gv1.data, gv2.data}) {
    std::vector<T>& all = base == gv1.data ? g1s : g2s;
    for (std::size_t i = 0; i < all.size(); ++i) {
      const T* q = all.data() + i;
      if (q < base || q >= base + n) REQUIRE(to_d(all[i]) == 7.0);
    }
  }
}

}  // namespace

TEST_CASE("pairwise: streaming (non-temporal) stores give bitwise the same gradient", "[pairwise]") {
  for (index_t d : {16, 64, 20})
    for (std::size_t shift : {0, 1}) {
      check_stream<float>(d, shift);
      check_stream<double>(d, shift);
      check_stream<moereg::half>(d, shift);
      check_stream<moereg::bfloat16>(d, shift);
    }
}
