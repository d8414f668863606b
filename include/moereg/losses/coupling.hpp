// Cross-layer coupling loss (Hu, Cao, Kong, Sun, Yuan 2026, "Synergistic Intra- and
// Cross-Layer Regularization Losses for MoE Expert Specialization", R_cp), LOSSES.md section 4.
//
// Input: the routing of L >= 2 consecutive layers over the same T tokens and the same mask:
// P^l [T, E] and I^l [T, k_l] for l = 1..L. E is the same for every layer; each layer has
// its own top-k width k_l (the number of columns of its topk view).
//
//   M^l_t = sum_{s in A^l_t} P^l[t, I^l[t,s]]                        (top-k mass)
//
//   token (default)  L = -lambda (1/T_v) sum_t m_t sum_{l=1}^{L-1} M^l_t M^{l+1}_t
//                    dL/dP^l[t,e] = -lambda m_t/T_v [e selected at l] (M^{l-1}_t + M^{l+1}_t)
//   log              L = -lambda (1/T_v) sum_t m_t sum_l log(M^l_t M^{l+1}_t + eps)   (eps 1e-12)
//                    dL/dP^l[t,e] = -lambda m_t/T_v [e selected at l]
//                                   (M^{l+1}/(M^l M^{l+1} + eps) + M^{l-1}/(M^{l-1} M^l + eps))
//   batch            J^l = (1/T_v) sum_t m_t P^l[t,:]^T P^{l+1}[t,:]     (E x E)
//                    L = -lambda sum_l sum_e sum_{nu in topk_l(J^l[e,:])} J^l[e,nu]
//                    (k_l = top-k width of the source layer l; the selection is a constant,
//                    ties go to the lower expert index; the topk indices themselves are not
//                    used by this form, only their width)
//                    dL/dP^l     = -lambda m/T_v (P^{l+1} S_l^T),
//                    dL/dP^{l+1} = -lambda m/T_v (P^l S_l)      (S_l the 0/1 selection matrix)
// A missing neighbour layer counts 0. lambda defaults to 1e-3.
//
// Inputs: `probs` and `topk` point to `layers` views each (a plain array or a
// std::vector's data()); gradients are written through a pointer to `layers` gradient
// views, one per layer, each with the shape of its probs and its own strides. Gradient
// buffers must not overlap the inputs or each other.
//
// Statistics (LOSSES.md section 9), all sums:
//   token, log  [T_v]                                                   (1 entry)
//   batch       [T_v, U^1, ..., U^{L-1}]   U^l[e,nu] = sum_t m_t P^l[t,e] P^{l+1}[t,nu],
//               each E x E row-major                                    (1 + (L-1) E^2 entries)
// With reduced statistics T_v is global; in the batch form the selection comes from the
// reduced U (J = U / T_v has the same order), so every part selects the whole batch's pairs.
// Each part's value is -lambda * sum over the selected (e, nu) of its OWN U entries / global
// T_v, so the parts' values sum to the whole batch's value and each part's gradient rows equal
// the whole batch's rows (up to float rounding).
//
// Passes over memory (value_and_grad):
//   token, log  one: P at the selected entries, topk and mask read once, gradients written once.
//   batch       two: P is read once to form U (per token block, one GEMM per adjacent pair),
//               then once more to form the gradients (two GEMMs per layer and block); the
//               gradients are written once.
//
// Determinism: the value and gradients are bitwise the same for any number of CPU threads
// (backend/cpu/layer_engine.hpp says how for the batch form's GEMMs).
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../math/router.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Which reading of R_cp (LOSSES.md section 4).
enum class coupling_form { token, log, batch };

/// Configuration of coupling_loss (LOSSES.md section 4).
struct coupling_config {
  double coef = 1e-3;                         ///< lambda
  coupling_form form = coupling_form::token;  ///< token (default), log or batch
  double eps = 1e-12;                         ///< log form: log(M^l M^{l+1} + eps)
};

struct coupling_loss;

/// The routing of `layers` consecutive layers. probs[l] is P^l [T, E], topk[l] is I^l [T, k_l].
template <class T>
struct coupling_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = coupling_loss;          ///< the loss these inputs are for
  using grad_type = const matrix_view<T>*;  ///< what backward() writes
  const routing_view<T>* probs = nullptr;   ///< `layers` views
  const topk_view* topk = nullptr;          ///< `layers` views
  index_t layers = 0;                       ///< L >= 2
  mask_view mask{};                         ///< m [T], shared by every layer; empty = all valid
};
/// Deduces the storage type from the views: `coupling_inputs{view(x), ...}` needs no template argument.
template <class T, class... Rest>
coupling_inputs(const routing_view<T>*, Rest...) -> coupling_inputs<T>;

