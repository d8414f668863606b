// A byte-level Mixture-of-Experts language model written with Eigen and moereg only, used to
// show what the specialization losses do on real text (examples/text_moe/main.cpp,
// docs/demo.md; the data is fortunes.hpp).
//
// Model (text_moe::model_config). The previous `window` bytes c_1..c_n of a byte are looked
// up in one embedding table [256, E_d], concatenated (n E_d values, oldest first) and mixed by
// a learned layer: x_0 = concat(Emb[c_1], ..., Emb[c_n]) W_mix + b_mix. Then `layers` MoE
// layers, each
//   Z = x W_r,  P = softmax(Z),  I = top-k of P (ties to the lower index),
//   S[t,e] = P[t,e] / sum_{s in A_t} P[t, I[t,s]] for selected e (0 otherwise),
//   h_{t,s} = SiLU(x_t Wg_e) * (x_t Wu_e),  o_{t,s} = h_{t,s} Wd_e   (e = I[t,s], SwiGLU),
//   x_{l+1,t} = x_{l,t} + sum_s S[t, I[t,s]] o_{t,s}                  (residual),
// and a softmax over the 256 byte values (x_L W_o + b_o) with the cross-entropy of the next
// byte. Expert rows are computed grouped by expert (one small GEMM per expert), the layout a
// grouped-GEMM trainer has, so the activation losses see moereg::expert_grouped views.
//
// Regularisers (text_moe::reg_config), each summed over layers, gradients added through the
// chain: load balancing on P; specialization (Hu et al.) on h; coupling (Hu et al.) on the P
// of all layers; orthogonality (Guo et al.) on o; variance (Guo et al.) on S; router z-loss on
// Z. Gradients with respect to P are carried to Z with moereg::softmax_backward, gradients
// with respect to S to P through the renormalisation (renorm_backward below).
//
// All gradients are analytic. The selection I is a constant (as in every MoE trainer); a
// caller may fix it (forward(..., fixed_topk)) so that a finite-difference check sees a smooth
// function.
//
// Repeatability. Eigen's vectorised reductions and products peel a different number of
// leading elements depending on the address alignment of their operands, so the same
// arithmetic on a buffer at another heap address can round differently. The parameters,
// gradients and optimiser state therefore live in buffers aligned by Eigen's allocator, and
// every parameter block starts at a multiple of 16 elements: every operand has the same
// alignment on every run, whatever else the program allocates (this is what made the earlier
// toy demo's numbers move when curves were drawn).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <moereg/chain.hpp>
#include <moereg/losses/coupling.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/orthogonality.hpp>
#include <moereg/losses/specialization.hpp>
#include <moereg/losses/variance.hpp>
#include <moereg/losses/z_loss.hpp>
#include <moereg/metrics.hpp>

#include "fortunes.hpp"

namespace text_moe {

using index_t = moereg::index_t;
template <class S>
using mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Parameter-sized buffers: aligned the same way on every run (see the header comment).
template <class S>
using buffer = std::vector<S, Eigen::aligned_allocator<S>>;

inline std::size_t uz(index_t i) {
  return static_cast<std::size_t>(i);
}

/// A row-major map of a parameter block; const S gives a read-only map.
template <class S>
using map_of = Eigen::Map<std::conditional_t<std::is_const_v<S>, const mat<std::remove_const_t<S>>, mat<S>>>;
template <class S>
using row_map_of =
    Eigen::Map<std::conditional_t<std::is_const_v<S>, const Eigen::Matrix<std::remove_const_t<S>, 1, Eigen::Dynamic>,
                                  Eigen::Matrix<S, 1, Eigen::Dynamic>>>;

// ------------------------------------------------------------------------------------------
// The model
// ------------------------------------------------------------------------------------------

struct model_config {
  index_t vocab = 256;  ///< byte values
  index_t window = 8;   ///< context bytes
  index_t embed = 16;   ///< embedding width per context byte
  index_t dim = 48, experts = 8, top_k = 2, hidden = 32, layers = 2;
};

/// Where each parameter block lies in the flat parameter (and gradient) buffer. All
/// matrices are row-major; every block starts at a multiple of `align` elements.
struct param_layout {
  static constexpr index_t align = 16;
  model_config c;
  index_t emb = 0, mix_w = 0, mix_b = 0;              ///< [V, E_d], [n E_d, D], [D]
  std::vector<index_t> router, w_gate, w_up, w_down;  ///< per layer: [D, E]; E x [D, F]; E x [D, F]; E x [F, D]
  index_t expert_stride = 0;                          ///< elements between two experts' blocks
  index_t out_w = 0, out_b = 0;                       ///< [D, V], [V]
  index_t total = 0;

  static index_t round_up(index_t n) { return (n + align - 1) / align * align; }

  explicit param_layout(const model_config& m) : c(m) {
    if (m.vocab < 1 || m.window < 1 || m.embed < 1 || m.dim < 1 || m.experts < 1 || m.top_k < 1 ||
        m.top_k > m.experts || m.hidden < 1 || m.layers < 1)
      throw std::invalid_argument("text_moe::model_config: bad sizes");
    index_t o = 0;
    auto take = [&](index_t n) {
      const index_t at = o;
      o += round_up(n);
      return at;
    };
    expert_stride = round_up(m.dim * m.hidden);
    emb = take(m.vocab * m.embed);
    mix_w = take(m.window * m.embed * m.dim);
    mix_b = take(m.dim);
    for (index_t l = 0; l < m.layers; ++l) {
      router.push_back(take(m.dim * m.experts));
      w_gate.push_back(take(m.experts * expert_stride));
      w_up.push_back(take(m.experts * expert_stride));
      w_down.push_back(take(m.experts * expert_stride));
    }
    out_w = take(m.dim * m.vocab);
    out_b = take(m.vocab);
    total = o;
  }

