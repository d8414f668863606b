// Intra-layer specialization loss (Hu et al., "Synergistic Intra- and Cross-Layer
// Regularization Losses for MoE Expert Specialization", R_sp), LOSSES.md section 3.
//
//   h_{t,s}   SwiGLU intermediate activation of expert I[t,s] on token t (the d_ff-long input
//             of the down projection, before the gate weight), in any activation layout
//   n_{t,s}   = max(||h_{t,s}||, eps)                           (eps default 1e-8)
//   c_{t,s,r} = <h_{t,s}, h_{t,r}> / (n_{t,s} n_{t,r})
//   L         = lambda * (1 / T_v) sum_t m_t w_t sum_{s != r in A_t} c_{t,s,r}^2
//
// Ordered pairs (each unordered pair counts twice), w_t = 1; with pairs = mean,
// w_t = 1 / (|A_t| (|A_t| - 1)). Tokens with fewer than 2 valid slots contribute 0. The
// gradient flows to every valid h_{t,s}; where ||h|| < eps the norm is the constant eps.
// lambda default 2e-3 (the paper's pre-training value). The per-token math (value and the
// k x k derivative with respect to the Gram matrix) is math::specialization_token.
//
// Slots: (t, s) is valid iff topk(t, s) >= 0 and token t is unmasked. topk may have at most
// math::max_slots = 16 columns; a wider topk is rejected with moereg::error. The expert ids
// are only validated (no repeats in a row; < num_experts when num_experts > 0).
//
// Statistics (LOSSES.md section 9): [T_v], one entry. The only global quantity is T_v; with
// reduced statistics the 1/T_v is the global one, so a batch split into parts gives each part
// exactly the whole batch's gradient rows, and the parts' values sum to the whole value.
//
// Gradient: written through the grad view's own layout (same policy type as the input, its
// own maps and strides). Overwrite mode writes zeros into every vector the grad layout holds
// for a masked token, a dropped slot, or a token with fewer than 2 valid slots; accumulate
// mode leaves those untouched. Storage the layout maps to no (token, slot) is never touched.
// The gradient buffer must not overlap the activations.
//
// Passes over memory (value_and_grad): activations read once, gradient written once
// (backend/cpu/gram_engine.hpp says how).
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <type_traits>

#include "../core/layouts.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "../math/pairwise.hpp"
#include "api.hpp"
#include "gram.hpp"

MOEREG_NAMESPACE_BEGIN

/// How the pair sum of one token is normalised.
enum class sp_pairs {
  sum,   ///< sum over ordered pairs (the paper)
  mean,  ///< divided by |A_t| (|A_t| - 1)
};

/// Configuration of specialization_loss (LOSSES.md section 3).
struct specialization_config {
  double coef = 2e-3;              ///< lambda
  double eps = 1e-8;               ///< norm clamp; must be positive
  sp_pairs pairs = sp_pairs::sum;  ///< sum over ordered pairs (default) or mean
};

struct specialization_loss;

/// Inputs of specialization_loss; T is the storage type, Layout the activation layout policy.
template <class T, class Layout>
struct specialization_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = specialization_loss;         ///< the loss these inputs are for
  using grad_type = activation_view<T, Layout>;  ///< what backward() writes
  activation_view<const T, Layout> acts;         ///< h_{t,s}, tokens() = T, slots() = k, dim() = d
  topk_view topk;                                ///< I [T, k]; negative = dropped slot
  mask_view mask{};                              ///< m [T], empty = all valid
  index_t num_experts = 0;                       ///< E, only to validate topk (ids < E, k <= E); 0 = unknown
};
/// Deduces the storage type from the views: `specialization_inputs{view(x), ...}` needs no template argument.
template <class U, class Layout, class... Rest>
specialization_inputs(activation_view<U, Layout>, Rest...) -> specialization_inputs<std::remove_const_t<U>, Layout>;

/// Intra-layer specialization loss L = lambda * (1 / T_v) sum_t m_t sum_{s != r} c_{t,s,r}^2
/// (Hu et al. 2026, R_sp; LOSSES.md section 3), gradient with respect to the activations h.
struct specialization_loss : loss_api<specialization_loss, specialization_config> {
  static constexpr const char* name = "specialization_loss";  ///< in error messages
  static constexpr const char* label = "specialization";      ///< prefix of the CPU backend's error messages
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T, class Layout>
  index_t stats_size(const specialization_inputs<T, Layout>&) const {
    return 1;
  }
};

/// The per-token kernel of specialization_loss (losses/gram.hpp): math::specialization_token.
template <class Acc>
struct specialization_kernel {
  Acc eps;    ///< norm clamp
  bool mean;  ///< pairs = mean
  /// F_t of a token with n valid slots and Gram matrix G; W (when not null) receives dF_t/dG + its transpose.
  MOEREG_HOST_DEVICE Acc operator()(int n, const Acc* G, Acc* W) const {
    return math::specialization_token(n, G, eps, mean, W);
  }
};

/// specialization_loss as a Gram loss (losses/gram.hpp): scale lambda / T_v.
template <class T, class Layout, class F>
decltype(auto) visit_gram_kernel(const specialization_loss& loss, const specialization_inputs<T, Layout>&, double tv,
                                 F&& f) {
  using Acc = accumulator_t<T>;
  return f(detail::per_valid_token(loss.cfg.coef, tv),
           specialization_kernel<Acc>{static_cast<Acc>(loss.cfg.eps), loss.cfg.pairs == sp_pairs::mean});
}

MOEREG_NAMESPACE_END
