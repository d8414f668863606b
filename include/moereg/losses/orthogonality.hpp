// Orthogonality loss (Guo, Lu, Nan et al., "Advancing Expert Specialization for Better MoE",
// NeurIPS 2025, L_o), LOSSES.md section 5.
//
//   h_{t,s}  output of expert I[t,s] on token t (model width), before the gate weight, in any
//            activation layout
//
// variant = pairwise (the paper's formula), for valid slots j != s of token t:
//   term_{t,j,s} = || (<h_{t,j}, h_{t,s}> / (<h_{t,s}, h_{t,s}> + eps)) h_{t,s} ||^2
//                = <h_{t,j}, h_{t,s}>^2 ||h_{t,s}||^2 / (||h_{t,s}||^2 + eps)^2
//   L = beta * (1 / T_v) sum_t m_t sum_{j != s in A_t} term_{t,j,s}
//
// variant = subspace (the idea of the authors' released code): each output is projected onto
// the span of the token's other valid outputs X_j (d x (|A_t| - 1)), G_j = X_j^T X_j:
//   term_{t,j} = || X_j (G_j + eps I)^{-1} X_j^T h_{t,j} ||^2
//   L = beta * (1 / T_v) sum_t m_t (1 / k) sum_{j in A_t} term_{t,j}
// with k the configured top-k width (config k, 0 = the number of topk columns). The small
// (|A_t| - 1)-sized systems are solved by an L D L^T factorisation (pivots clamped at eps)
// and the exact derivative flows through the basis X_j as well
// (math::orthogonality_subspace_token).
//
// reduction = sum drops the 1/T_v (the paper sums over tokens). Tokens with fewer than 2 valid
// slots contribute 0. eps default 1e-6 (must be positive), beta default 1e-4.
//
// Slots: (t, s) is valid iff topk(t, s) >= 0 and token t is unmasked. topk may have at most
// math::max_slots = 16 columns; a wider topk is rejected with moereg::error.
//
// Statistics (LOSSES.md section 9): [T_v], one entry. The only global quantity is T_v (for
// reduction = mean); with reduced statistics the 1/T_v is the global one, so a batch split
// into parts gives each part exactly the whole batch's gradient rows, and the parts' values
// sum to the whole value. With reduction = sum nothing is global: the statistics are still
// accepted (and checked) but not needed.
//
// Gradient: written through the grad view's own layout, as for the specialization loss
// (overwrite mode zeroes the vectors of masked tokens, dropped slots and tokens with fewer than
// 2 valid slots; accumulate mode leaves them untouched; unmapped storage is never touched; the
// gradient buffer must not overlap the activations).
//
// Passes over memory (value_and_grad): activations read once, gradient written once. Per
// token, the Gram pass reads the token's valid vectors once; the gradient pass re-reads them
// from cache and writes each gradient vector once (backend/cpu/gram_engine.hpp, including its
// non-temporal stores for gradients of 32 MiB or more).
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <type_traits>
#include <vector>

#include "../math/pairwise.hpp"
#include "common.hpp"
#include "gram.hpp"

MOEREG_NAMESPACE_BEGIN

/// Which form of the orthogonality loss (LOSSES.md section 5).
enum class ortho_variant {
  pairwise,  ///< the paper's pairwise projection terms
  subspace,  ///< projection onto the span of the other outputs (the authors' code)
};

/// Outer normalisation of the orthogonality loss.
enum class ortho_reduction {
  mean,  ///< divided by T_v
  sum,   ///< summed over tokens (the paper)
};

/// Configuration of orthogonality_loss (LOSSES.md section 5).
struct orthogonality_config {
  double coef = 1e-4;                                 ///< beta
  double eps = 1e-6;                                  ///< must be positive
  ortho_variant variant = ortho_variant::pairwise;    ///< pairwise (default) or subspace
  ortho_reduction reduction = ortho_reduction::mean;  ///< mean over T_v (default) or sum
  index_t k = 0;                                      ///< subspace: the k of the 1/k; 0 = the number of topk columns
};

struct orthogonality_loss;