  // Maps of the parameter blocks in a flat buffer; read-only maps for a const buffer.
  template <class S>
  map_of<S> embedding(S* p) const {
    return {p + emb, c.vocab, c.embed};
  }
  template <class S>
  map_of<S> mix(S* p) const {
    return {p + mix_w, c.window * c.embed, c.dim};
  }
  template <class S>
  row_map_of<S> mix_bias(S* p) const {
    return {p + mix_b, c.dim};
  }
  template <class S>
  map_of<S> router_w(S* p, index_t l) const {
    return {p + router[uz(l)], c.dim, c.experts};
  }
  template <class S>
  map_of<S> gate_w(S* p, index_t l, index_t e) const {
    return {p + w_gate[uz(l)] + e * expert_stride, c.dim, c.hidden};
  }
  template <class S>
  map_of<S> up_w(S* p, index_t l, index_t e) const {
    return {p + w_up[uz(l)] + e * expert_stride, c.dim, c.hidden};
  }
  template <class S>
  map_of<S> down_w(S* p, index_t l, index_t e) const {
    return {p + w_down[uz(l)] + e * expert_stride, c.hidden, c.dim};
  }
  template <class S>
  map_of<S> output_w(S* p) const {
    return {p + out_w, c.dim, c.vocab};
  }
  template <class S>
  row_map_of<S> output_b(S* p) const {
    return {p + out_b, c.vocab};
  }
};

/// Random initial parameters: unit-variance embeddings, fan-in scaled weights (so x_0 has
/// entries of about unit variance), a small router (near-uniform routing at the start) and
/// down projections scaled by 1/sqrt(2 layers) to keep the residual stream bounded. Padding
/// between blocks stays 0.
template <class S>
buffer<S> init_params(const param_layout& pl, std::uint64_t seed) {
  buffer<S> p(uz(pl.total), S(0));
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto fill = [&](index_t off, index_t n, double sd) {
    for (index_t i = 0; i < n; ++i) p[uz(off + i)] = static_cast<S>(sd * nd(g));
  };
  const auto& c = pl.c;
  const double D = static_cast<double>(c.dim), F = static_cast<double>(c.hidden);
  fill(pl.emb, c.vocab * c.embed, 1.0);
  fill(pl.mix_w, c.window * c.embed * c.dim, 1.0 / std::sqrt(static_cast<double>(c.window * c.embed)));
  for (index_t l = 0; l < c.layers; ++l) {
    fill(pl.router[uz(l)], c.dim * c.experts, 0.1 / std::sqrt(D));
    for (index_t e = 0; e < c.experts; ++e) {
      fill(pl.w_gate[uz(l)] + e * pl.expert_stride, c.dim * c.hidden, 1.0 / std::sqrt(D));
      fill(pl.w_up[uz(l)] + e * pl.expert_stride, c.dim * c.hidden, 1.0 / std::sqrt(D));
      fill(pl.w_down[uz(l)] + e * pl.expert_stride, c.hidden * c.dim,
           1.0 / std::sqrt(F * 2.0 * static_cast<double>(c.layers)));
    }
  }
  fill(pl.out_w, c.dim * c.vocab, 1.0 / std::sqrt(D));
  return p;
}

/// Coefficients of the regularisers; 0 switches one off. The demo's non-zero values are those
/// of LOSSES.md (the papers' values) and multiples of them.
struct reg_config {
  double load_balancing = 0;  ///< alpha, LOSSES.md 1e-2
  double specialization = 0;  ///< lambda (Hu et al. R_sp), 2e-3
  double coupling = 0;        ///< lambda (Hu et al. R_cp, token form), 1e-3
  double orthogonality = 0;   ///< beta (Guo et al. L_o, pairwise, mean over tokens), 1e-4
  double variance = 0;        ///< gamma (Guo et al. L_v, tokens axis), 1e-3
  double z = 0;               ///< router z-loss beta, 1e-3
};

/// Everything one MoE layer keeps from the forward pass for its backward pass.
template <class S>
struct layer_cache {
  mat<S> x;                                ///< input [T, D]
  mat<S> logits, probs, scores;            ///< Z, P, S [T, E]
  std::vector<std::int32_t> topk;          ///< I [T, k], -1 = dropped
  std::vector<std::int32_t> row_of;        ///< [T, k] grouped row of (t, s), -1 = none
  std::vector<index_t> first;              ///< [E + 1] first grouped row of each expert
  std::vector<index_t> token_of, slot_of;  ///< [rows] token and slot of each grouped row
  mat<S> a, b, h, o;                       ///< gate and up pre-activations, h, output: [rows, F|D]

