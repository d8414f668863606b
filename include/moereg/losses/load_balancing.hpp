// Load-balancing loss (Switch Transformer / GShard), LOSSES.md section 1.
//
//   f_e    = (1 / (k T_v)) sum_t m_t sum_{s in A_t} [I[t,s] = e]     (k = configured top-k)
//   pbar_e = (1 / T_v)     sum_t m_t P[t,e]
//   L      = alpha * E * sum_e f_e * pbar_e,    dL/dP[t,e] = alpha * E * f_e * m_t / T_v
//
// Scopes:
//   micro    the formula over this call's rows.
//   sequence DeepSeek-V2/V3 seq_aux: f and pbar inside each of B sequences (a fixed length
//            seq_len, or packed offsets cu_seqlens), L = (1/B) sum_b L_b. A sequence with no
//            valid token contributes 0 and still counts in B.
//   global   Qwen global-batch balancing: f_e from counts and T_v summed over ranks and
//            accumulation steps (pass them as reduced statistics); pbar stays local.
//
// Statistics (LOSSES.md section 9), all sums:
//   micro, global  [T_v, count_0, ..., count_{E-1}]   (1 + E entries)
//   sequence       [B]                                 (1 entry)
// With reduced statistics:
//   micro    f and the 1/T_v of pbar and of the gradient come from the reduced sums, so for
//            any split of a batch the parts' gradient rows and summed values equal those of
//            one call over the whole batch.
//   global   f comes from the reduced sums, pbar = local column sum / local T_v (Qwen), and
//            the gradient is alpha * E * f_e * m_t / local T_v. Values are per micro-batch.
//   sequence B comes from the reduced sum; parts must be cut at sequence boundaries.
//
// Passes over memory (value_and_grad): P, topk and mask are read once; the gradient, which
// does not depend on P, is written once.
//
// The per-expert arithmetic (f_e, the value term and the gradient coefficient) lives in
// math/router.hpp and is shared with the CUDA backend (backend/cuda/load_balancing.cuh). The
// micro and global scopes are described below (lb_kernel) and run on the row engines; the
// sequence scope runs on the CPU's segmented engine (backend/cpu/segmented_rows.hpp).
#pragma once

#include "../core/config.hpp"

#include <type_traits>
#include <vector>

#include "../math/reduce.hpp"
#include "../math/router.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// The token set over which f and pbar are taken.
enum class lb_scope { micro, sequence, global };

/// Configuration of load_balancing_loss (LOSSES.md section 1).
struct load_balancing_config {
  double coef = 1e-2;                ///< alpha
  lb_scope scope = lb_scope::micro;  ///< micro (default), sequence or global
  index_t seq_len = 0;               ///< sequence scope: fixed sequence length S (T = B*S); 0 = use cu_seqlens
  index_t k = 0;                     ///< configured top-k width in f_e; 0 = the number of topk columns
};

struct load_balancing_loss;

/// Inputs of load_balancing_loss; T is the storage type of P.
template <class T>
struct load_balancing_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = load_balancing_loss;  ///< the loss these inputs are for
  using grad_type = matrix_view<T>;       ///< what backward() writes
  routing_view<T> probs;                  ///< P [T, E]
  topk_view topk;                         ///< I [T, k]
  mask_view mask{};                       ///< m [T], empty = all valid
  offsets_view cu_seqlens{};              ///< sequence scope without seq_len: offsets [B + 1]
};
/// Deduces the storage type from the views: `load_balancing_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
load_balancing_inputs(matrix_view<U>, Rest...) -> load_balancing_inputs<std::remove_const_t<U>>;

/// Load-balancing loss L = alpha * E * sum_e f_e * pbar_e (Switch / GShard; LOSSES.md section 1),
/// gradient with respect to the routing probabilities P.
struct load_balancing_loss : loss_api<load_balancing_loss, load_balancing_config> {
  static constexpr const char* name = "load_balancing_loss";  ///< in error messages
  static constexpr const char* label = "load_balancing";      ///< prefix of the CPU backend's error messages
  /// Number of doubles local_stats writes for these inputs.
  template <class T>
  index_t stats_size(const load_balancing_inputs<T>& in) const {
    return cfg.scope == lb_scope::sequence ? 1 : 1 + in.probs.cols;
  }
};

