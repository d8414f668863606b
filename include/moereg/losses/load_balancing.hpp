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
// math/router.hpp and is shared with the CUDA backend (backend/cuda/load_balancing.cuh).
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <type_traits>
#include <vector>

#include "../backend/cpu.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "../math/router.hpp"
#include "api.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// The token set over which f and pbar are taken.
enum class lb_scope { micro, sequence, global };

/// Configuration of load_balancing_loss (LOSSES.md section 1).
struct load_balancing_config {
  double coef = 1e-2;               ///< alpha
  lb_scope scope = lb_scope::micro;  ///< micro (default), sequence or global
  index_t seq_len = 0;              ///< sequence scope: fixed sequence length S (T = B*S); 0 = use cu_seqlens
  index_t k = 0;                    ///< configured top-k width in f_e; 0 = the number of topk columns
};

struct load_balancing_loss;

/// Inputs of load_balancing_loss; T is the storage type of P.
template <class T>
struct load_balancing_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = load_balancing_loss;  ///< the loss these inputs are for
  using grad_type = matrix_view<T>;  ///< what backward() writes
  routing_view<T> probs;            ///< P [T, E]
  topk_view topk;                   ///< I [T, k]
  mask_view mask{};                 ///< m [T], empty = all valid
  offsets_view cu_seqlens{};        ///< sequence scope without seq_len: offsets [B + 1]
};
/// Deduces the storage type from the views: `load_balancing_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
load_balancing_inputs(matrix_view<U>, Rest...) -> load_balancing_inputs<std::remove_const_t<U>>;

/// Load-balancing loss L = alpha * E * sum_e f_e * pbar_e (Switch / GShard; LOSSES.md section 1),
/// gradient with respect to the routing probabilities P.
struct load_balancing_loss : loss_api<load_balancing_loss, load_balancing_config> {
  static constexpr const char* name = "load_balancing_loss";  ///< in error messages
  /// Number of doubles local_stats writes for these inputs.
  template <class T>
  index_t stats_size(const load_balancing_inputs<T>& in) const {
    return cfg.scope == lb_scope::sequence ? 1 : 1 + in.probs.cols;
  }
};

/// Shape checks of a load_balancing_loss call (core/validate.hpp), for every backend.
template <class T>
void validate_shapes(const char* who, const load_balancing_loss& loss, const load_balancing_inputs<T>& in,
                     stats_view reduced, const matrix_view<T>* grad) {
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
      detail::require(in.cu_seqlens.size >= 1, who, ": cu_seqlens has ", in.cu_seqlens.size, " entries; it needs B + 1 >= 1");
    }
  } else {
    detail::require(in.cu_seqlens.empty() && c.seq_len == 0, who, ": seq_len and cu_seqlens apply only to the sequence scope");
  }
  detail::check_stats_shape(who, reduced, loss.stats_size(in));
}
/// Content checks of a load_balancing_loss call on the host: the top-k ids, the sequence
/// offsets (0, non-decreasing, ending at T) and the reduced statistics (all counts).
template <class T>
void validate_contents(const char* who, const load_balancing_loss& loss, const load_balancing_inputs<T>& in,
                       stats_view reduced,
                       const matrix_view<T>*) {
  detail::check_topk_ids(who, "topk", in.topk, in.probs.cols);
  if (loss.cfg.scope == lb_scope::sequence && loss.cfg.seq_len == 0) {
    const auto& o = in.cu_seqlens;
    detail::require(o[0] == 0, who, ": cu_seqlens[0] = ", o[0], " but must be 0");
    for (index_t b = 1; b < o.size; ++b)
      detail::require(o[b] >= o[b - 1], who, ": cu_seqlens is not increasing: cu_seqlens[", b, "] = ", o[b], " < cu_seqlens[",
              b - 1, "] = ", o[b - 1]);
    detail::require(o[o.size - 1] == in.probs.rows, who, ": cu_seqlens ends at ", o[o.size - 1], " but T = ", in.probs.rows);
  }
  detail::check_stats_values(who, reduced, loss.stats_size(in));
}
/// The memory of a load_balancing_loss call, by name, for a backend's pointer checks.
template <class T, class F>
void for_each_buffer(const load_balancing_inputs<T>& in, const matrix_view<T>* grad, F&& f) {
  f("probs", in.probs.data);
  f("topk", in.topk.data);
  f("mask", in.mask.data);
  f("cu_seqlens", in.cu_seqlens.data);
  if (grad) f("grad_probs", grad->data);
}