  index_t rows() const { return static_cast<index_t>(token_of.size()); }
  moereg::topk_view topk_view(index_t k) const { return {topk.data(), x.rows(), k}; }
  moereg::expert_grouped grouped(index_t k, index_t dim) const {
    return moereg::expert_grouped(moereg::topk_view(row_of.data(), x.rows(), k), rows(), dim);
  }
};

template <class S>
struct forward_cache {
  mat<S> xc;  ///< concatenated context embeddings [T, n E_d]
  std::vector<layer_cache<S>> layers;
  mat<S> x_out, logits, probs;  ///< [T, D], [T, V], [T, V]
};

/// The values of one objective evaluation (regularisers already multiplied by their coefficients).
struct loss_terms {
  double task = 0, load_balancing = 0, specialization = 0, coupling = 0, orthogonality = 0, variance = 0, z = 0;
  double reg_seconds = 0;  ///< wall time spent inside the moereg loss calls (not part of the total)
  double total() const { return task + load_balancing + specialization + coupling + orthogonality + variance + z; }
};

namespace detail {

template <class S>
S sigmoid(S v) {
  return S(1) / (S(1) + std::exp(-v));
}

template <class S>
void softmax_rows(const mat<S>& z, mat<S>& p) {
  p.resize(z.rows(), z.cols());
  for (index_t t = 0; t < z.rows(); ++t) {
    const S mx = z.row(t).maxCoeff();
    p.row(t) = (z.row(t).array() - mx).exp().matrix();
    p.row(t) /= p.row(t).sum();
  }
}

}  // namespace detail

/// The top-k experts of every row of P (ties to the lower index), int32 [T, k].
template <class S>
std::vector<std::int32_t> select_topk(const mat<S>& P, index_t k) {
  const index_t T = P.rows(), E = P.cols();
  std::vector<std::int32_t> I(uz(T * k));
  std::vector<index_t> idx(uz(E));
  for (index_t t = 0; t < T; ++t) {
    for (index_t e = 0; e < E; ++e) idx[uz(e)] = e;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](index_t a, index_t b) { return P(t, a) > P(t, b) || (P(t, a) == P(t, b) && a < b); });
    for (index_t s = 0; s < k; ++s) I[uz(t * k + s)] = static_cast<std::int32_t>(idx[uz(s)]);
  }
  return I;
}

/// Forward pass over the contexts of `b`. `fixed_topk` (one [T, k] selection per layer, -1 =
/// dropped slot) replaces the top-k choice when given.
template <class S>
forward_cache<S> forward(const param_layout& pl, const S* params, const batch& b,
                         const std::vector<std::vector<std::int32_t>>* fixed_topk = nullptr) {
  const auto& c = pl.c;
  const index_t T = b.size, D = c.dim, E = c.experts, k = c.top_k, F = c.hidden, Ed = c.embed;
  if (b.window != c.window) throw std::invalid_argument("text_moe::forward: batch window differs from the model's");
  if (fixed_topk && static_cast<index_t>(fixed_topk->size()) != c.layers)
    throw std::invalid_argument("text_moe::forward: fixed_topk needs one selection per layer");
  const S* p = params;
  forward_cache<S> fc;
  fc.xc.resize(T, c.window * Ed);
  const auto emb = pl.embedding(p);
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < c.window; ++j) fc.xc.row(t).segment(j * Ed, Ed) = emb.row(b.context[uz(t * c.window + j)]);
  mat<S> x(T, D);
  x.noalias() = fc.xc * pl.mix(p);
  x.rowwise() += pl.mix_bias(p);

  fc.layers.resize(uz(c.layers));
  for (index_t l = 0; l < c.layers; ++l) {
    auto& L = fc.layers[uz(l)];
    L.x = x;
    L.logits.resize(T, E);
    L.logits.noalias() = x * pl.router_w(p, l);
    detail::softmax_rows(L.logits, L.probs);
    if (fixed_topk) {
      L.topk = (*fixed_topk)[uz(l)];
      if (static_cast<index_t>(L.topk.size()) != T * k)
        throw std::invalid_argument("text_moe::forward: a fixed selection has the wrong size");
    } else {
      L.topk = select_topk(L.probs, k);
    }
    // Renormalised top-k scores.
    L.scores = mat<S>::Zero(T, E);
    for (index_t t = 0; t < T; ++t) {
      S m = S(0);
      for (index_t s = 0; s < k; ++s)
        if (L.topk[uz(t * k + s)] >= 0) m += L.probs(t, L.topk[uz(t * k + s)]);
      for (index_t s = 0; s < k; ++s) {
        const index_t e = L.topk[uz(t * k + s)];
        if (e >= 0) L.scores(t, e) = L.probs(t, e) / m;
      }
    }
    // Group the valid slots by expert, tokens in order inside each expert.
    L.first.assign(uz(E + 1), 0);
    for (std::int32_t e : L.topk)
      if (e >= 0) ++L.first[uz(e + 1)];
    for (index_t e = 0; e < E; ++e) L.first[uz(e + 1)] += L.first[uz(e)];
    const index_t R = L.first[uz(E)];
    L.token_of.assign(uz(R), 0);
    L.slot_of.assign(uz(R), 0);
    L.row_of.assign(uz(T * k), -1);
    std::vector<index_t> next(L.first.begin(), L.first.end() - 1);
    for (index_t t = 0; t < T; ++t)
      for (index_t s = 0; s < k; ++s) {
        const index_t e = L.topk[uz(t * k + s)];
        if (e < 0) continue;
        const index_t r = next[uz(e)]++;
        L.row_of[uz(t * k + s)] = static_cast<std::int32_t>(r);
        L.token_of[uz(r)] = t;
        L.slot_of[uz(r)] = s;
      }
    L.a.resize(R, F);
    L.b.resize(R, F);
    L.h.resize(R, F);
    L.o.resize(R, D);
    mat<S> xe;
    for (index_t e = 0; e < E; ++e) {
      const index_t r0 = L.first[uz(e)], n = L.first[uz(e + 1)] - r0;
      if (n == 0) continue;
      xe.resize(n, D);
      for (index_t i = 0; i < n; ++i) xe.row(i) = x.row(L.token_of[uz(r0 + i)]);
      L.a.middleRows(r0, n).noalias() = xe * pl.gate_w(p, l, e);
      L.b.middleRows(r0, n).noalias() = xe * pl.up_w(p, l, e);
      for (index_t i = r0; i < r0 + n; ++i)
        for (index_t f = 0; f < F; ++f) L.h(i, f) = L.a(i, f) * detail::sigmoid(L.a(i, f)) * L.b(i, f);
      L.o.middleRows(r0, n).noalias() = L.h.middleRows(r0, n) * pl.down_w(p, l, e);
    }
    mat<S> xn = x;
    for (index_t r = 0; r < R; ++r) {
      const index_t t = L.token_of[uz(r)];
      const index_t e = L.topk[uz(t * k + L.slot_of[uz(r)])];
      xn.row(t) += L.scores(t, e) * L.o.row(r);
    }
    x = std::move(xn);
  }
  fc.x_out = x;
  fc.logits.resize(T, c.vocab);
  fc.logits.noalias() = x * pl.output_w(p);
  fc.logits.rowwise() += pl.output_b(p);
  detail::softmax_rows(fc.logits, fc.probs);
  return fc;
}

