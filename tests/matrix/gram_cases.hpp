// Optimisation-level matrix, activation side (shared by test_matrix_gram_*.cpp, one storage
// family per file so that they compile in parallel): specialization (pairs sum and mean) and
// orthogonality (pairwise and subspace), for every slot count 1..9 (the compile-time Gram
// kernels for 2..8 and the run-time one), in double, float, bfloat16 and half, in the
// token-major layout (contiguous and element-strided) and the expert-grouped layout, against the
// float64 reference. Gradient buffers start as NaN; expert-grouped rows that no slot maps to
// must keep their NaN (the library never touches them).
#pragma once

#include "matrix/matrix_support.hpp"

#include <algorithm>
#include <numeric>
#include <string>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/orthogonality.hpp>
#include <moereg/losses/specialization.hpp>

namespace moereg_matrix {

using moereg::index_t;

struct act_case {
  long long T, k, d;
  std::vector<double> H;           // [T, k, d]
  std::vector<long long> I;        // [T, k]
  std::vector<std::int64_t> ids;   // the same, for topk_view
  std::vector<std::uint8_t> mask;  // [T]
};

inline act_case make(std::uint64_t seed, long long T, long long k, long long d) {
  moereg_test::rng r(seed);
  act_case c{T,
             k,
             d,
             moereg_test::random_normal(r, static_cast<std::size_t>(T * k * d)),
             moereg_test::random_topk(r, T, k + 3, k, 0.2),
             {},
             {}};
  // A few vectors below the norm clamp, so the derivative with a constant norm is exercised.
  for (long long t = 0; t < T; t += 7)
    for (long long i = 0; i < d; ++i) c.H[static_cast<std::size_t>((t * k) * d + i)] *= 1e-9;
  c.ids.assign(c.I.begin(), c.I.end());
  c.mask = moereg_test::random_mask(r, T, 0.2);
  return c;
}

enum class which { sp_sum, sp_mean, orth_pairwise, orth_subspace };

inline const char* name(which w) {
  switch (w) {
    case which::sp_sum:
      return "specialization, pairs sum";
    case which::sp_mean:
      return "specialization, pairs mean";
    case which::orth_pairwise:
      return "orthogonality, pairwise";
    default:
      return "orthogonality, subspace";
  }
}

// The float64 reference of loss w on the (already rounded) token-major activations Hd.
inline moereg_ref::result reference(which w, const act_case& c, const std::vector<double>& Hd, double eps) {
  const std::vector<int> mk = moereg_test::to_int_mask(c.mask);
  switch (w) {
    case which::sp_sum:
    case which::sp_mean:
      return moereg_ref::specialization(Hd, c.I, mk, c.T, c.k, c.d, moereg::specialization_config{}.coef,
                                        w == which::sp_mean, eps);
    default:
      return moereg_ref::orthogonality(Hd, c.I, mk, c.T, c.k, c.d, moereg::orthogonality_config{}.coef, false,
                                       w == which::orth_pairwise ? "pairwise" : "subspace", eps);
  }
}

// Runs loss w in any layout: x and g are views of one policy type.
template <class T, class Layout>
double run(which w, const act_case& c, moereg::activation_view<const T, Layout> x, moereg::activation_view<T, Layout> g,
           double eps) {
  const moereg::topk_view I(c.ids.data(), c.T, c.k);
  const moereg::mask_view m(c.mask.data(), c.T);
  if (w == which::sp_sum || w == which::sp_mean) {
    moereg::specialization_loss sp{};
    sp.cfg.eps = eps;
    sp.cfg.pairs = w == which::sp_mean ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
    return sp.value_and_grad(moereg::specialization_inputs<T, Layout>{x, I, m}, g);
  }
  moereg::orthogonality_loss o{};
  o.cfg.eps = eps;
  o.cfg.variant = w == which::orth_pairwise ? moereg::ortho_variant::pairwise : moereg::ortho_variant::subspace;
  return o.value_and_grad(moereg::orthogonality_inputs<T, Layout>{x, I, m}, g);
}

template <class T>
void check_layouts(const act_case& c, which w) {
  const long long T_ = c.T, k = c.k, d = c.d;
  const double eps = 1e-6;
  const std::vector<T> H = to_storage<T>(c.H);
  const std::vector<double> Hd = to_double(H);
  const moereg_ref::result want = reference(w, c, Hd, eps);
  INFO(name(w));

  SECTION("token-major, contiguous") {
    using lay = moereg::token_major;
    auto g = nan_buffer<T>(H.size());
    const double v = run<T, lay>(w, c, {H.data(), lay(T_, k, d)}, {g.data(), lay(T_, k, d)}, eps);
    compare(v, g, want.value, want.grad);
  }
  SECTION("token-major, element stride 2") {
    using lay = moereg::token_major;
    std::vector<T> Hs(H.size() * 2, static_cast<T>(0.f));
    for (std::size_t i = 0; i < H.size(); ++i) Hs[2 * i] = H[i];
    auto gs = nan_buffer<T>(Hs.size());
    const lay L(T_, k, d, 2 * k * d, 2 * d, 2);
    const double v = run<T, lay>(w, c, {Hs.data(), L}, {gs.data(), L}, eps);
    std::vector<T> g(H.size());
    for (std::size_t i = 0; i < g.size(); ++i) {
      g[i] = gs[2 * i];
      REQUIRE(std::isnan(static_cast<double>(moereg::load(gs[2 * i + 1]))));  // between the elements: untouched
    }
    compare(v, g, want.value, want.grad);
  }
  SECTION("expert-grouped, rows sorted by expert, two unmapped rows") {
    // Row order: by expert id, then token; every valid slot gets a row, plus two rows no slot maps to.
    std::vector<std::pair<long long, long long>> order;  // (expert, t * k + s)
    for (long long t = 0; t < T_; ++t)
      for (long long s = 0; s < k; ++s)
        if (c.I[static_cast<std::size_t>(t * k + s)] >= 0)
          order.emplace_back(c.I[static_cast<std::size_t>(t * k + s)], t * k + s);
    std::sort(order.begin(), order.end());
    const long long rows = static_cast<long long>(order.size()) + 2;
    std::vector<std::int64_t> row_of(static_cast<std::size_t>(T_ * k), -1);
    std::vector<T> Hg(static_cast<std::size_t>(rows * d), static_cast<T>(0.f));
    for (std::size_t r = 0; r < order.size(); ++r) {
      const long long ts = order[r].second, row = static_cast<long long>(r) + (r >= order.size() / 2 ? 1 : 0);
      row_of[static_cast<std::size_t>(ts)] = row;
      for (long long i = 0; i < d; ++i)
        Hg[static_cast<std::size_t>(row * d + i)] = H[static_cast<std::size_t>(ts * d + i)];
    }
    const moereg::topk_view map(row_of.data(), T_, k);
    const moereg::expert_grouped L(map, rows, d);
    auto gg = nan_buffer<T>(Hg.size());
    const double v = run<T, moereg::expert_grouped>(w, c, {Hg.data(), L}, {gg.data(), L}, eps);
    // Back to token-major; dropped slots have no row and a zero reference gradient.
    std::vector<T> g(H.size(), static_cast<T>(0.f));
    std::vector<bool> mapped(static_cast<std::size_t>(rows), false);
    for (long long ts = 0; ts < T_ * k; ++ts) {
      const long long row = row_of[static_cast<std::size_t>(ts)];
      if (row < 0) continue;
      mapped[static_cast<std::size_t>(row)] = true;
      for (long long i = 0; i < d; ++i)
        g[static_cast<std::size_t>(ts * d + i)] = gg[static_cast<std::size_t>(row * d + i)];
    }
    for (long long row = 0; row < rows; ++row)
      if (!mapped[static_cast<std::size_t>(row)])
        for (long long i = 0; i < d; ++i)
          REQUIRE(std::isnan(static_cast<double>(moereg::load(gg[static_cast<std::size_t>(row * d + i)]))));
    compare(v, g, want.value, want.grad);
  }
}

/// Every slot count 1..9 and every loss variant, in storage type T.
template <class T>
void check_gram_losses() {
  for (long long k = 1; k <= 9; ++k) {
    const act_case c = make(static_cast<std::uint64_t>(100 + k), 40, k, k % 2 ? 33 : 16);
    for (which w : {which::sp_sum, which::sp_mean, which::orth_pairwise, which::orth_subspace}) {
      DYNAMIC_SECTION("k = " << k << ", " << name(w)) {
        check_layouts<T>(c, w);
      }
    }
  }
}

}  // namespace moereg_matrix