/// Shape checks of a load_balancing_loss call (core/validate.hpp), for every backend.
template <class T, class G>
void validate_shapes(const char* who, const load_balancing_loss& loss, const load_balancing_inputs<T>& in,
                     stats_view reduced, const matrix_view<G>* grad) {
  const auto& P = in.probs;
  const auto& c = loss.cfg;
  detail::check_matrix(who, "probs", P);
  detail::check_topk_shape(who, "topk", in.topk, P.rows, P.cols);
  detail::check_mask(who, in.mask, P.rows);
  detail::require(c.k >= 0, who, ": config k = ", c.k, " is negative");
  detail::require(c.k <= P.cols, who, ": config k = ", c.k, " but there are only E = ", P.cols, " experts");
  if (grad) detail::check_grad(who, "grad_probs", *grad, P);
  if (c.scope == lb_scope::sequence) {
    if (c.seq_len > 0) {
      detail::require(in.cu_seqlens.empty(), who, ": give either seq_len or cu_seqlens, not both");
      detail::require(P.rows % c.seq_len == 0, who, ": T = ", P.rows, " is not a multiple of seq_len = ", c.seq_len);
    } else {
      detail::require(c.seq_len == 0, who, ": seq_len = ", c.seq_len, " is negative");
      detail::require(!in.cu_seqlens.empty(), who, ": sequence scope needs seq_len > 0 or cu_seqlens");
      detail::require(in.cu_seqlens.size >= 1, who, ": cu_seqlens has ", in.cu_seqlens.size,
                      " entries; it needs B + 1 >= 1");
    }
  } else {
    detail::require(in.cu_seqlens.empty() && c.seq_len == 0, who,
                    ": seq_len and cu_seqlens apply only to the sequence scope");
  }
  detail::check_stats_shape(who, reduced, loss.stats_size(in));
}
/// Content checks of a load_balancing_loss call on the host: the top-k ids, the sequence
/// offsets (0, non-decreasing, ending at T) and the reduced statistics (all counts).
template <class T, class G>
void validate_contents(const char* who, const load_balancing_loss& loss, const load_balancing_inputs<T>& in,
                       stats_view reduced, const matrix_view<G>*) {
  detail::check_topk_ids(who, "topk", in.topk, in.probs.cols);
  if (loss.cfg.scope == lb_scope::sequence && loss.cfg.seq_len == 0) {
    const auto& o = in.cu_seqlens;
    detail::require(o[0] == 0, who, ": cu_seqlens[0] = ", o[0], " but must be 0");
    for (index_t b = 1; b < o.size; ++b)
      detail::require(o[b] >= o[b - 1], who, ": cu_seqlens is not increasing: cu_seqlens[", b, "] = ", o[b],
                      " < cu_seqlens[", b - 1, "] = ", o[b - 1]);
    detail::require(o[o.size - 1] == in.probs.rows, who, ": cu_seqlens ends at ", o[o.size - 1],
                    " but T = ", in.probs.rows);
  }
  detail::check_stats_values(who, reduced, loss.stats_size(in));
}
/// The memory of a load_balancing_loss call, by name, for a backend's pointer checks.
template <class T, class G, class F>
void for_each_buffer(const load_balancing_inputs<T>& in, const matrix_view<G>* grad, F&& f) {
  f("probs", in.probs.data);
  f("topk", in.topk.data);
  f("mask", in.mask.data);
  f("cu_seqlens", in.cu_seqlens.data);
  if (grad) f("grad_probs", grad->data);
}

namespace detail {

/// The row kernel of load_balancing_loss in the micro and global scopes (the protocol is in
/// backend/cpu/row_engine.hpp; the sequence scope runs on backend/cpu/segmented_rows.hpp).
/// Pass 1, always: the column sums of P (pbar) and the expert counts of the top-k ids (f,
/// unless reduced). A valid row's gradient is the per-expert coefficient of lb_expert
/// (math/router.hpp); P is not read again.
template <class T>
struct lb_kernel : per_column_rows<accumulator_t<T>> {
  using storage_type = T;
  using acc_type = accumulator_t<T>;
  using Acc = acc_type;
  matrix_view<const T> x;  ///< P
  mask_view mask;
  topk_view topk;
  bool global = false;
  double alpha = 0, grad_scale = 1;
  Acc k = Acc(1);  ///< the configured top-k width
  index_t sum_width = 0, count_width = 0, stats_size = 1;
  bool active = true;

  bool needs_pass1(bool) const { return true; }
  void stats_row(index_t t, const Acc* p, Acc* colsum, index_t* counts) const {
    for (index_t e = 0; e < sum_width; ++e) colsum[e] += p[e];
    for (index_t s = 0; s < topk.k; ++s) {
      const index_t e = topk(t, s);
      if (e >= 0) ++counts[e];
    }
  }
  void write_stats(const row_local<Acc>& local, double* out) const {
    out[0] = static_cast<double>(local.tv);
    for (index_t e = 0; e < count_width; ++e) out[e + 1] = static_cast<double>(local.counts[e]);
  }
  /// f from the statistics (reduced or this call's); pbar from this call's column sums over
  /// the T_v behind f (micro) or this call's T_v (global).
  void prepare(const double* stats, const row_local<Acc>& local) {
    const index_t E = sum_width;
    const double tv_f = stats[0], tv_p = global ? static_cast<double>(local.tv) : tv_f;
    const Acc alpha_e = static_cast<Acc>(alpha) * static_cast<Acc>(E), gs = static_cast<Acc>(grad_scale);
    std::vector<Acc> terms(static_cast<std::size_t>(E));
    this->coeff.assign(static_cast<std::size_t>(E), Acc(0));
    for (index_t e = 0; e < E; ++e) {
      const auto r = lb_expert(stats[e + 1], tv_f, tv_p, local.sums[e], k, alpha_e, gs);
      terms[static_cast<std::size_t>(e)] = r.term;
      this->coeff[static_cast<std::size_t>(e)] = r.coeff;
    }
    this->value = alpha_e * pairwise_sum(terms.data(), E);
  }
};

}  // namespace detail

/// The row kernel of load_balancing_loss for these inputs (found by ADL by the row engines).
template <class T>
detail::lb_kernel<T> make_row_kernel(const load_balancing_loss& loss, const load_balancing_inputs<T>& in,
                                     grad_options opts) {
  detail::lb_kernel<T> k;
  k.x = in.probs;
  k.mask = in.mask;
  k.topk = in.topk;
  k.global = loss.cfg.scope == lb_scope::global;
  k.alpha = loss.cfg.coef;
  k.grad_scale = opts.grad_scale;
  k.k = static_cast<accumulator_t<T>>(loss.cfg.k > 0 ? loss.cfg.k : in.topk.k);
  k.sum_width = k.count_width = in.probs.cols;
  k.stats_size = loss.stats_size(in);
  return k;
}

MOEREG_NAMESPACE_END
