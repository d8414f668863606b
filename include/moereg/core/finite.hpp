// Opt-in checks for non-finite inputs (NaN, +-Inf).
//
// The losses themselves do not look at the values they read: a NaN or an Inf in an input
// propagates into the value and the gradient the way IEEE arithmetic carries it, and a call
// never crashes or reads out of bounds because of it (docs/hardening.md). A caller that
// would rather stop at the first bad number runs these checks on its inputs before the
// loss; they throw moereg::error naming the input and the first bad position (row-major
// order for matrices, token / slot / element order for activations) and write nothing.
//
//   moereg::check_finite("probs", probs);                    // matrix_view<const T>
//   moereg::check_finite("acts", acts, topk);                // activation_view, dropped slots skipped
//   if (auto p = moereg::find_nonfinite(logits)) { ... }     // no throw: the position or nullopt
//
// Cost: one read of the checked buffer (the loss reads it again).
#pragma once

#include "config.hpp"

#include <cmath>
#include <optional>

#include "error.hpp"
#include "layouts.hpp"
#include "types.hpp"
#include "views.hpp"

MOEREG_NAMESPACE_BEGIN

/// Where a non-finite value was found. For a matrix, (row, col) and elem = 0; for an
/// activation view, (token, slot) in row/col and the element of the vector in elem.
struct nonfinite_position {
  index_t row = 0;     ///< row (matrix) or token (activations)
  index_t col = 0;     ///< column (matrix) or slot (activations)
  index_t elem = 0;    ///< element inside the vector h_{t,s} (0 for a matrix)
  double value = 0.0;  ///< the offending value (NaN, +inf or -inf)
};

namespace detail {

template <class T>
bool finite_value(const T& x, double& as_double) {
  const auto v = load(x);
  as_double = static_cast<double>(v);
  return std::isfinite(v);
}

template <class T>
void require_sound_matrix(const char* who, const char* name, const matrix_view<T>& m) {
  require(m.rows >= 0 && m.cols >= 0, who, ": ", name, " has a negative size [", m.rows, ", ", m.cols, "]");
  require(m.data != nullptr || m.rows == 0 || m.cols == 0, who, ": ", name, " is null but has size [", m.rows, ", ",
          m.cols, "]");
  require(m.row_stride >= 0 && m.col_stride >= 0, who, ": ", name, " has a negative stride");
}

inline const char* nonfinite_kind(double v) {
  return std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
}

}  // namespace detail

/// The first non-finite entry of `m` in row-major order, or nullopt. Throws moereg::error
/// for a malformed view (negative size or stride, null data with a non-empty shape).
template <class T>
std::optional<nonfinite_position> find_nonfinite(const matrix_view<T>& m, const char* name = "matrix") {
  detail::require_sound_matrix("find_nonfinite", name, m);
  for (index_t i = 0; i < m.rows; ++i)
    for (index_t j = 0; j < m.cols; ++j) {
      double v = 0.0;
      if (!detail::finite_value(m(i, j), v)) return nonfinite_position{i, j, 0, v};
    }
  return std::nullopt;
}

/// The first non-finite element of an activation view, in (token, slot, element) order, or
/// nullopt. Slots where the layout holds no vector are skipped; with a non-empty `topk`
/// ([T, k], the loss's selection) slots with a negative expert (dropped) are skipped too,
/// since no loss reads them. Throws moereg::error for an inconsistent layout or topk.
template <class T, class Layout>
std::optional<nonfinite_position> find_nonfinite(const activation_view<T, Layout>& h, const topk_view& topk = {},
                                                 const char* name = "activations") {
  const char* who = "find_nonfinite";
  h.layout.validate(who);
  const index_t T_ = h.layout.tokens(), k = h.layout.slots(), d = h.layout.dim();
  const bool have_topk = topk.data != nullptr;
  if (have_topk) {
    detail::require(topk.rows == T_ && topk.k == k, who, ": ", name, " layout is [", T_, ", ", k, ", ", d,
                    "] but topk is [", topk.rows, ", ", topk.k, "]");
    detail::require(topk.row_stride >= topk.k || topk.rows <= 1, who, ": topk row stride ", topk.row_stride,
                    " is smaller than k = ", topk.k);
  }
  const index_t es = h.layout.stride();
  for (index_t t = 0; t < T_; ++t)
    for (index_t s = 0; s < k; ++s) {
      if (have_topk && topk(t, s) < 0) continue;
      const T* x = h.vector(t, s);
      if (x == nullptr) continue;
      for (index_t i = 0; i < d; ++i) {
        double v = 0.0;
        if (!detail::finite_value(x[i * es], v)) return nonfinite_position{t, s, i, v};
      }
    }
  return std::nullopt;
}

/// Throws moereg::error "check_finite: NAME[i, j] is nan" at the first non-finite entry.
template <class T>
void check_finite(const char* name, const matrix_view<T>& m) {
  if (const auto p = find_nonfinite(m, name))
    throw error(detail::concat("check_finite: ", name, "[", p->row, ", ", p->col, "] is ",
                               detail::nonfinite_kind(p->value), " (the first non-finite entry in row-major order)"));
}

/// Throws moereg::error "check_finite: NAME(token t, slot s)[i] is inf" at the first
/// non-finite element of a slot the loss reads (see find_nonfinite for which ones).
template <class T, class Layout>
void check_finite(const char* name, const activation_view<T, Layout>& h, const topk_view& topk = {}) {
  if (const auto p = find_nonfinite(h, topk, name))
    throw error(detail::concat("check_finite: ", name, "(token ", p->row, ", slot ", p->col, ")[", p->elem, "] is ",
                               detail::nonfinite_kind(p->value), " (the first non-finite element)"));
}

MOEREG_NAMESPACE_END
