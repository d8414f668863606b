// Router z-loss (ST-MoE, Zoph et al. 2022), LOSSES.md section 2.
//
//   lse_t = log sum_e exp(Z[t,e])                  (max-shifted: finite for |Z| up to 1e4 in float)
//   L     = beta * (1 / T_v) sum_t m_t lse_t^2
//   dL/dZ[t,e] = beta * (2 / T_v) * m_t * lse_t * softmax(Z_t)_e
//
// Statistics: [T_v]. With reduced statistics the 1/T_v is the global one, so a batch split
// into parts gives each part the whole batch's gradient rows, and the parts' values sum to
// the whole batch's value.
//
// Passes over memory (value_and_grad): Z is read once (a row is kept in a small buffer
// while its softmax is formed) and the gradient written once; the mask is read twice.
// Each row is evaluated with Eigen's vectorised exp (row_logsumexp_vec; a strided row is
// gathered first, so every layout gives the same bits).
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#include "../backend/cpu.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "../math/router.hpp"
#include "api.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Configuration of z_loss (LOSSES.md section 2).
struct z_loss_config {
  double coef = 1e-3;  ///< beta
};

struct z_loss;

/// Inputs of z_loss; T is the storage type of Z.
template <class T>
struct z_loss_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = z_loss;  ///< the loss these inputs are for
  using grad_type = matrix_view<T>;  ///< what backward() writes
  static constexpr const char* matrix_name = "logits";  ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_logits";  ///< its gradient, as errors name it
  routing_view<T> logits;  ///< Z [T, E]
  mask_view mask{};        ///< m [T], empty = all valid
  /// The routing matrix (the generic checks of losses/common.hpp read it).
  const routing_view<T>& matrix() const { return logits; }
};
/// Deduces the storage type from the views: `z_loss_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
z_loss_inputs(matrix_view<U>, Rest...) -> z_loss_inputs<std::remove_const_t<U>>;

/// Router z-loss L = beta * (1 / T_v) sum_t m_t lse_t^2 (ST-MoE; LOSSES.md section 2), gradient
/// with respect to the router logits Z.
struct z_loss : loss_api<z_loss, z_loss_config> {
  static constexpr const char* name = "z_loss";  ///< in error messages
  static constexpr index_t stats_counts = 1;  ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const z_loss_inputs<T>&) const {
    return 1;
  }
};

namespace detail {

/// Stable log-sum-exp of one row; `buf` receives exp(z - max) and `sum` their sum, so that
/// softmax(z)_e = buf[e] / sum. The arithmetic is math/router.hpp's, shared with CUDA.
template <class T, class Acc>
MOEREG_FORCEINLINE Acc row_logsumexp(const T* z, index_t n, index_t stride, Acc* buf, Acc& sum) {
  return detail::logsumexp_row<Acc>([z, stride](index_t e) { return load(z[e * stride]); }, n, buf, sum);
}

/// row_logsumexp() of row t, vectorised: the maximum, the exponentials and their sum run on
/// Eigen packets (`buf` must be aligned row scratch, `conv` row scratch when
/// acc_row_converts(Z)). Same formulas as logsumexp_row (lse_shift, lse_term,
/// lse_finish), to a few ulp of the exponential; two exceptions keep the scalar results:
/// terms whose exponential is below the smallest normal number (Eigen clamps the argument of
/// exp there, so exp(-inf) would not be 0) are recomputed with lse_term, and a row whose
/// maximum or log-sum-exp is not finite (an inf or NaN in the row) is redone by
/// row_logsumexp.
template <class T, class Acc = accumulator_t<T>>
Acc row_logsumexp_vec(const matrix_view<const T>& Z, index_t t, Acc* buf, Acc* conv, Acc& sum) {
  const index_t n = Z.cols;
  const Acc* z = acc_row(Z, t, conv);
  const row_array<Acc> zr(z, n);
  const Acc mx = zr.maxCoeff();
  if (!(std::abs(mx) <= std::numeric_limits<Acc>::max())) return row_logsumexp(Z.row(t), n, Z.col_stride, buf, sum);
  const Acc shift = lse_shift(mx);
  scratch_array<Acc> ex(buf, n);
  ex = (zr - shift).exp();
  // log of the smallest normal number: below it Eigen's exp is clamped.
  const Acc normal_floor = std::log(std::numeric_limits<Acc>::min());
  if (zr.minCoeff() - shift < normal_floor)
    for (index_t e = 0; e < n; ++e)
      if (!(z[e] - shift >= normal_floor)) buf[e] = lse_term(z[e], shift);
  const Acc s = ex.sum();
  const Acc lse = lse_finish(shift, s);
  if (!(std::abs(lse) <= std::numeric_limits<Acc>::max())) return row_logsumexp(Z.row(t), n, Z.col_stride, buf, sum);
  sum = s;
  return lse;
}

}  // namespace detail

/// CPU backend of z_loss::local_stats() (found by ADL): validates, then writes the statistics
/// to `out`.
template <class T>
void execute_stats(const cpu& be, const z_loss& loss, const z_loss_inputs<T>& in, double* out) {
  detail::check_scalars("z_loss", loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host("z_loss", loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr));
  out[0] = static_cast<double>(detail::count_valid(in.mask, in.logits.rows));
}

/// CPU backend of z_loss's value(), backward() and value_and_grad() (found by ADL): validates,
/// returns the value and, when `grad` is not null, writes the gradient per `opts`.
template <class T>
double execute(const cpu& be, const z_loss& loss, const z_loss_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::check_scalars("z_loss", loss.cfg.coef, opts, be.threads);
  using Acc = accumulator_t<T>;
  validate_on_host("z_loss", loss, in, reduced, grad);
  const auto& Z = in.logits;
  const index_t T_ = Z.rows, E = Z.cols;
  const double tv = reduced.empty() ? static_cast<double>(detail::count_valid(in.mask, T_)) : reduced.data[0];
  const Acc inv_tv = tv > 0 ? static_cast<Acc>(1.0 / tv) : Acc(0);
  const Acc beta = static_cast<Acc>(loss.cfg.coef);
  const Acc gcoef = static_cast<Acc>(opts.grad_scale) * beta * Acc(2) * inv_tv;
  const index_t nb = detail::num_blocks(T_, detail::cpu_block_rows);
  std::vector<Acc> partial(static_cast<std::size_t>(nb), Acc(0));
  detail::parallel_blocks(be, T_, detail::cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    detail::row_scratch<Acc> buf(static_cast<std::size_t>(E));
    detail::row_scratch<Acc> conv(detail::acc_row_converts(Z) ? static_cast<std::size_t>(E) : 0);
    Acc sum = Acc(0);
    for (index_t t = r0; t < r1; ++t) {
      const bool valid = in.mask(t);
      if (!valid) {
        if (grad && !opts.accumulate)
          for (index_t e = 0; e < E; ++e) detail::put_grad((*grad)(t, e), Acc(0), false);
        continue;
      }
      Acc expsum = Acc(0);
      const Acc lse = detail::row_logsumexp_vec(Z, t, buf.data(), conv.data(), expsum);
      sum += lse * lse;
      if (grad) detail::put_grad_row(*grad, t, detail::z_row_grad_coeff(gcoef, lse, expsum), buf.data(), opts.accumulate);
    }
    partial[static_cast<std::size_t>(b)] = sum;
  });
  return static_cast<double>(beta * inv_tv * detail::pairwise_sum(partial.data(), nb));
}

// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(z_loss, z_loss_inputs)

MOEREG_NAMESPACE_END