/// Cross-entropy (nats) of every target of `b` under the forward pass `fc`.
template <class S>
std::vector<double> token_losses(const forward_cache<S>& fc, const batch& b) {
  std::vector<double> out(uz(b.size));
  for (index_t t = 0; t < b.size; ++t)
    out[uz(t)] = -std::log(std::max(static_cast<double>(fc.probs(t, b.target[uz(t)])), 1e-300));
  return out;
}

/// Mean cross-entropy (nats) of the targets of `b` under the forward pass `fc`.
template <class S>
double task_loss(const forward_cache<S>& fc, const batch& b) {
  double s = 0.0;
  for (double v : token_losses(fc, b)) s += v;
  return b.size > 0 ? s / static_cast<double>(b.size) : 0.0;
}

/// dP from dS for S = P / M on the selected entries (M = their sum):
/// dP_j = [j selected] (dS_j - sum_{e selected} dS_e S_e) / M. Accumulates into dP.
template <class S>
void renorm_backward(const layer_cache<S>& L, index_t k, const mat<S>& dS, mat<S>& dP) {
  for (index_t t = 0; t < L.x.rows(); ++t) {
    S m = S(0), dot = S(0);
    for (index_t s = 0; s < k; ++s) {
      const index_t e = L.topk[uz(t * k + s)];
      if (e < 0) continue;
      m += L.probs(t, e);
      dot += dS(t, e) * L.scores(t, e);
    }
    for (index_t s = 0; s < k; ++s) {
      const index_t e = L.topk[uz(t * k + s)];
      if (e >= 0) dP(t, e) += (dS(t, e) - dot) / m;
    }
  }
}

