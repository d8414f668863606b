// Router entropy, LOSSES.md section 7.
//
//   L = eta (1/T_v) sum_t m_t (-sum_e P[t,e] log max(P[t,e], tiny)),   tiny = 1e-30
//   dL/dP[t,e] = eta m_t / T_v * ( -(log P[t,e] + 1)   if P[t,e] > tiny
//                                  -log(tiny)          otherwise: max(P, tiny) is constant there )
//
// eta defaults to 1e-3 (LOSSES.md gives no default; this is the library's choice). A positive
// eta penalises spread-out routing (sharper routers); pass a negative eta to reward entropy.
//
// Statistics (LOSSES.md section 9): [T_v]. With reduced statistics the 1/T_v is global, so a
// batch split into parts gives each part the whole batch's gradient rows, and the parts'
// values sum to the whole batch's value.
//
// Passes over memory (value_and_grad): P read once, the gradient written once. Rows are
// evaluated with Eigen's vectorised log (ent_row_vec; a strided row is gathered first, so
// every layout gives the same bits), element by element only for a subnormal tiny.
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../backend/cpu.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "api.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Configuration of entropy_loss (LOSSES.md section 7).
struct entropy_config {
  double coef = 1e-3;   ///< eta (library default; LOSSES.md gives none)
  double tiny = 1e-30;  ///< floor inside the log
};

struct entropy_loss;

/// Inputs of entropy_loss; T is the storage type of P.
template <class T>
struct entropy_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = entropy_loss;  ///< the loss these inputs are for
  using grad_type = matrix_view<T>;  ///< what backward() writes
  static constexpr const char* matrix_name = "probs";  ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_probs";  ///< its gradient, as errors name it
  routing_view<T> probs;  ///< P [T, E]
  mask_view mask{};       ///< m [T], empty = all valid
  /// The routing matrix (the generic checks of losses/common.hpp read it).
  const routing_view<T>& matrix() const { return probs; }
};
/// Deduces the storage type from the views: `entropy_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
entropy_inputs(matrix_view<U>, Rest...) -> entropy_inputs<std::remove_const_t<U>>;

/// Router entropy L_H = eta * (1 / T_v) sum_t m_t (-sum_e P[t,e] log max(P[t,e], tiny))
/// (LOSSES.md section 7), gradient with respect to P.
struct entropy_loss : loss_api<entropy_loss, entropy_config> {
  static constexpr const char* name = "entropy_loss";  ///< in error messages
  static constexpr index_t stats_counts = 1;  ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const entropy_inputs<T>&) const {
    return 1;
  }
};

/// The configuration checks of entropy_loss (the generic shape checks of losses/common.hpp
/// call them): tiny must be positive and finite in the accumulator type.
template <class T>
void validate_config(const char* who, const entropy_loss& loss, const entropy_inputs<T>&) {
  detail::require(loss.cfg.tiny > 0 && std::isfinite(loss.cfg.tiny) && static_cast<accumulator_t<T>>(loss.cfg.tiny) > 0,
                  who, ": tiny = ", loss.cfg.tiny, " must be positive and finite in the accumulator type");
}

namespace detail {

/// One valid row t, vectorised: returns the row's
/// sum_e P log max(P, tiny) and leaves in `df` the factors d(-P log max(P, tiny))/dP, the
/// expressions of the scalar loop (entropy_elem in math/router.hpp) with the logarithm taken
/// by Eigen's packet log. `df`, `terms` and `conv` are aligned row scratch (`conv` used when
/// acc_row_converts(P)). Entries at or below tiny take log_tiny (computed once by std::log),
/// exactly as in the scalar loop; the caller guarantees that tiny is a normal number, the
/// range where Eigen's log is accurate.
template <class T, class Acc = accumulator_t<T>>
Acc ent_row_vec(const matrix_view<const T>& P, index_t t, Acc tiny, Acc log_tiny, Acc* MOEREG_RESTRICT df,
                Acc* MOEREG_RESTRICT terms, Acc* conv) {
  const index_t n = P.cols;
  const Acc* MOEREG_RESTRICT p = acc_row(P, t, conv);
  scratch_array<Acc>(df, n) = row_array<Acc>(p, n).log();
  // The factor is written -(lp + one) with one = 1 above tiny and 0 below: -(log p + 1) and
  // -(log_tiny + 0) = -log_tiny exactly, the scalar loop's two cases. Selecting only loaded
  // values and constants, with all arithmetic unconditional, lets the compiler vectorise the
  // loop (it does not speculate floating-point arithmetic under -ftrapping-math).
  for (index_t e = 0; e < n; ++e) {
    const Acc pe = p[e], log_pe = df[e];
    const bool above = pe > tiny;
    const Acc lp = above ? log_pe : log_tiny;
    const Acc one = above ? Acc(1) : Acc(0);
    terms[e] = pe * lp;
    df[e] = -(lp + one);
  }
  return scratch_array<Acc>(terms, n).sum();
}

}  // namespace detail

