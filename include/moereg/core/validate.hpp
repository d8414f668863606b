// The one validation layer. Every check runs before anything is written, so a call that throws
// leaves the caller's buffers untouched. Two kinds:
//
// - shape checks: sizes, strides, null pointers, configurations. Host-side, O(1) (or O(k) for
//   a layout), backend-neutral: each loss has one validate_shapes(who, loss, in, reduced, grad)
//   in its header, which every backend calls before it dispatches.
// - content checks: top-k ids, sequence offsets, reduced statistics, layout maps. They read the
//   data, so the CPU backend runs them on the host and the CUDA backend in its kernels (reported
//   through the status word).
#pragma once

#include "config.hpp"

#include <cmath>

#include "error.hpp"
#include "layouts.hpp"
#include "types.hpp"
#include "views.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------------------
// Shape checks
// ---------------------------------------------------------------------------------------

/// The one rule for the scalar arguments of every loss, checked before any input is read: a
/// finite coefficient, a finite grad_scale and a thread count of at least 0 (0 = the OpenMP
/// default, 1 = serial, n = n threads).
inline void check_scalars(const char* who, double coef, const grad_options& opts, int threads) {
  require(std::isfinite(coef), who, ": coefficient ", coef, " is not finite");
  require(std::isfinite(opts.grad_scale), who, ": grad_scale = ", opts.grad_scale, " is not finite");
  require(threads >= 0, who, ": cpu::threads = ", threads,
          " is negative (0 = the OpenMP default, 1 = serial, n > 1 = n threads)");
}

/// local_stats(in, out, be) needs a buffer of `size` doubles (stats_size(in)).
inline void check_stats_out(const char* who, const double* out, index_t size) {
  require(out != nullptr || size == 0, who, "::local_stats: out is null but stats_size(in) = ", size);
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

/// A routing matrix [T, E] of a router loss: sound, and E >= 1 unless it has no rows.
template <class T>
void check_routing(const char* who, const char* name, const matrix_view<T>& m) {
  check_matrix(who, name, m);
  require(m.cols >= 1 || m.rows == 0, who, ": ", name, " has E = 0 columns");
}

/// A gradient buffer must have the shape of its input; its strides are its own.
template <class T, class U>
void check_grad(const char* who, const char* name, const matrix_view<T>& g, const matrix_view<U>& in) {
  check_matrix(who, name, g);
  require(g.rows == in.rows && g.cols == in.cols, who, ": ", name, " is [", g.rows, ", ", g.cols,
          "] but its input is [", in.rows, ", ", in.cols, "]");
}

/// topk [rows, k]: rows == T, 1 <= k <= E, a row stride of at least k.
inline void check_topk_shape(const char* who, const char* name, const topk_view& I, index_t T, index_t E) {
  require(I.rows >= 0 && I.k >= 0, who, ": ", name, " has a negative size [", I.rows, ", ", I.k, "]");
  require(I.rows == T, who, ": ", name, " has ", I.rows, " rows but the routing matrix has ", T, " rows");
  require(I.k >= 1, who, ": ", name, " has k = ", I.k, " columns; k must be at least 1");
  require(I.k <= E, who, ": ", name, " has k = ", I.k, " columns but there are only E = ", E, " experts (k > E)");
  require(I.data != nullptr || T == 0, who, ": ", name, " is null but has size [", I.rows, ", ", I.k, "]");
  require(I.row_stride >= I.k || T <= 1, who, ": ", name, " row stride ", I.row_stride, " is smaller than k = ", I.k);
}

inline void check_mask(const char* who, const mask_view& m, index_t T) {
  if (m.all_valid()) return;
  require(m.size == T, who, ": mask has ", m.size, " entries but there are T = ", T, " tokens");
  require(m.stride >= 0, who, ": mask has a negative stride");
}

/// Reduced statistics must have exactly the size this call's local_stats would have.
inline void check_stats_shape(const char* who, const stats_view& s, index_t expected) {
  if (s.empty()) return;
  require(s.size == expected, who, ": reduced statistics have ", s.size, " entries but this call needs ", expected);
}

// ---------------------------------------------------------------------------------------
// Content checks (host memory)
// ---------------------------------------------------------------------------------------

/// Every id of topk is below E (negative = dropped slot) and no row selects an expert twice;
/// E <= 0 checks only the repeats.
inline void check_topk_ids(const char* who, const char* name, const topk_view& I, index_t E) {
  for (index_t t = 0; t < I.rows; ++t)
    for (index_t s = 0; s < I.k; ++s) {
      const index_t e = I(t, s);
      if (e < 0) continue;
      require(E <= 0 || e < E, who, ": ", name, "[", t, ", ", s, "] = ", e, " is out of range [0, ", E, ")");
      for (index_t r = 0; r < s; ++r)
        require(I(t, r) != e, who, ": ", name, " row ", t, " selects expert ", e, " twice (slots ", r, " and ", s, ")");
    }
}

/// check_topk_shape() and check_topk_ids(): the host checks of a top-k view.
inline void check_topk(const char* who, const char* name, const topk_view& I, index_t T, index_t E) {
  check_topk_shape(who, name, I, T, E);
  check_topk_ids(who, name, I, E);
}

/// The values of reduced statistics: every entry finite, and the first `counts` entries
/// (the counts of the loss's statistics layout) non-negative.
inline void check_stats_values(const char* who, const stats_view& s, index_t counts) {
  if (s.empty()) return;
  for (index_t i = 0; i < s.size; ++i) {
    require(std::isfinite(s.data[i]), who, ": reduced statistics entry ", i, " is ", s.data[i],
            "; statistics must be finite");
    require(i >= counts || s.data[i] >= 0.0, who, ": reduced statistics entry ", i, " is ", s.data[i],
            "; it is a count and must be non-negative");
  }
}

/// Reduced statistics on the host: the size this call needs, then their values.
inline void check_stats(const char* who, const stats_view& s, index_t expected, index_t counts) {
  check_stats_shape(who, s, expected);
  check_stats_values(who, s, counts);
}

/// A view in a layout holds a vector for every valid slot of topk: the layout's validate()
/// (its maps included), then offset(t, s) >= 0 wherever I(t, s) >= 0, and a pointer unless no
/// slot is valid or d = 0.
template <class T, class Layout>
void check_layout_slots(const char* who, const char* name, const activation_view<T, Layout>& h, const topk_view& I) {
  h.layout.validate(who);
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

/// Activations on the host: [T, k] agrees with topk, d >= 0, and check_layout_slots().
template <class T, class Layout>
void check_activations(const char* who, const char* name, const activation_view<T, Layout>& h, const topk_view& I) {
  require(h.layout.tokens() == I.rows && h.layout.slots() == I.k, who, ": ", name, " layout is [", h.layout.tokens(),
          ", ", h.layout.slots(), ", ", h.layout.dim(), "] but topk is [", I.rows, ", ", I.k, "]");
  require(h.layout.dim() >= 0, who, ": ", name, " has a negative length d = ", h.layout.dim());
  check_layout_slots(who, name, h, I);
}

}  // namespace detail

/// Every check of one call on the host (the CPU backend): the loss's validate_shapes(), then its
/// validate_contents(), both found by argument-dependent lookup next to the loss.
template <class Loss, class In, class G>
void validate_on_host(const char* who, const Loss& loss, const In& in, stats_view reduced, const G* grad) {
  validate_shapes(who, loss, in, reduced, grad);
  validate_contents(who, loss, in, reduced, grad);
}

MOEREG_NAMESPACE_END
