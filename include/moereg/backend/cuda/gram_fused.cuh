// Fused CUDA entry point of the Gram-based losses on the same activations: intra-layer
// specialization and orthogonality in one run of the Gram engine (gram.cuh).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
//   moereg::gram_fused f{&sp, &orth};
//   f.value_and_grad(in, grad, opts, {}, be);   // be.value[0] = specialization, [1] = orthogonality
//
// Per token the Gram matrix is formed once, both token functions run on it, their W
// matrices are combined (each scaled by its loss's scale and grad_scale) and one gradient pass
// writes the sum of both gradients: the activations are read twice and the gradient written
// once for both losses, instead of twice and twice (with read-modify-write) for two calls.
// The result equals the sum of the two calls up to rounding. Each loss keeps its coefficient,
// eps, options and reduced statistics; both share the activations, topk, mask, num_experts
// and grad_options.
//
// Note (LOSSES.md): the papers apply R_sp to the SwiGLU intermediate activations and L_o to
// the expert outputs; fusing them requires one tensor for both, which is the caller's choice.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <cstddef>

#include "core.cuh"
#include "gram.cuh"

MOEREG_NAMESPACE_BEGIN

/// The shared inputs: activations, topk, mask, num_experts (the specialization loss's inputs).
template <class T, class Layout>
using gram_fused_inputs = specialization_inputs<T, Layout>;

/// Reduced statistics (device) per loss; empty = local.
struct gram_fused_reduced {
  /// One view per loss (one double each).
  ///@{
  stats_view specialization{}, orthogonality{};
  ///@}
};

/// Local statistics outputs (device), one double each; null = not wanted.
struct gram_fused_stats_out {
  double* specialization = nullptr;  ///< specialization_loss statistics
  double* orthogonality = nullptr;   ///< orthogonality_loss statistics
};

/// The specialization and orthogonality losses on one set of activations in one pass (CUDA),
/// sharing the per-token Gram matrix. Pointers to the losses (null = absent).
struct gram_fused {
  const specialization_loss* specialization = nullptr;  ///< null = absent
  const orthogonality_loss* orthogonality = nullptr;    ///< null = absent

  /// Index of each loss's value in be.value[], and their number.
  ///@{
  static constexpr int slot_specialization = 0, slot_orthogonality = 1, slots = 2;
  ///@}

  /// Bytes of workspace value_and_grad, value and local_stats need for these inputs.
  template <class T, class Layout>
  std::size_t workspace_size(const specialization_inputs<T, Layout>& in, const cuda& = {}) const {
    return detail::cuda_gram::required_bytes(request(in, static_cast<const activation_view<T, Layout>*>(nullptr)));
  }

  /// Values into be.value[slot], the summed gradient into `grad` (through its layout).
  template <class T, class Layout>
  void value_and_grad(const specialization_inputs<T, Layout>& in, activation_view<T, Layout> grad,
                      grad_options opts = {}, const gram_fused_reduced& reduced = {}, const cuda& be = {}) const {
    run(in, &grad, opts, reduced, gram_fused_stats_out{}, false, be);
  }

  /// The values only, into be.value[slot].
  template <class T, class Layout>
  void value(const specialization_inputs<T, Layout>& in, const gram_fused_reduced& reduced = {},
             const cuda& be = {}) const {
    run(in, static_cast<const activation_view<T, Layout>*>(nullptr), grad_options{}, reduced, gram_fused_stats_out{},
        false, be);
  }

  /// Every present loss's local statistics into its output (device), in one run.
  template <class T, class Layout>
  void local_stats(const specialization_inputs<T, Layout>& in, const gram_fused_stats_out& out,
                   const cuda& be = {}) const {
    run(in, static_cast<const activation_view<T, Layout>*>(nullptr), grad_options{}, gram_fused_reduced{}, out, true,
        be);
  }

 private:
  template <class T, class Layout>
  detail::cuda_gram::request<T, Layout> request(const specialization_inputs<T, Layout>& in,
                                                const activation_view<T, Layout>* grad) const {
    detail::cuda_gram::request<T, Layout> rq;
    rq.acts = in.acts;
    rq.topk = in.topk;
    rq.mask = in.mask;
    rq.num_experts = in.num_experts;
    rq.grad = grad;
    rq.sp = specialization;
    rq.orth = orthogonality;
    return rq;
  }

  template <class T, class Layout>
  void run(const specialization_inputs<T, Layout>& in, const activation_view<T, Layout>* grad, grad_options opts,
           const gram_fused_reduced& reduced, const gram_fused_stats_out& out, bool stats_mode, const cuda& be) const {
    const char* who = "gram_fused (cuda)";
    detail::require(specialization != nullptr || orthogonality != nullptr, who, ": no loss given");
    auto rq = request(in, grad);
    if (specialization != nullptr)
      detail::cuda_gram::validate(who, specialization->cfg.coef, specialization->cfg.eps, rq, reduced.specialization,
                                  be);
    if (orthogonality != nullptr) {
      detail::check_ortho_config(who, orthogonality->cfg);
      detail::cuda_gram::validate(who, orthogonality->cfg.coef, orthogonality->cfg.eps, rq, reduced.orthogonality, be);
    }
    rq.opts = opts;
    rq.stats_mode = stats_mode;
    rq.io[slot_specialization].reduced = reduced.specialization;
    rq.io[slot_orthogonality].reduced = reduced.orthogonality;
    if (be.value != nullptr) {
      rq.io[slot_specialization].value = be.value + slot_specialization;
      rq.io[slot_orthogonality].value = be.value + slot_orthogonality;
    }
    rq.io[slot_specialization].stats = out.specialization;
    rq.io[slot_orthogonality].stats = out.orthogonality;
    detail::cuda_check_pointer(who, "statistics output", out.specialization, be);
    detail::cuda_check_pointer(who, "statistics output", out.orthogonality, be);
    detail::cuda_gram::run(rq, be, who);
  }
};

MOEREG_NAMESPACE_END
