// What the Gram-based activation losses (specialization, orthogonality) share as
// descriptions: their inputs' checks, and the protocol by which each describes its per-token
// math to the engines that run it (the CPU Gram engine, backend/cpu/gram_engine.hpp; the CUDA
// Gram kernels, backend/cuda/gram.cuh).
//
// The protocol. A Gram loss's inputs hold activations in a layout, topk, mask and
// num_experts (detail::is_gram_inputs); its statistics are [T_v]. Its header defines, found by
// ADL,
//
//   template <class T, class Layout, class F>
//   decltype(auto) visit_gram_kernel(const Loss&, const Inputs<T, Layout>&, double tv, F&& f);
//
// which calls f(scale, kernel) once and returns what f returns: `scale` multiplies the sum of
// the per-token values (the loss's normalisation for this T_v, 0 when nothing is valid),
// `kernel` is a MOEREG_HOST_DEVICE functor
//
//   Acc kernel(int n, const Acc* G, Acc* W) const;   // Acc = accumulator_t<T>
//
// that, for one token with n >= 2 valid slots and their n x n Gram matrix G (row-major, both
// triangles), returns the token's value F_t and, when W is not null, writes W = D + D^T into
// it (n x n), D = dF_t/dG with the entries of G taken as independent variables (math/pairwise.hpp).
// The engine forms G, scales W by scale * grad_scale and applies it to the activations:
// grad_s = sum_r W[s][r] h_r. A loss with several forms (orthogonality's variants) passes the
// functor of the configured form, so each form is its own instantiation.
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <type_traits>
#include <utility>

#include "../math/pairwise.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

namespace detail {

// ---------------------------------------------------------------------------------------------
// Validation shared by the Gram-based activation losses (core/validate.hpp).

/// Shape checks: finite coef and positive eps; topk [T, k] with 1 <= k <= math::max_slots (and
/// k <= E when E > 0 is given; the activation losses do not need E); the mask; the layouts'
/// own shape checks, their [T, k] against topk and the gradient's against the activations; the
/// size of the reduced statistics.
template <class T, class Layout, class GT>
void check_gram_shapes(const char* who, double coef, double eps, const activation_view<const T, Layout>& x,
                       const topk_view& I, const mask_view& mask, index_t E, const activation_view<GT, Layout>* grad,
                       stats_view reduced) {
  static_assert(is_storage_type_v<T>, "activations must be float, double, moereg::half or moereg::bfloat16");
  require(std::isfinite(coef), who, ": coefficient ", coef, " is not finite");
  require(eps > 0 && std::isfinite(eps), who, ": eps = ", eps, " must be positive and finite");
  require(I.rows >= 0 && I.k >= 0, who, ": topk has a negative size [", I.rows, ", ", I.k, "]");
  require(I.k <= math::max_slots, who, ": topk has k = ", I.k, " columns but at most ", math::max_slots,
          " slots per token are supported (moereg::math::max_slots)");
  require(E >= 0, who, ": num_experts = ", E, " is negative");
  check_topk_shape(who, "topk", I, I.rows, E > 0 ? E : I.k);
  check_mask(who, mask, I.rows);
  validate_layout_shape(who, x.layout);
  require(x.layout.tokens() == I.rows && x.layout.slots() == I.k, who, ": acts layout is [", x.layout.tokens(), ", ",
          x.layout.slots(), ", ", x.layout.dim(), "] but topk is [", I.rows, ", ", I.k, "]");
  require(x.layout.dim() >= 0, who, ": acts has a negative length d = ", x.layout.dim());
  if (grad) {
    const auto& g = grad->layout;
    validate_layout_shape(who, g);
    require(g.tokens() == x.layout.tokens() && g.slots() == x.layout.slots() && g.dim() == x.layout.dim(), who,
            ": grad layout is [", g.tokens(), ", ", g.slots(), ", ", g.dim(), "] but acts is [", x.layout.tokens(),
            ", ", x.layout.slots(), ", ", x.layout.dim(), "]");
  }
  check_stats_shape(who, reduced, 1);
}

/// Content checks on the host: the top-k ids (below E when E > 0, never one expert twice in a
/// row), the layouts' maps (validate()), a vector for every valid slot in the activations and
/// the gradient, and the reduced T_v (a count).
template <class T, class Layout, class GT>
void check_gram_contents(const char* who, const activation_view<const T, Layout>& x, const topk_view& I, index_t E,
                         const activation_view<GT, Layout>* grad, stats_view reduced) {
  check_topk_ids(who, "topk", I, E);
  check_layout_slots(who, "acts", x, I);
  if (grad) check_layout_slots(who, "grad", *grad, I);
  check_stats_values(who, reduced, 1);
}

/// The memory of a Gram-based loss call, by name, for a backend's pointer checks.
template <class T, class Layout, class GT, class F>
void gram_buffers(const activation_view<const T, Layout>& x, const topk_view& I, const mask_view& mask,
                  const activation_view<GT, Layout>* grad, F&& f) {
  f("acts", x.data);
  f("topk", I.data);
  f("mask", mask.data);
  if (grad) f("grad", grad->data);
}

/// T_v of a Gram loss call: the reduced statistics' when given, else this call's count.
inline double gram_tv(const topk_view& I, const mask_view& mask, stats_view reduced) {
  return reduced.empty() ? static_cast<double>(count_valid(mask, I.rows)) : reduced.data[0];
}

/// coef / T_v, and 0 when no token is valid (the value 0, an all-zero gradient).
MOEREG_HOST_DEVICE inline double per_valid_token(double coef, double tv) {
  return tv > 0 ? coef / tv : 0.0;
}

}  // namespace detail

namespace detail {
/// Inputs of a Gram-based loss (specialization, orthogonality): activations in a layout, topk,
/// mask and num_experts.
template <class In, class = void>
struct is_gram_inputs : std::false_type {};
template <class In>
struct is_gram_inputs<
    In, std::void_t<decltype(std::declval<const In&>().acts.layout), decltype(std::declval<const In&>().num_experts)>>
    : std::true_type {};
template <class In>
using enable_gram_inputs = std::enable_if_t<is_gram_inputs<In>::value, int>;
}  // namespace detail

/// Shape checks of a Gram-based loss call (core/validate.hpp), for every backend: the loss's
/// own configuration checks (validate_config), then check_gram_shapes.
template <class Loss, class In, class G, detail::enable_gram_inputs<In> = 0>
void validate_shapes(const char* who, const Loss& loss, const In& in, stats_view reduced, const G* grad) {
  validate_config(who, loss, in);
  detail::check_gram_shapes(who, loss.cfg.coef, loss.cfg.eps, in.acts, in.topk, in.mask, in.num_experts, grad, reduced);
}
/// Content checks of a Gram-based loss call on the host.
template <class Loss, class In, class G, detail::enable_gram_inputs<In> = 0>
void validate_contents(const char* who, const Loss&, const In& in, stats_view reduced, const G* grad) {
  detail::check_gram_contents(who, in.acts, in.topk, in.num_experts, grad, reduced);
}
/// The memory of a Gram-based loss call, by name, for a backend's pointer checks.
template <class In, class G, class F, detail::enable_gram_inputs<In> = 0>
void for_each_buffer(const In& in, const G* grad, F&& f) {
  detail::gram_buffers(in.acts, in.topk, in.mask, grad, f);
}

MOEREG_NAMESPACE_END