namespace detail {

struct lb_sequences {
  index_t count = 0;
  index_t fixed = 0;  // > 0: fixed length
  offsets_view offsets{};
  index_t begin(index_t b) const { return fixed > 0 ? b * fixed : offsets[b]; }
  index_t end(index_t b) const { return fixed > 0 ? (b + 1) * fixed : offsets[b + 1]; }
};

/// Every host check of the call, then its sequences (sequence scope; none otherwise).
template <class T>
lb_sequences lb_validate(const load_balancing_loss& loss, const load_balancing_inputs<T>& in, stats_view reduced,
                         const matrix_view<T>* grad) {
  validate_on_host("load_balancing", loss, in, reduced, grad);
  lb_sequences seq;
  if (loss.cfg.scope != lb_scope::sequence) return seq;
  if (loss.cfg.seq_len > 0) {
    seq.fixed = loss.cfg.seq_len;
    seq.count = in.probs.rows / loss.cfg.seq_len;
  } else {
    seq.offsets = in.cu_seqlens;
    seq.count = in.cu_seqlens.size - 1;
  }
  return seq;
}

// Masked column sums, expert counts and T_v over rows [r0, r1), in a fixed order.
template <class T, class Acc>
void lb_block_sums(const load_balancing_inputs<T>& in, index_t r0, index_t r1, Acc* colsum, index_t* counts,
                   index_t& tv) {
  const auto& P = in.probs;
  const index_t E = P.cols;
  for (index_t e = 0; e < E; ++e) colsum[e] = Acc(0), counts[e] = 0;
  tv = 0;
  for (index_t t = r0; t < r1; ++t) {
    if (!in.mask(t)) continue;
    ++tv;
    const T* p = P.row(t);
    if (P.col_stride == 1)
      for (index_t e = 0; e < E; ++e) colsum[e] += load(p[e]);
    else
      for (index_t e = 0; e < E; ++e) colsum[e] += load(p[e * P.col_stride]);
    for (index_t s = 0; s < in.topk.k; ++s) {
      const index_t e = in.topk(t, s);
      if (e >= 0) ++counts[e];
    }
  }
}

// Per-block sums over all rows, combined in block order.
template <class T, class Acc>
void lb_sums(const cpu& be, const load_balancing_inputs<T>& in, std::vector<Acc>& colsum, std::vector<index_t>& counts,
             index_t& tv) {
  const index_t T_ = in.probs.rows, E = in.probs.cols, B = cpu_block_rows;
  const index_t nb = num_blocks(T_, B);
  std::vector<Acc> pcol(static_cast<std::size_t>(nb * E));
  std::vector<index_t> pcnt(static_cast<std::size_t>(nb * E)), ptv(static_cast<std::size_t>(nb));
  parallel_blocks(be, T_, B, [&](index_t b, index_t r0, index_t r1) {
    lb_block_sums(in, r0, r1, pcol.data() + b * E, pcnt.data() + b * E, ptv[static_cast<std::size_t>(b)]);
  });
  colsum.assign(static_cast<std::size_t>(E), Acc(0));
  counts.assign(static_cast<std::size_t>(E), 0);
  combine_blocks(pcol, nb, E, colsum.data());
  tv = 0;
  for (index_t b = 0; b < nb; ++b) {
    tv += ptv[static_cast<std::size_t>(b)];
    for (index_t e = 0; e < E; ++e) counts[static_cast<std::size_t>(e)] += pcnt[static_cast<std::size_t>(b * E + e)];
  }
}

// Writes grad(t, e) = m_t * coeff[e] (or 0 for padding) over all rows.
template <class T, class Acc>
void lb_write_grad(const cpu& be, const load_balancing_inputs<T>& in, index_t r0, index_t r1, const Acc* coeff,
                   const matrix_view<T>& g, bool accumulate) {
  parallel_blocks(be, r1 - r0, cpu_block_rows, [&](index_t, index_t a, index_t b) {
    for (index_t t = r0 + a; t < r0 + b; ++t) {
      const bool valid = in.mask(t);
      if (!valid && accumulate) continue;
      for (index_t e = 0; e < g.cols; ++e) put_grad(g(t, e), valid ? coeff[e] : Acc(0), accumulate);
    }
  });
}

}  // namespace detail

/// CPU backend of load_balancing_loss::local_stats() (found by ADL): validates, then writes the statistics
/// to `out`.
template <class T>
void execute_stats(const cpu& be, const load_balancing_loss& loss, const load_balancing_inputs<T>& in, double* out) {
  detail::check_scalars("load_balancing", loss.cfg.coef, grad_options{}, be.threads);
  using Acc = accumulator_t<T>;
  const auto seq = detail::lb_validate(loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr));
  if (loss.cfg.scope == lb_scope::sequence) {
    out[0] = static_cast<double>(seq.count);
    return;
  }
  std::vector<Acc> colsum;
  std::vector<index_t> counts;
  index_t tv = 0;
  detail::lb_sums(be, in, colsum, counts, tv);
  out[0] = static_cast<double>(tv);
  for (std::size_t e = 0; e < counts.size(); ++e) out[e + 1] = static_cast<double>(counts[e]);
}

