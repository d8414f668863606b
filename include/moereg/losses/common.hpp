// Validation shared by the losses. Every check runs before anything is written, so a call
// that throws leaves the caller's buffers untouched.
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <vector>

#include "../core/error.hpp"
#include "../core/layouts.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

/// The one rule for the scalar arguments of every loss, checked before any input is read: a
/// finite coefficient, a finite grad_scale and a thread count of at least 0 (0 = the OpenMP
/// default, 1 = serial, n = n threads).
inline void check_scalars(const char* who, double coef, const grad_options& opts, int threads) {
  require(std::isfinite(coef), who, ": coefficient ", coef, " is not finite");
  require(std::isfinite(opts.grad_scale), who, ": grad_scale = ", opts.grad_scale, " is not finite");
  require(threads >= 0, who, ": cpu::threads = ", threads,
          " is negative (0 = the OpenMP default, 1 = serial, n > 1 = n threads)");
}

template <class T>
void check_matrix(const char* who, const char* name, const matrix_view<T>& m) {
  require(m.rows >= 0 && m.cols >= 0, who, ": ", name, " has a negative size [", m.rows, ", ", m.cols, "]");
  require(m.data != nullptr || m.rows * m.cols == 0, who, ": ", name, " is null but has size [", m.rows, ", ", m.cols,
          "]");
  require(m.row_stride >= 0 && m.col_stride >= 0, who, ": ", name, " has a negative stride");
  require(m.is_unique(), who, ": ", name, " [", m.rows, ", ", m.cols, "] with row stride ", m.row_stride,
          " and column stride ", m.col_stride, " has overlapping rows or columns; every element needs its own storage");
}

/// A gradient buffer must have the shape of its input; its strides are its own.
template <class T, class U>
void check_grad(const char* who, const char* name, const matrix_view<T>& g, const matrix_view<U>& in) {
  check_matrix(who, name, g);
  require(g.rows == in.rows && g.cols == in.cols, who, ": ", name, " is [", g.rows, ", ", g.cols,
          "] but its input is [", in.rows, ", ", in.cols, "]");
}

/// topk [rows, k]: rows == T, 1 <= k <= E, every index < E, no repeated index in a row.
inline void check_topk(const char* who, const char* name, const topk_view& I, index_t T, index_t E) {
  require(I.rows >= 0 && I.k >= 0, who, ": ", name, " has a negative size [", I.rows, ", ", I.k, "]");
  require(I.rows == T, who, ": ", name, " has ", I.rows, " rows but the routing matrix has ", T, " rows");
  require(I.k >= 1, who, ": ", name, " has k = ", I.k, " columns; k must be at least 1");
  require(I.k <= E, who, ": ", name, " has k = ", I.k, " columns but there are only E = ", E, " experts (k > E)");
  require(I.data != nullptr || T == 0, who, ": ", name, " is null but has size [", I.rows, ", ", I.k, "]");
  require(I.row_stride >= I.k || T <= 1, who, ": ", name, " row stride ", I.row_stride, " is smaller than k = ", I.k);
  for (index_t t = 0; t < T; ++t)
    for (index_t s = 0; s < I.k; ++s) {
      const index_t e = I(t, s);
      if (e < 0) continue;
      require(e < E, who, ": ", name, "[", t, ", ", s, "] = ", e, " is out of range [0, ", E, ")");
      for (index_t r = 0; r < s; ++r)
        require(I(t, r) != e, who, ": ", name, " row ", t, " selects expert ", e, " twice (slots ", r, " and ", s, ")");
    }
}

inline void check_mask(const char* who, const mask_view& m, index_t T) {
  if (m.all_valid()) return;
  require(m.size == T, who, ": mask has ", m.size, " entries but there are T = ", T, " tokens");
  require(m.stride >= 0, who, ": mask has a negative stride");
}

/// Reduced statistics must have exactly the size this call's local_stats would have.
inline void check_stats(const char* who, const stats_view& s, index_t expected) {
  if (s.empty()) return;
  require(s.size == expected, who, ": reduced statistics have ", s.size, " entries but this call needs ", expected);
  for (index_t i = 0; i < s.size; ++i)
    require(std::isfinite(s.data[i]) && s.data[i] >= 0.0, who, ": reduced statistics entry ", i, " is ", s.data[i],
            "; counts must be finite and non-negative");
}

/// Activations: shape agrees with topk, every valid slot has a vector, the layout is sound.
template <class T, class Layout>
void check_activations(const char* who, const char* name, const activation_view<T, Layout>& h, const topk_view& I) {
  h.layout.validate(who);
  require(h.layout.tokens() == I.rows && h.layout.slots() == I.k, who, ": ", name, " layout is [",
          h.layout.tokens(), ", ", h.layout.slots(), ", ", h.layout.dim(), "] but topk is [", I.rows, ", ", I.k, "]");
  require(h.layout.dim() >= 0, who, ": ", name, " has a negative length d = ", h.layout.dim());
  bool any = false;
  for (index_t t = 0; t < I.rows; ++t)
    for (index_t s = 0; s < I.k; ++s) {
      if (I(t, s) < 0) continue;
      any = true;
      require(h.layout.offset(t, s) >= 0, who, ": ", name, " layout has no vector for the valid slot (", t, ", ", s,
              ")");
    }
  require(h.data != nullptr || !any || h.layout.dim() == 0, who, ": ", name, " is null but has valid slots");
}

/// Number of valid tokens, T_v = sum_t m_t.
inline index_t count_valid(const mask_view& m, index_t T) {
  if (m.all_valid()) return T;
  index_t n = 0;
  for (index_t t = 0; t < T; ++t) n += m(t) ? 1 : 0;
  return n;
}

}  // namespace detail
MOEREG_NAMESPACE_END
