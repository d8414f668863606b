// Variance loss (Guo, Lu, Nan et al. 2025, "Advancing Expert Specialization for Better MoE",
// L_v), LOSSES.md section 6.
//
// S [T, E] is the routing score matrix the caller passes (the paper: the scores after the
// top-k step, each row summing to 1).
//
//   tokens axis (paper, default):
//     sbar_e = (1 / T_v) sum_t m_t S[t,e]
//     L = -gamma (1/E) (1/T_v) sum_t m_t sum_e (S[t,e] - sbar_e)^2
//     dL/dS[t,e] = -gamma 2 m_t (S[t,e] - sbar_e) / (E T_v)
//     (the derivative through sbar vanishes: sum_t m_t (S[t,e] - sbar_e) = 0)
//   experts axis (the authors' released code):
//     L = -gamma (1/T_v) sum_t m_t var_unbiased_e(S[t,:]),   E = 1 gives 0
//     dL/dS[t,e] = -gamma m_t 2 (S[t,e] - mean_e S[t,:]) / ((E - 1) T_v)
//   reduction = sum drops the outer 1/T_v (the paper sums over tokens). LOSSES.md names the
//   option for the tokens axis; the library applies it to both axes. sbar always divides
//   by T_v: it is a mean by definition.
// gamma defaults to 1e-3.
//
// Statistics (LOSSES.md section 9), all sums:
//   tokens   [T_v, sum_t m_t S[t,0], ..., sum_t m_t S[t,E-1]]   (1 + E entries)
//   experts  [T_v]                                               (1 entry)
// With reduced statistics sbar (tokens axis) and T_v are global; everything else is this
// call's rows. Each part's value is its own rows' share of the whole sum, so the parts'
// values add up to the whole batch's value and each part's gradient rows equal the whole
// batch's rows. With reduction = sum the statistics are still needed on the tokens axis
// (sbar is a mean over the whole batch) and behave the same way; the parts' values then add
// to the whole batch's un-normalised sum. On the experts axis with reduction = sum, the
// statistics only decide the T_v = 0 rule.
//
// Passes over memory (value_and_grad): tokens axis two (column sums, then deviations and the
// gradient), one when reduced statistics are given; experts axis one. The gradient is
// written once.
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <cmath>
#include <type_traits>
#include <vector>

#include "../backend/cpu.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "api.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Over which axis the variance is taken (LOSSES.md section 6).
enum class variance_axis { tokens, experts };
/// Outer normalisation: mean over valid tokens (1/T_v) or plain sum over tokens.
enum class variance_reduction { mean, sum };

/// Configuration of variance_loss (LOSSES.md section 6).
struct variance_config {
  double coef = 1e-3;                                   ///< gamma
  variance_axis axis = variance_axis::tokens;  ///< tokens (the paper, default) or experts
  variance_reduction reduction = variance_reduction::mean;  ///< tokens axis: mean (default) or sum
};

struct variance_loss;

/// Inputs of variance_loss; T is the storage type of S.
template <class T>
struct variance_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = variance_loss;  ///< the loss these inputs are for
  using grad_type = matrix_view<T>;  ///< what backward() writes
  static constexpr const char* matrix_name = "scores";  ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_scores";  ///< its gradient, as errors name it
  routing_view<T> scores;  ///< S [T, E]
  mask_view mask{};        ///< m [T], empty = all valid
  /// The routing matrix (the generic checks of losses/common.hpp read it).
  const routing_view<T>& matrix() const { return scores; }
};
/// Deduces the storage type from the views: `variance_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
variance_inputs(matrix_view<U>, Rest...) -> variance_inputs<std::remove_const_t<U>>;

/// Variance loss L_v = -gamma * (1 / E) (1 / T_v) sum_t m_t sum_e (S[t,e] - sbar_e)^2 (Guo et al. 2025;
/// LOSSES.md section 6), gradient with respect to the routing scores S.
struct variance_loss : loss_api<variance_loss, variance_config> {
  static constexpr const char* name = "variance_loss";  ///< in error messages
  static constexpr index_t stats_counts = 1;  ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const variance_inputs<T>& in) const {
    return cfg.axis == variance_axis::tokens ? 1 + in.scores.cols : 1;
  }
};

/// The configuration checks of variance_loss (the generic shape checks of losses/common.hpp
/// call them): a known axis and reduction.
template <class T>
void validate_config(const char* who, const variance_loss& loss, const variance_inputs<T>&) {
  const auto& c = loss.cfg;
  detail::require(c.axis == variance_axis::tokens || c.axis == variance_axis::experts, who, ": unknown axis ",
                  static_cast<int>(c.axis));
  detail::require(c.reduction == variance_reduction::mean || c.reduction == variance_reduction::sum, who,
                  ": unknown reduction ", static_cast<int>(c.reduction));
}

namespace detail {

/// Masked column sums of S and T_v over all rows, per block and combined in block order.
template <class T>
void var_column_sums(const cpu& be, const variance_inputs<T>& in, std::vector<accumulator_t<T>>& colsum,
                     index_t& tv) {
  using Acc = accumulator_t<T>;
  const auto& S = in.scores;
  const index_t E = S.cols, nb = num_blocks(S.rows, cpu_block_rows);
  std::vector<Acc> part(static_cast<std::size_t>(nb * E), Acc(0));
  std::vector<index_t> ptv(static_cast<std::size_t>(nb), 0);
  parallel_blocks(be, S.rows, cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    Acc* c = part.data() + b * E;
    index_t n = 0;
    for (index_t t = r0; t < r1; ++t) {
      if (!in.mask(t)) continue;
      ++n;
      for (index_t e = 0; e < E; ++e) c[e] += load(S(t, e));
    }
    ptv[static_cast<std::size_t>(b)] = n;
  });
  colsum.assign(static_cast<std::size_t>(E), Acc(0));
  combine_blocks(part, nb, E, colsum.data());
  tv = 0;
  for (index_t n : ptv) tv += n;
}