/// The objective (task cross-entropy plus the regularisers of `reg`) of the forward pass `fc`
/// and, when `grad` is not null, its gradient with respect to every parameter (overwritten,
/// the layout of param_layout). moereg's losses run on one thread (moereg::cpu{threads}).
template <class S>
loss_terms objective(const param_layout& pl, const S* params, const batch& b, const forward_cache<S>& fc,
                     const reg_config& reg, S* grad = nullptr, int threads = 1) {
  const auto& c = pl.c;
  const index_t T = b.size, D = c.dim, E = c.experts, k = c.top_k, F = c.hidden, NL = c.layers, Ed = c.embed;
  const moereg::cpu be{threads};
  loss_terms out;
  out.task = task_loss(fc, b);

  // Regularisers: values, and their gradients with respect to P, S, Z, h and o of each layer.
  std::vector<mat<S>> dP(uz(NL)), dS(uz(NL)), dZ(uz(NL)), dH(uz(NL)), dO(uz(NL));
  const bool want = grad != nullptr;
  for (index_t l = 0; l < NL; ++l) {
    const auto& L = fc.layers[uz(l)];
    const index_t R = L.rows();
    dP[uz(l)] = mat<S>::Zero(T, E);
    dS[uz(l)] = mat<S>::Zero(T, E);
    dZ[uz(l)] = mat<S>::Zero(T, E);
    dH[uz(l)] = mat<S>::Zero(R, F);
    dO[uz(l)] = mat<S>::Zero(R, D);
  }
  const auto r0 = std::chrono::steady_clock::now();
  for (index_t l = 0; l < NL; ++l) {
    const auto& L = fc.layers[uz(l)];
    const moereg::topk_view I = L.topk_view(k);
    if (reg.load_balancing != 0) {
      const moereg::load_balancing_loss lb{{reg.load_balancing}};
      const moereg::load_balancing_inputs<S> in{moereg::view(L.probs), I};
      out.load_balancing +=
          want ? lb.value_and_grad(in, moereg::view(dP[uz(l)]), moereg::on(be)) : lb.value(in, moereg::on(be));
    }
    if (reg.z != 0) {
      const moereg::z_loss zl{{reg.z}};
      const moereg::z_loss_inputs<S> in{moereg::view(L.logits)};
      out.z += want ? zl.value_and_grad(in, moereg::view(dZ[uz(l)]), moereg::on(be)) : zl.value(in, moereg::on(be));
    }
    if (reg.variance != 0) {
      const moereg::variance_loss vl{{reg.variance}};
      const moereg::variance_inputs<S> in{moereg::view(L.scores)};
      out.variance +=
          want ? vl.value_and_grad(in, moereg::view(dS[uz(l)]), moereg::on(be)) : vl.value(in, moereg::on(be));
    }
    if (reg.specialization != 0) {
      const moereg::specialization_loss sp{{reg.specialization}};
      const moereg::specialization_inputs<S, moereg::expert_grouped> in{{L.h.data(), L.grouped(k, F)}, I, {}, E};
      out.specialization += want ? sp.value_and_grad(in, {dH[uz(l)].data(), L.grouped(k, F)}, moereg::on(be))
                                 : sp.value(in, moereg::on(be));
    }
    if (reg.orthogonality != 0) {
      const moereg::orthogonality_loss ol{{reg.orthogonality}};
      const moereg::orthogonality_inputs<S, moereg::expert_grouped> in{{L.o.data(), L.grouped(k, D)}, I, {}, E};
      out.orthogonality += want ? ol.value_and_grad(in, {dO[uz(l)].data(), L.grouped(k, D)}, moereg::on(be))
                                : ol.value(in, moereg::on(be));
    }
  }
  if (reg.coupling != 0 && NL >= 2) {
    std::vector<moereg::routing_view<S>> probs;
    std::vector<moereg::topk_view> sel;
    std::vector<moereg::matrix_view<S>> g;
    for (index_t l = 0; l < NL; ++l) {
      probs.push_back(moereg::view(fc.layers[uz(l)].probs));
      sel.push_back(fc.layers[uz(l)].topk_view(k));
      g.push_back(moereg::view(dP[uz(l)]));
    }
    const moereg::coupling_loss cl{{reg.coupling}};
    const moereg::coupling_inputs<S> in{probs.data(), sel.data(), NL};
    out.coupling = want ? cl.value_and_grad(in, g.data(), {1.0, /*accumulate=*/true}, {}, be) : cl.value(in, {}, be);
  }
  out.reg_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
  if (!want) return out;

  // Backward through the network.
  const S* p = params;
  std::fill(grad, grad + pl.total, S(0));
  const S invT = S(1) / static_cast<S>(T);
  mat<S> dlog = fc.probs;
  for (index_t t = 0; t < T; ++t) dlog(t, b.target[uz(t)]) -= S(1);
  dlog *= invT;
  pl.output_w(grad).noalias() = fc.x_out.transpose() * dlog;
  pl.output_b(grad) = dlog.colwise().sum();
  mat<S> dx(T, D);
  dx.noalias() = dlog * pl.output_w(p).transpose();

  mat<S> xe, dxe, dA, dB, dHe;
  for (index_t l = NL - 1; l >= 0; --l) {
    const auto& L = fc.layers[uz(l)];
    const index_t R = L.rows();
    mat<S>& dOl = dO[uz(l)];
    mat<S>& dSl = dS[uz(l)];
    // x_{l+1} = x_l + sum_s S[t, e] o_{t,s}
    for (index_t r = 0; r < R; ++r) {
      const index_t t = L.token_of[uz(r)];
      const index_t e = L.topk[uz(t * k + L.slot_of[uz(r)])];
      dSl(t, e) += dx.row(t).dot(L.o.row(r));
      dOl.row(r) += L.scores(t, e) * dx.row(t);
    }
    mat<S>& dPl = dP[uz(l)];
    renorm_backward(L, k, dSl, dPl);
    moereg::softmax_backward<S>(moereg::view(L.probs), moereg::view(dPl), moereg::view(dZ[uz(l)]),
                                {1.0, /*accumulate=*/true}, be);
    pl.router_w(grad, l).noalias() = L.x.transpose() * dZ[uz(l)];
    mat<S> dxin = dx;
    dxin.noalias() += dZ[uz(l)] * pl.router_w(p, l).transpose();
    for (index_t e = 0; e < E; ++e) {
      const index_t q0 = L.first[uz(e)], n = L.first[uz(e + 1)] - q0;
      if (n == 0) continue;
      xe.resize(n, D);
      for (index_t i = 0; i < n; ++i) xe.row(i) = L.x.row(L.token_of[uz(q0 + i)]);
      pl.down_w(grad, l, e).noalias() = L.h.middleRows(q0, n).transpose() * dOl.middleRows(q0, n);
      dHe = dH[uz(l)].middleRows(q0, n);
      dHe.noalias() += dOl.middleRows(q0, n) * pl.down_w(p, l, e).transpose();
      dA.resize(n, F);
      dB.resize(n, F);
      for (index_t i = 0; i < n; ++i)
        for (index_t f = 0; f < F; ++f) {
          const S av = L.a(q0 + i, f), sg = detail::sigmoid(av);
          dA(i, f) = dHe(i, f) * L.b(q0 + i, f) * sg * (S(1) + av * (S(1) - sg));
          dB(i, f) = dHe(i, f) * av * sg;
        }
      pl.gate_w(grad, l, e).noalias() = xe.transpose() * dA;
      pl.up_w(grad, l, e).noalias() = xe.transpose() * dB;
      dxe.resize(n, D);
      dxe.noalias() = dA * pl.gate_w(p, l, e).transpose();
      dxe.noalias() += dB * pl.up_w(p, l, e).transpose();
      for (index_t i = 0; i < n; ++i) dxin.row(L.token_of[uz(q0 + i)]) += dxe.row(i);
    }
    dx = std::move(dxin);
  }
  // x_0 = xc W_mix + b_mix, xc = the concatenated embeddings of the context bytes.
  pl.mix(grad).noalias() = fc.xc.transpose() * dx;
  pl.mix_bias(grad) = dx.colwise().sum();
  mat<S> dxc(T, c.window * Ed);
  dxc.noalias() = dx * pl.mix(p).transpose();
  auto demb = pl.embedding(grad);
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < c.window; ++j) demb.row(b.context[uz(t * c.window + j)]) += dxc.row(t).segment(j * Ed, Ed);
  return out;
}

