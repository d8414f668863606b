// What the loss descriptions share: the valid-token count, the statistics a row kernel is
// prepared from, and the generic checks of the losses on one routing matrix (the checks
// themselves are in core/validate.hpp). Every loss header includes this file: it brings the
// core views, layouts, errors and checks and the one front end (api.hpp), so a loss header
// adds only its own math/ header.
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/layouts.hpp"
#include "../core/types.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"
#include "api.hpp"

MOEREG_NAMESPACE_BEGIN

/// This call's statistics of a row kernel (backend/cpu/row_engine.hpp), from pass 1: the
/// valid-token count, the kernel's column sums (sum_width) and counts (count_width).
template <class Acc>
struct row_local {
  index_t tv = 0;                   ///< valid tokens of this call
  const Acc* sums = nullptr;        ///< the kernel's sum_width column sums
  const index_t* counts = nullptr;  ///< the kernel's count_width counts
};
namespace detail {

/// Number of valid tokens, T_v = sum_t m_t.
inline index_t count_valid(const mask_view& m, index_t T) {
  if (m.all_valid()) return T;
  index_t n = 0;
  for (index_t t = 0; t < T; ++t) n += m(t) ? 1 : 0;
  return n;
}

/// The row pass of a row kernel whose value is fixed by its statistics and whose gradient is
/// one coefficient per column for every valid row (load balancing, importance): the matrix is
/// not read again, rows run only for a gradient. The kernel's prepare() sets value and coeff.
template <class Acc>
struct per_column_rows {
  bool reads_row = false;  ///< the row pass does not read the matrix
  Acc value = Acc(0);      ///< the loss, from prepare()
  std::vector<Acc> coeff;  ///< dL/dX[t,e] of a valid row, from prepare()

  bool wants_rows(bool grad) const { return grad; }
  template <class Ops>
  Acc row(index_t, const Acc*, Acc* g, Ops& ops) const {
    if (g != nullptr)
      ops.put(g, static_cast<index_t>(coeff.size()), [&](index_t e) { return coeff[static_cast<std::size_t>(e)]; });
    return Acc(0);
  }
  double finish(Acc) const { return static_cast<double>(value); }
};

/// Inputs of a loss on one routing matrix [T, E] and a mask (the z-loss, entropy, variance and
/// importance): they name the matrix (matrix_name, grad_name) and return it (matrix()).
template <class In, class = void>
struct is_matrix_inputs : std::false_type {};
template <class In>
struct is_matrix_inputs<In, std::void_t<decltype(In::matrix_name)>> : std::true_type {};
template <class In>
using enable_matrix_inputs = std::enable_if_t<is_matrix_inputs<In>::value, int>;

}  // namespace detail

/// A loss's own configuration checks; none unless the loss defines an overload (entropy,
/// variance), which argument-dependent lookup prefers.
template <class Loss, class In>
void validate_config(const char*, const Loss&, const In&) {}

/// Shape checks of a loss on one routing matrix and a mask (core/validate.hpp), every backend:
/// its configuration, the matrix (E >= 1 unless T = 0), the mask, the gradient's shape and the
/// size of the reduced statistics.
template <class Loss, class In, class G, detail::enable_matrix_inputs<In> = 0>
void validate_shapes(const char* who, const Loss& loss, const In& in, stats_view reduced, const G* grad) {
  validate_config(who, loss, in);
  const auto& m = in.matrix();
  detail::check_routing(who, In::matrix_name, m);
  detail::check_mask(who, in.mask, m.rows);
  if (grad) detail::check_grad(who, In::grad_name, *grad, m);
  detail::check_stats_shape(who, reduced, loss.stats_size(in));
}
/// Content checks on the host: the reduced statistics are finite, their first
/// Loss::stats_counts entries (counts) non-negative.
template <class Loss, class In, class G, detail::enable_matrix_inputs<In> = 0>
void validate_contents(const char* who, const Loss&, const In&, stats_view reduced, const G*) {
  detail::check_stats_values(who, reduced, Loss::stats_counts);
}
/// The memory of the call, by name, for a backend's pointer checks.
template <class In, class G, class F, detail::enable_matrix_inputs<In> = 0>
void for_each_buffer(const In& in, const G* grad, F&& f) {
  f(In::matrix_name, in.matrix().data);
  f("mask", in.mask.data);
  if (grad) f(In::grad_name, grad->data);
}

MOEREG_NAMESPACE_END