/// CPU backend of entropy_loss::local_stats() (found by ADL): validates, then writes the statistics
/// to `out`.
template <class T>
void execute_stats(const cpu& be, const entropy_loss& loss, const entropy_inputs<T>& in, double* out) {
  detail::check_scalars("entropy", loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host("entropy", loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr));
  out[0] = static_cast<double>(detail::count_valid(in.mask, in.probs.rows));
}

/// CPU backend of entropy_loss's value(), backward() and value_and_grad() (found by ADL): validates,
/// returns the value and, when `grad` is not null, writes the gradient per `opts`.
template <class T>
double execute(const cpu& be, const entropy_loss& loss, const entropy_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::check_scalars("entropy", loss.cfg.coef, opts, be.threads);
  using Acc = accumulator_t<T>;
  validate_on_host("entropy", loss, in, reduced, grad);
  const auto& P = in.probs;
  const index_t T_ = P.rows, E = P.cols;
  const double tv = reduced.empty() ? static_cast<double>(detail::count_valid(in.mask, T_)) : reduced.data[0];
  const bool any = tv > 0;
  const Acc inv_tv = any ? static_cast<Acc>(1.0 / tv) : Acc(0);
  const Acc eta = static_cast<Acc>(loss.cfg.coef);
  const Acc gc = any ? static_cast<Acc>(opts.grad_scale * loss.cfg.coef / tv) : Acc(0);
  const Acc tiny = static_cast<Acc>(loss.cfg.tiny);
  const Acc log_tiny = std::log(tiny);
  const index_t nb = detail::num_blocks(T_, detail::cpu_block_rows);
  std::vector<Acc> partial(static_cast<std::size_t>(nb), Acc(0));
  // Rows take the vectorised path (ent_row_vec) when tiny is a normal number, the scalar
  // loop below otherwise.
  const bool vec_rows = tiny >= std::numeric_limits<Acc>::min();
  detail::parallel_blocks(be, T_, detail::cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    const std::size_t scratch = vec_rows ? static_cast<std::size_t>(E) : 0;
    detail::row_scratch<Acc> df(scratch), terms(scratch), conv(detail::acc_row_converts(P) ? scratch : 0);
    Acc sum = Acc(0);
    for (index_t t = r0; t < r1; ++t) {
      if (!any || !in.mask(t)) {
        if (grad && !opts.accumulate)
          for (index_t e = 0; e < E; ++e) detail::put_grad((*grad)(t, e), Acc(0), false);
        continue;
      }
      if (vec_rows) {
        sum -= detail::ent_row_vec(P, t, tiny, log_tiny, df.data(), terms.data(), conv.data());
        if (grad) detail::put_grad_row(*grad, t, gc, df.data(), opts.accumulate);
        continue;
      }
      for (index_t e = 0; e < E; ++e) {
        const Acc p = load(P(t, e));
        const bool above = p > tiny;
        const Acc lp = above ? std::log(p) : log_tiny;
        sum -= p * lp;
        if (grad) detail::put_grad((*grad)(t, e), gc * (above ? -(lp + Acc(1)) : -log_tiny), opts.accumulate);
      }
    }
    partial[static_cast<std::size_t>(b)] = sum;
  });
  return static_cast<double>(eta * inv_tv * detail::pairwise_sum(partial.data(), nb));
}

// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(entropy_loss, entropy_inputs)

MOEREG_NAMESPACE_END