// ------------------------------------------------------------------------------------------
// Training and measurement
// ------------------------------------------------------------------------------------------

struct train_config {
  index_t steps = 1200;
  index_t batch = 256;
  double lr = 3e-3;
  index_t warmup = 30;  ///< linear warm-up steps, then cosine decay to lr_final * lr
  double lr_final = 0.1;
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  index_t eval_every = 0;  ///< > 0: record the held-out loss every so many steps (curves)
  std::uint64_t seed = 1;  ///< model initialisation and the stream of training samples
};

/// Mutual information (nats) of a joint table of counts [rows, cols].
inline double mutual_information(const std::vector<double>& counts, index_t rows, index_t cols) {
  double total = 0;
  std::vector<double> r(uz(rows), 0.0), c(uz(cols), 0.0);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      const double v = counts[uz(i * cols + j)];
      r[uz(i)] += v;
      c[uz(j)] += v;
      total += v;
    }
  if (total <= 0) return 0.0;
  double mi = 0;
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      const double v = counts[uz(i * cols + j)];
      if (v > 0) mi += v / total * std::log(v * total / (r[uz(i)] * c[uz(j)]));
    }
  return mi;
}

/// The most frequent `n` successors of every expert at layer l (a row of the [E, E] table of
/// counts of co-routed pairs, as moereg::measure_pathways returns it), ties to the lower index.
inline std::vector<std::vector<index_t>> successors(const moereg::pathway_metrics& pw, index_t n) {
  std::vector<std::vector<index_t>> out(uz(pw.experts_from));
  for (index_t e = 0; e < pw.experts_from; ++e) {
    std::vector<index_t> idx(uz(pw.experts_to));
    for (index_t j = 0; j < pw.experts_to; ++j) idx[uz(j)] = j;
    const double* row = pw.counts.data() + e * pw.experts_to;
    std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return row[a] > row[b]; });
    idx.resize(uz(std::min(n, pw.experts_to)));
    out[uz(e)] = idx;
  }
  return out;
}

/// Share of the valid layer-(l+1) slots of token t whose expert is among the successors of
/// the token's layer-l experts; `shift` pairs token t's layer-l experts with token
/// (t + shift) mod T's layer-(l+1) experts (shift > 0 measures the chance level).
inline double prefetch_hit_rate(const moereg::topk_view& from, const moereg::topk_view& to,
                                const std::vector<std::vector<index_t>>& succ, index_t experts, index_t shift = 0) {
  const index_t T = from.rows;
  double hits = 0, total = 0;
  std::vector<char> in(uz(experts));
  for (index_t t = 0; t < T; ++t) {
    std::fill(in.begin(), in.end(), char(0));
    for (index_t s = 0; s < from.k; ++s)
      if (from(t, s) >= 0)
        for (index_t nu : succ[uz(from(t, s))]) in[uz(nu)] = 1;
    const index_t u = (t + shift) % T;
    for (index_t r = 0; r < to.k; ++r)
      if (to(u, r) >= 0) {
        total += 1;
        hits += in[uz(to(u, r))] ? 1 : 0;
      }
  }
  return total > 0 ? hits / total : 0.0;
}

/// What a trained model shows on the held-out set. Per-layer vectors have one entry per MoE
/// layer, per-pair vectors one per adjacent layer pair; the scalars are their means.
struct evaluation {
  double bits_per_byte = 0;                ///< mean over the (stratified) held-out bytes
  std::vector<double> bits_per_byte_lang;  ///< per language
  double accuracy = 0;                     ///< top-1 next-byte accuracy
  double maxvio = 0, cv = 0, entropy = 0, topk_mass = 0;
  double overlap_h = 0, cos2_h = 0;  ///< co-selected SwiGLU intermediates h (R_sp's space)
  double overlap_o = 0, cos2_o = 0;  ///< co-selected expert outputs o (L_o's space)
  std::vector<double> lang_mi;       ///< per layer: MI(language; selected expert), nats
  std::vector<double>
      majority_share;  ///< per layer: mean over experts of the share of its tokens in its majority language
  std::vector<std::vector<double>>
      expert_share;  ///< [layer][expert]: share of the expert's tokens in its majority language (0 if unused)
  std::vector<std::vector<int>>
      expert_language;  ///< [layer][expert]: that majority language (index into languages(); -1 if unused)
  double lang_mi_mean = 0, majority_mean = 0;
  std::vector<double> pathway_pair, prefetch_pair, prefetch_chance_pair;
  double pathway = 0;          ///< pathway concentration (held-out)
  double pathway_mi = 0;       ///< MI of adjacent selections, nats
  double prefetch = 0;         ///< prefetch hit rate with successor tables from the training probe
  double prefetch_chance = 0;  ///< the same with tokens paired at random (layer l+1 of another token)
};