template <class T>
void var_zero_grad(const cpu& be, const matrix_view<T>* grad, grad_options opts) {
  if (grad == nullptr || opts.accumulate) return;
  using Acc = accumulator_t<T>;
  parallel_blocks(be, grad->rows, cpu_block_rows, [&](index_t, index_t r0, index_t r1) {
    for (index_t t = r0; t < r1; ++t)
      for (index_t e = 0; e < grad->cols; ++e) put_grad((*grad)(t, e), Acc(0), false);
  });
}

}  // namespace detail

/// CPU backend of variance_loss::local_stats() (found by ADL): validates, then writes the statistics
/// to `out`.
template <class T>
void execute_stats(const cpu& be, const variance_loss& loss, const variance_inputs<T>& in, double* out) {
  detail::check_scalars("variance", loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host("variance", loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr));
  if (loss.cfg.axis == variance_axis::experts) {
    out[0] = static_cast<double>(detail::count_valid(in.mask, in.scores.rows));
    return;
  }
  std::vector<accumulator_t<T>> colsum;
  index_t tv = 0;
  detail::var_column_sums(be, in, colsum, tv);
  out[0] = static_cast<double>(tv);
  for (std::size_t e = 0; e < colsum.size(); ++e) out[e + 1] = static_cast<double>(colsum[e]);
}

/// CPU backend of variance_loss's value(), backward() and value_and_grad() (found by ADL): validates,
/// returns the value and, when `grad` is not null, writes the gradient per `opts`.
template <class T>
double execute(const cpu& be, const variance_loss& loss, const variance_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::check_scalars("variance", loss.cfg.coef, opts, be.threads);
  using Acc = accumulator_t<T>;
  validate_on_host("variance", loss, in, reduced, grad);
  const auto& S = in.scores;
  const index_t T_ = S.rows, E = S.cols;
  const bool tokens = loss.cfg.axis == variance_axis::tokens;

  // T_v and, on the tokens axis, sbar: global with reduced statistics, else this call's.
  double tv = 0;
  std::vector<Acc> sbar;
  if (tokens) {
    sbar.assign(static_cast<std::size_t>(E), Acc(0));
    if (reduced.empty()) {
      std::vector<Acc> colsum;
      index_t n = 0;
      detail::var_column_sums(be, in, colsum, n);
      tv = static_cast<double>(n);
      const Acc inv = n > 0 ? Acc(1) / static_cast<Acc>(n) : Acc(0);
      for (index_t e = 0; e < E; ++e) sbar[static_cast<std::size_t>(e)] = colsum[static_cast<std::size_t>(e)] * inv;
    } else {
      tv = reduced.data[0];
      for (index_t e = 0; e < E; ++e)
        sbar[static_cast<std::size_t>(e)] = tv > 0 ? static_cast<Acc>(reduced.data[e + 1] / tv) : Acc(0);
    }
  } else {
    tv = reduced.empty() ? static_cast<double>(detail::count_valid(in.mask, T_)) : reduced.data[0];
  }
  if (!(tv > 0) || (!tokens && E == 1)) {
    detail::var_zero_grad(be, grad, opts);
    return 0.0;
  }

  const double norm = loss.cfg.reduction == variance_reduction::mean ? 1.0 / tv : 1.0;
  // value = vc * sum_t m_t q_t, gradient = gc * (S[t,e] - center_t,e)
  const double denom = tokens ? static_cast<double>(E) : static_cast<double>(E - 1);
  const Acc vc = static_cast<Acc>(-loss.cfg.coef * norm / denom);
  const Acc gc = static_cast<Acc>(-opts.grad_scale * loss.cfg.coef * 2.0 * norm / denom);
  const index_t nb = detail::num_blocks(T_, detail::cpu_block_rows);
  std::vector<Acc> partial(static_cast<std::size_t>(nb), Acc(0));
  detail::parallel_blocks(be, T_, detail::cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    Acc sum = Acc(0);
    for (index_t t = r0; t < r1; ++t) {
      if (!in.mask(t)) {
        if (grad && !opts.accumulate)
          for (index_t e = 0; e < E; ++e) detail::put_grad((*grad)(t, e), Acc(0), false);
        continue;
      }
      Acc mean = Acc(0);
      if (!tokens) {
        for (index_t e = 0; e < E; ++e) mean += load(S(t, e));
        mean /= static_cast<Acc>(E);
      }
      Acc q = Acc(0);
      for (index_t e = 0; e < E; ++e) {
        const Acc d = load(S(t, e)) - (tokens ? sbar[static_cast<std::size_t>(e)] : mean);
        q += d * d;
        if (grad) detail::put_grad((*grad)(t, e), gc * d, opts.accumulate);
      }
      sum += q;
    }
    partial[static_cast<std::size_t>(b)] = sum;
  });
  return static_cast<double>(vc * detail::pairwise_sum(partial.data(), nb));
}

// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(variance_loss, variance_inputs)

MOEREG_NAMESPACE_END