/// CPU backend of load_balancing_loss's value(), backward() and value_and_grad() (found by ADL): validates,
/// returns the value and, when `grad` is not null, writes the gradient per `opts`.
template <class T>
double execute(const cpu& be, const load_balancing_loss& loss, const load_balancing_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::check_scalars("load_balancing", loss.cfg.coef, opts, be.threads);
  using Acc = accumulator_t<T>;
  const auto seq = detail::lb_validate(loss, in, reduced, grad);
  const index_t E = in.probs.cols;
  const Acc k = static_cast<Acc>(loss.cfg.k > 0 ? loss.cfg.k : in.topk.k);
  const Acc alphaE = static_cast<Acc>(loss.cfg.coef) * static_cast<Acc>(E);
  const Acc gs = static_cast<Acc>(opts.grad_scale);
  std::vector<Acc> coeff(static_cast<std::size_t>(E));

  if (loss.cfg.scope != lb_scope::sequence) {
    std::vector<Acc> colsum;
    std::vector<index_t> counts;
    index_t tv_local = 0;
    detail::lb_sums(be, in, colsum, counts, tv_local);
    const double tv_f = reduced.empty() ? static_cast<double>(tv_local) : reduced.data[0];
    const double tv_p = (loss.cfg.scope == lb_scope::global) ? static_cast<double>(tv_local) : tv_f;
    Acc value = Acc(0);
    std::vector<Acc> terms(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      const double cnt = reduced.empty() ? static_cast<double>(counts[static_cast<std::size_t>(e)]) : reduced.data[e + 1];
      const auto r = detail::lb_expert(cnt, tv_f, tv_p, colsum[static_cast<std::size_t>(e)], k, alphaE, gs);
      terms[static_cast<std::size_t>(e)] = r.term;
      coeff[static_cast<std::size_t>(e)] = r.coeff;
    }
    value = alphaE * detail::pairwise_sum(terms.data(), E);
    if (grad) detail::lb_write_grad(be, in, 0, in.probs.rows, coeff.data(), *grad, opts.accumulate);
    return static_cast<double>(value);
  }

  // Sequence scope: each sequence is one sequential block of work; sequences run in parallel.
  const double B_total = reduced.empty() ? static_cast<double>(seq.count) : reduced.data[0];
  std::vector<Acc> seq_values(static_cast<std::size_t>(seq.count), Acc(0));
  const Acc invB = B_total > 0 ? static_cast<Acc>(1.0 / B_total) : Acc(0);
  detail::parallel_blocks(be, seq.count, 1, [&](index_t b, index_t, index_t) {
    const index_t r0 = seq.begin(b), r1 = seq.end(b);
    const index_t nb = detail::num_blocks(r1 - r0, detail::cpu_block_rows);
    std::vector<Acc> pcol(static_cast<std::size_t>(nb * E)), colsum(static_cast<std::size_t>(E)),
        c(static_cast<std::size_t>(E)), terms(static_cast<std::size_t>(E));
    std::vector<index_t> pcnt(static_cast<std::size_t>(nb * E)), cnt(static_cast<std::size_t>(E), 0);
    index_t tv = 0;
    for (index_t j = 0; j < nb; ++j) {
      index_t tvj = 0;
      const index_t a = r0 + j * detail::cpu_block_rows;
      detail::lb_block_sums(in, a, std::min(r1, a + detail::cpu_block_rows), pcol.data() + j * E,
                            pcnt.data() + j * E, tvj);
      tv += tvj;
      for (index_t e = 0; e < E; ++e) cnt[static_cast<std::size_t>(e)] += pcnt[static_cast<std::size_t>(j * E + e)];
    }
    detail::combine_blocks(pcol, nb, E, colsum.data());
    const Acc inv_tv = tv > 0 ? Acc(1) / static_cast<Acc>(tv) : Acc(0);
    for (index_t e = 0; e < E; ++e) {
      const auto r = detail::lb_seq_expert(static_cast<Acc>(cnt[static_cast<std::size_t>(e)]), inv_tv,
                                           colsum[static_cast<std::size_t>(e)], k, alphaE, gs, invB);
      terms[static_cast<std::size_t>(e)] = r.term;
      c[static_cast<std::size_t>(e)] = r.coeff;
    }
    seq_values[static_cast<std::size_t>(b)] = alphaE * detail::pairwise_sum(terms.data(), E);
    if (grad) {
      for (index_t t = r0; t < r1; ++t) {
        const bool valid = in.mask(t);
        if (!valid && opts.accumulate) continue;
        for (index_t e = 0; e < E; ++e) detail::put_grad((*grad)(t, e), valid ? c[static_cast<std::size_t>(e)] : Acc(0), opts.accumulate);
      }
    }
  });
  return static_cast<double>(invB * detail::pairwise_sum(seq_values.data(), seq.count));
}

// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(load_balancing_loss, load_balancing_inputs)

MOEREG_NAMESPACE_END