/// Held-out loss and the routing metrics (moereg/metrics.hpp and the language measures above).
/// `train_probe` is a sample of training bytes from which the successor tables come.
template <class S>
evaluation evaluate(const param_layout& pl, const S* params, const batch& heldout, const batch& train_probe,
                    index_t languages, index_t prefetch_k, int threads = 1) {
  const auto& c = pl.c;
  const moereg::cpu be{threads};
  const auto fc = forward(pl, params, heldout);
  evaluation ev;
  const auto tl = token_losses(fc, heldout);
  std::vector<double> lsum(uz(languages), 0.0), lcnt(uz(languages), 0.0);
  double sum = 0;
  index_t hits = 0;
  for (index_t t = 0; t < heldout.size; ++t) {
    sum += tl[uz(t)];
    lsum[uz(heldout.lang[uz(t)])] += tl[uz(t)];
    lcnt[uz(heldout.lang[uz(t)])] += 1;
    index_t best = 0;
    fc.probs.row(t).maxCoeff(&best);
    hits += best == heldout.target[uz(t)] ? 1 : 0;
  }
  const double ln2 = std::log(2.0);
  ev.bits_per_byte = sum / static_cast<double>(std::max<index_t>(heldout.size, 1)) / ln2;
  for (index_t l = 0; l < languages; ++l)
    ev.bits_per_byte_lang.push_back(lcnt[uz(l)] > 0 ? lsum[uz(l)] / lcnt[uz(l)] / ln2 : 0.0);
  ev.accuracy = static_cast<double>(hits) / static_cast<double>(std::max<index_t>(heldout.size, 1));

  std::vector<moereg::topk_view> sel;
  for (const auto& L : fc.layers) {
    const auto I = L.topk_view(c.top_k);
    sel.push_back(I);
    const auto m = moereg::measure_layer(moereg::view(L.probs), I, moereg::mask_view{}, {}, be);
    const auto oh = moereg::measure_overlap(
        I, moereg::activation_view<const S, moereg::expert_grouped>{L.h.data(), L.grouped(c.top_k, c.hidden)}, {}, {},
        be);
    const auto oo = moereg::measure_overlap(
        I, moereg::activation_view<const S, moereg::expert_grouped>{L.o.data(), L.grouped(c.top_k, c.dim)}, {}, {}, be);
    ev.maxvio += m.maxvio;
    ev.cv += m.cv;
    ev.entropy += m.mean_entropy;
    ev.topk_mass += m.mean_topk_mass;
    ev.overlap_h += oh.mean_abs_cos;
    ev.cos2_h += oh.mean_cos2;
    ev.overlap_o += oo.mean_abs_cos;
    ev.cos2_o += oo.mean_cos2;
    std::vector<double> tc(uz(languages * c.experts), 0.0);
    for (index_t t = 0; t < heldout.size; ++t)
      for (index_t s = 0; s < c.top_k; ++s)
        if (I(t, s) >= 0) tc[uz(heldout.lang[uz(t)] * c.experts + I(t, s))] += 1.0;
    ev.lang_mi.push_back(mutual_information(tc, languages, c.experts));
    double share = 0;
    index_t used = 0;
    ev.expert_share.emplace_back(uz(c.experts), 0.0);
    ev.expert_language.emplace_back(uz(c.experts), -1);
    for (index_t e = 0; e < c.experts; ++e) {
      double tot = 0, mx = 0;
      for (index_t g = 0; g < languages; ++g) {
        tot += tc[uz(g * c.experts + e)];
        if (tc[uz(g * c.experts + e)] > mx) {
          mx = tc[uz(g * c.experts + e)];
          ev.expert_language.back()[uz(e)] = static_cast<int>(g);
        }
      }
      if (tot > 0) {
        ev.expert_share.back()[uz(e)] = mx / tot;
        share += mx / tot;
        ++used;
      }
    }
    ev.majority_share.push_back(used > 0 ? share / static_cast<double>(used) : 0.0);
  }
  const double nl = static_cast<double>(c.layers);
  for (double* v :
       {&ev.maxvio, &ev.cv, &ev.entropy, &ev.topk_mass, &ev.overlap_h, &ev.cos2_h, &ev.overlap_o, &ev.cos2_o})
    *v /= nl;
  for (index_t l = 0; l < c.layers; ++l) {
    ev.lang_mi_mean += ev.lang_mi[uz(l)] / nl;
    ev.majority_mean += ev.majority_share[uz(l)] / nl;
  }

  // Pathways: concentration on held-out; successor tables from the training probe.
  const auto pw = moereg::measure_pathways(sel, c.experts, moereg::mask_view{}, be);
  const auto fp = forward(pl, params, train_probe);
  std::vector<moereg::topk_view> psel;
  for (const auto& L : fp.layers) psel.push_back(L.topk_view(c.top_k));
  const auto ppw = moereg::measure_pathways(psel, c.experts, moereg::mask_view{}, be);
  for (std::size_t q = 0; q < pw.size(); ++q) {
    const auto succ = successors(ppw[q], prefetch_k);
    ev.pathway_pair.push_back(pw[q].pathway_concentration);
    ev.prefetch_pair.push_back(prefetch_hit_rate(sel[q], sel[q + 1], succ, c.experts));
    ev.prefetch_chance_pair.push_back(prefetch_hit_rate(sel[q], sel[q + 1], succ, c.experts, heldout.size / 2 + 1));
    ev.pathway += pw[q].pathway_concentration;
    ev.pathway_mi += pw[q].mutual_information;
    ev.prefetch += ev.prefetch_pair.back();
    ev.prefetch_chance += ev.prefetch_chance_pair.back();
  }
  if (!pw.empty()) {
    const double np = static_cast<double>(pw.size());
    ev.pathway /= np;
    ev.pathway_mi /= np;
    ev.prefetch /= np;
    ev.prefetch_chance /= np;
  }
  return ev;
}