/// Cross-layer coupling loss (Hu et al. 2026, R_cp; LOSSES.md section 4), token form
/// L = -lambda * (1 / T_v) sum_t m_t sum_l M^l_t M^{l+1}_t; gradient with respect to every P^l.
struct coupling_loss : loss_api<coupling_loss, coupling_config> {
  static constexpr const char* name = "coupling_loss";  ///< in error messages
  static constexpr const char* label = "coupling";      ///< prefix of the CPU backend's error messages
  /// Number of doubles local_stats writes: 1 (token, log) or 1 + (L-1) E^2 (batch).
  template <class T>
  index_t stats_size(const coupling_inputs<T>& in) const {
    if (cfg.form != coupling_form::batch) return 1;
    const index_t E = (in.probs != nullptr && in.layers > 0) ? in.probs[0].cols : 0;
    return 1 + std::max<index_t>(in.layers - 1, 0) * E * E;
  }
};

/// Shape checks of a coupling_loss call (core/validate.hpp), for every backend.
template <class T, class G>
void validate_shapes(const char* who, const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced,
                     const matrix_view<G>* grads) {
  const auto form = loss.cfg.form;
  detail::require(form == coupling_form::token || form == coupling_form::log || form == coupling_form::batch, who,
                  ": unknown form ", static_cast<int>(form));
  detail::require(in.layers >= 2, who, ": needs at least 2 layers but got layers = ", in.layers);
  detail::require(in.probs != nullptr, who, ": probs is null; pass one routing view per layer");
  detail::require(in.topk != nullptr, who, ": topk is null; pass one topk view per layer");
  detail::require(std::isfinite(loss.cfg.eps) && loss.cfg.eps >= 0, who, ": eps = ", loss.cfg.eps,
                  " must be finite and non-negative");
  const index_t T_ = in.probs[0].rows, E = in.probs[0].cols;
  for (index_t l = 0; l < in.layers; ++l) {
    const auto& P = in.probs[l];
    const std::string pn = detail::concat("probs[", l, "]"), tn = detail::concat("topk[", l, "]");
    detail::check_matrix(who, pn.c_str(), P);
    detail::require(P.rows == T_, who, ": ", pn, " has ", P.rows, " rows but probs[0] has ", T_,
                    "; every layer routes the same tokens");
    detail::require(P.cols == E, who, ": ", pn, " has E = ", P.cols, " experts but probs[0] has E = ", E,
                    "; every layer needs the same number of experts");
    detail::check_topk_shape(who, tn.c_str(), in.topk[l], T_, E);
  }
  detail::check_mask(who, in.mask, T_);
  if (grads)
    for (index_t l = 0; l < in.layers; ++l)
      detail::check_grad(who, detail::concat("grads[", l, "]").c_str(), grads[l], in.probs[l]);
  detail::check_stats_shape(who, reduced, loss.stats_size(in));
}
/// Content checks of a coupling_loss call on the host: every layer's top-k ids; T_v is a count
/// (the batch form's co-occurrence sums are finite).
template <class T, class G>
void validate_contents(const char* who, const coupling_loss&, const coupling_inputs<T>& in, stats_view reduced,
                       const matrix_view<G>*) {
  for (index_t l = 0; l < in.layers; ++l)
    detail::check_topk_ids(who, detail::concat("topk[", l, "]").c_str(), in.topk[l], in.probs[0].cols);
  detail::check_stats_values(who, reduced, 1);
}
/// The memory of a coupling_loss call, by name, for a backend's pointer checks.
template <class T, class G, class F>
void for_each_buffer(const coupling_inputs<T>& in, const matrix_view<G>* grads, F&& f) {
  for (index_t l = 0; l < in.layers; ++l) {
    f(detail::concat("probs[", l, "]").c_str(), in.probs[l].data);
    f(detail::concat("topk[", l, "]").c_str(), in.topk[l].data);
    if (grads) f(detail::concat("grads[", l, "]").c_str(), grads[l].data);
  }
  f("mask", in.mask.data);
}

MOEREG_NAMESPACE_END