/// Inputs of orthogonality_loss; T is the storage type, Layout the activation layout policy.
template <class T, class Layout>
struct orthogonality_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = orthogonality_loss;          ///< the loss these inputs are for
  using grad_type = activation_view<T, Layout>;  ///< what backward() writes
  activation_view<const T, Layout> acts;         ///< h_{t,s}, tokens() = T, slots() = k, dim() = d
  topk_view topk;                                ///< I [T, k]; negative = dropped slot
  mask_view mask{};                              ///< m [T], empty = all valid
  index_t num_experts = 0;                       ///< E, only to validate topk (ids < E, k <= E); 0 = unknown
};
/// Deduces the storage type from the views: `orthogonality_inputs{view(x), ...}` needs no template argument.
template <class U, class Layout, class... Rest>
orthogonality_inputs(activation_view<U, Layout>, Rest...) -> orthogonality_inputs<std::remove_const_t<U>, Layout>;

/// Orthogonality loss L_o = beta * (1 / T_v) sum_t m_t sum_{j != s} term_{t,j,s} (Guo et al. 2025;
/// LOSSES.md section 5), gradient with respect to the expert outputs h.
struct orthogonality_loss : loss_api<orthogonality_loss, orthogonality_config> {
  static constexpr const char* name = "orthogonality_loss";  ///< in error messages
  static constexpr const char* label = "orthogonality";      ///< prefix of the CPU backend's error messages
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T, class Layout>
  index_t stats_size(const orthogonality_inputs<T, Layout>&) const {
    return 1;
  }
};

namespace detail {
/// The configuration checks of orthogonality_loss (also run by the fused CUDA Gram call).
inline void check_ortho_config(const char* who, const orthogonality_config& c) {
  require(c.k >= 0, who, ": config k = ", c.k, " is negative");
  require(c.variant == ortho_variant::pairwise || c.variant == ortho_variant::subspace, who, ": unknown variant");
  require(c.reduction == ortho_reduction::mean || c.reduction == ortho_reduction::sum, who, ": unknown reduction");
}
}  // namespace detail

/// The configuration checks of orthogonality_loss, run by the Gram losses' shape checks
/// (specialization.hpp) on every backend.
template <class T, class Layout>
void validate_config(const char* who, const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>&) {
  detail::check_ortho_config(who, loss.cfg);
}

/// The per-token kernel of the pairwise orthogonality loss (losses/gram.hpp).
template <class Acc>
struct orthogonality_pairwise_kernel {
  Acc eps;  ///< norm clamp
  /// F_t of a token with n valid slots and Gram matrix G; W (when not null) receives dF_t/dG + its transpose.
  MOEREG_HOST_DEVICE Acc operator()(int n, const Acc* G, Acc* W) const {
    return math::orthogonality_pairwise_token(n, G, eps, W);
  }
};
/// The per-token kernel of the subspace orthogonality loss (losses/gram.hpp).
template <class Acc>
struct orthogonality_subspace_kernel {
  Acc eps;  ///< norm clamp
  /// F_t of a token with n valid slots and Gram matrix G; W (when not null) receives dF_t/dG + its transpose.
  MOEREG_HOST_DEVICE Acc operator()(int n, const Acc* G, Acc* W) const {
    return math::orthogonality_subspace_token(n, G, eps, W);
  }
};

/// The scale of orthogonality_loss's per-token sum: beta, over T_v for the mean reduction,
/// over k for the subspace variant (k = the config's k, or the number of topk columns).
MOEREG_HOST_DEVICE inline double orthogonality_scale(const orthogonality_config& c, index_t topk_cols, double tv) {
  double scale = c.reduction == ortho_reduction::mean ? detail::per_valid_token(c.coef, tv) : c.coef;
  if (c.variant == ortho_variant::subspace) scale /= static_cast<double>(c.k > 0 ? c.k : topk_cols);
  return scale;
}

/// orthogonality_loss as a Gram loss (losses/gram.hpp): the configured variant's kernel.
template <class T, class Layout, class F>
decltype(auto) visit_gram_kernel(const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in, double tv,
                                 F&& f) {
  using Acc = accumulator_t<T>;
  const double scale = orthogonality_scale(loss.cfg, in.topk.k, tv);
  const Acc eps = static_cast<Acc>(loss.cfg.eps);
  if (loss.cfg.variant == ortho_variant::pairwise) return f(scale, orthogonality_pairwise_kernel<Acc>{eps});
  return f(scale, orthogonality_subspace_kernel<Acc>{eps});
}

MOEREG_NAMESPACE_END