struct curve_point {
  index_t step = 0;
  double train_bpb = 0;    ///< task loss of the training batches since the last point (mean), bits per byte
  double heldout_bpb = 0;  ///< on the curve batch
};

struct run_result {
  evaluation eval;
  double seconds = 0;      ///< training wall time (initialisation to the last step, curve evaluations excluded)
  double reg_seconds = 0;  ///< of which inside the moereg loss calls
  double median_step = 0;  ///< median wall time of one training step (robust to other load on the machine)
  double median_reg = 0;   ///< median wall time of the moereg loss calls in one step
  index_t steps = 0;
  std::vector<curve_point> curve;
  loss_terms last;  ///< the objective's terms at the last step
};

/// Trains a fresh model (Adam) with the regularisers of `reg` on bytes drawn from `train_set`
/// and evaluates it on `heldout`. The seed fixes the initialisation and the training stream.
template <class S>
run_result train(const corpus& train_set, const model_config& mc, const reg_config& reg, const train_config& tc,
                 const batch& heldout, const batch& train_probe, index_t languages, index_t prefetch_k,
                 const batch* curve_batch = nullptr) {
  const param_layout pl(mc);
  const auto t0 = std::chrono::steady_clock::now();
  buffer<S> params = init_params<S>(pl, tc.seed);
  buffer<S> grad(params.size()), m1(params.size(), S(0)), m2(params.size(), S(0));
  std::mt19937_64 g(tc.seed * 0x9E3779B97F4A7C15ULL + 17);
  run_result rr;
  rr.steps = tc.steps;
  double acc = 0, curve_seconds = 0;  // curve evaluations are not counted as training time
  index_t acc_n = 0;
  const double ln2 = std::log(2.0);
  std::vector<double> step_s, reg_s;
  for (index_t step = 1; step <= tc.steps; ++step) {
    const auto s0 = std::chrono::steady_clock::now();
    const batch bt = sample_uniform(train_set, g, tc.batch);
    const auto fc = forward(pl, params.data(), bt);
    rr.last = objective(pl, params.data(), bt, fc, reg, grad.data());
    rr.reg_seconds += rr.last.reg_seconds;
    acc += rr.last.task;
    ++acc_n;
    double lr = tc.lr;
    if (step <= tc.warmup) {
      lr *= static_cast<double>(step) / static_cast<double>(tc.warmup);
    } else {
      const double prog =
          static_cast<double>(step - tc.warmup) / static_cast<double>(std::max<index_t>(tc.steps - tc.warmup, 1));
      lr *= tc.lr_final + (1.0 - tc.lr_final) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * prog));
    }
    const double bc1 = 1.0 - std::pow(tc.beta1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(tc.beta2, static_cast<double>(step));
    const S b1 = static_cast<S>(tc.beta1), b2 = static_cast<S>(tc.beta2);
    const S a = static_cast<S>(lr / bc1), ib2 = static_cast<S>(1.0 / bc2), ep = static_cast<S>(tc.adam_eps);
    for (std::size_t i = 0; i < params.size(); ++i) {
      m1[i] = b1 * m1[i] + (S(1) - b1) * grad[i];
      m2[i] = b2 * m2[i] + (S(1) - b2) * grad[i] * grad[i];
      params[i] -= a * m1[i] / (std::sqrt(m2[i] * ib2) + ep);
    }
    step_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count());
    reg_s.push_back(rr.last.reg_seconds);
    if (curve_batch && tc.eval_every > 0 && (step % tc.eval_every == 0 || step == tc.steps)) {
      const auto e0 = std::chrono::steady_clock::now();
      const auto fe = forward(pl, params.data(), *curve_batch);
      rr.curve.push_back({step, acc / static_cast<double>(acc_n) / ln2, task_loss(fe, *curve_batch) / ln2});
      acc = 0;
      acc_n = 0;
      curve_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count();
    }
  }
  rr.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() - curve_seconds;
  const auto median = [](std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
    return v[v.size() / 2];
  };
  rr.median_step = median(step_s);
  rr.median_reg = median(reg_s);
  rr.eval = evaluate(pl, params.data(), heldout, train_probe, languages, prefetch_k);
  return rr;
}

}  // namespace text_moe
