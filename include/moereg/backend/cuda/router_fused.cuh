// Fused CUDA entry point of the router losses that read one [T, E] routing matrix: load
// balancing (micro or global scope), z-loss, entropy, variance and importance, in one run of
// the router engine (router.cuh).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
//   moereg::router_fused f;
//   f.load_balancing = &lb; f.z = &zl; f.entropy = &ent;      // any subset, at least one
//   moereg::router_fused_inputs<float> in{P, Z, topk, mask};  // device views
//   be.value = d_values;                                      // 5 doubles, see the slots below
//   f.value_and_grad(in, dP, dZ, opts, {}, be);
//
// What fusion saves, against one call per loss: P is read twice (column sums, then one row
// pass) instead of once or twice per loss, Z once (its row pass), and dP is written once
// with the sum of every P-loss's gradient (dP = sum_i grad_scale dL_i/dP) instead of once per
// loss with read-modify-write accumulation; 2 to 4 kernel launches in all. The result equals
// the sum of the separate calls up to rounding (the contributions are added in registers, in
// the accumulator type, and rounded to the storage type once).
//
// The variance loss reads P as its score matrix S; the z-loss reads Z. Every loss uses the
// same mask. Each loss keeps its own coefficient, its own configuration and its own reduced
// statistics; grad_options (grad_scale, accumulate) apply to every loss. Sequence-scope load
// balancing is not fused (call the loss itself).
//
// Values: be.value[slot] for each loss present, slots router_fused::slot_load_balancing (0),
// slot_z (1), slot_entropy (2), slot_variance (3), slot_importance (4); the slots of absent
// losses are not touched. A null be.value writes no value.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <cstddef>

#include "core.cuh"
#include "load_balancing.cuh"
#include "router.cuh"

MOEREG_NAMESPACE_BEGIN

/// The shared inputs of a fused router call (device views).
template <class T>
struct router_fused_inputs {
  routing_view<T> probs{};   ///< P [T, E]: load balancing, entropy, importance, variance (as S)
  routing_view<T> logits{};  ///< Z [T, E]: z-loss
  topk_view topk{};          ///< I [T, k]: load balancing
  mask_view mask{};          ///< m [T], shared by every loss; empty = all valid
};

/// Reduced statistics (device) per loss; an empty view means that loss uses its local ones.
struct router_fused_reduced {
  /// One view per loss, stats_size of that loss.
  ///@{
  stats_view load_balancing{}, z{}, entropy{}, variance{}, importance{};
  ///@}
};

/// Local statistics outputs (device) per loss, each of that loss's stats_size; null = not wanted.
struct router_fused_stats_out {
  double* load_balancing = nullptr;  ///< load_balancing_loss statistics
  double* z = nullptr;               ///< z_loss statistics
  double* entropy = nullptr;         ///< entropy_loss statistics
  double* variance = nullptr;        ///< variance_loss statistics
  double* importance = nullptr;      ///< importance_loss statistics
};

/// Several router losses in one pass. Pointers to the losses (null = absent).
struct router_fused {
  const load_balancing_loss* load_balancing = nullptr;  ///< on probs, topk (null = absent)
  const z_loss* z = nullptr;                            ///< on logits (null = absent)
  const entropy_loss* entropy = nullptr;                ///< on probs (null = absent)
  const variance_loss* variance = nullptr;              ///< on probs as the scores S (null = absent)
  const importance_loss* importance = nullptr;          ///< on probs (null = absent)

  /// Index of each loss's value in be.value[], and their number.
  ///@{
  static constexpr int slot_load_balancing = detail::cuda_router::slot_lb, slot_z = detail::cuda_router::slot_z,
                       slot_entropy = detail::cuda_router::slot_ent, slot_variance = detail::cuda_router::slot_var,
                       slot_importance = detail::cuda_router::slot_imp, slots = detail::cuda_router::router_slots;
  ///@}

  /// Bytes of workspace value_and_grad and local_stats need for these inputs.
  template <class T>
  std::size_t workspace_size(const router_fused_inputs<T>& in, const cuda& = {}) const {
    return detail::cuda_router::required_bytes(request(in));
  }

  /// Values into be.value[slot], grad_probs = sum of the P-losses' gradients (a null
  /// grad_probs.data: not wanted), grad_logits = the z-loss gradient (null: not wanted).
  /// Enqueued on be.stream; nothing is synchronised.
  template <class T>
  void value_and_grad(const router_fused_inputs<T>& in, matrix_view<T> grad_probs, matrix_view<T> grad_logits,
                      grad_options opts = {}, const router_fused_reduced& reduced = {}, const cuda& be = {}) const {
    auto rq = request(in);
    const bool gp = grad_probs.data != nullptr && rq.p_losses();
    const bool gz = grad_logits.data != nullptr && z != nullptr;
    validate(in, reduced, gp ? &grad_probs : nullptr, gz ? &grad_logits : nullptr, be);
    const stats_view red[slots] = {reduced.load_balancing, reduced.z, reduced.entropy, reduced.variance,
                                   reduced.importance};
    for (int i = 0; i < slots; ++i) {
      rq.io[i].reduced = red[i];
      if (be.value != nullptr) rq.io[i].value = be.value + i;
    }
    rq.grad_probs = grad_probs;
    rq.want_grad_probs = gp;
    rq.grad_logits = grad_logits;
    rq.want_grad_logits = gz;
    rq.opts = opts;
    detail::cuda_router::run(rq, be, "router_fused (cuda)");
  }

  /// The values only.
  template <class T>
  void value(const router_fused_inputs<T>& in, const router_fused_reduced& reduced = {}, const cuda& be = {}) const {
    value_and_grad(in, matrix_view<T>{}, matrix_view<T>{}, grad_options{}, reduced, be);
  }

  /// Every present loss's local statistics into its output (device), in one run.
  template <class T>
  void local_stats(const router_fused_inputs<T>& in, const router_fused_stats_out& out, const cuda& be = {}) const {
    const matrix_view<T>* none = nullptr;
    validate(in, router_fused_reduced{}, none, none, be);
    const char* who = "router_fused (cuda)";
    auto rq = request(in);
    rq.stats_mode = true;
    double* const outs[slots] = {out.load_balancing, out.z, out.entropy, out.variance, out.importance};
    for (int i = 0; i < slots; ++i) {
      rq.io[i].stats = outs[i];
      detail::cuda_check_pointer(who, "statistics output", outs[i], be);
    }
    detail::cuda_router::run(rq, be, who);
  }

 private:
  template <class T>
  detail::cuda_router::request<T> request(const router_fused_inputs<T>& in) const {
    detail::cuda_router::request<T> rq;
    rq.probs = in.probs;
    rq.logits = in.logits;
    rq.topk = in.topk;
    rq.mask = in.mask;
    rq.lb = load_balancing;
    rq.z = z;
    rq.ent = entropy;
    rq.var = variance;
    rq.imp = importance;
    return rq;
  }

  /// Each present loss's own checks on its inputs, then the agreement between them.
  template <class T>
  void validate(const router_fused_inputs<T>& in, const router_fused_reduced& reduced, const matrix_view<T>* gp,
                const matrix_view<T>* gz, const cuda& be) const {
    const char* who = "router_fused (cuda)";
    detail::require(
        load_balancing != nullptr || z != nullptr || entropy != nullptr || variance != nullptr || importance != nullptr,
        who, ": no loss given");
    if (load_balancing != nullptr) {
      detail::require(load_balancing->cfg.scope != lb_scope::sequence, who,
                      ": sequence-scope load balancing is not fused; call the loss itself");
      detail::cuda_lb::validate(*load_balancing, load_balancing_inputs<T>{in.probs, in.topk, in.mask},
                                reduced.load_balancing, gp, be);
    }
    if (z != nullptr)
      detail::cuda_validate("z_loss (cuda)", *z, z_loss_inputs<T>{in.logits, in.mask}, reduced.z, gz, be);
    if (entropy != nullptr)
      detail::cuda_validate("entropy (cuda)", *entropy, entropy_inputs<T>{in.probs, in.mask}, reduced.entropy, gp, be);
    if (variance != nullptr)
      detail::cuda_validate("variance (cuda)", *variance, variance_inputs<T>{in.probs, in.mask}, reduced.variance, gp,
                            be);
    if (importance != nullptr)
      detail::cuda_validate("importance (cuda)", *importance, importance_inputs<T>{in.probs, in.mask},
                            reduced.importance, gp, be);
    const bool p_losses =
        load_balancing != nullptr || entropy != nullptr || variance != nullptr || importance != nullptr;
    if (p_losses && gp != nullptr) detail::check_grad(who, "grad_probs", *gp, in.probs);
    if (p_losses && z != nullptr)
      detail::require(in.logits.rows == in.probs.rows, who, ": logits has ", in.logits.rows, " rows but probs has ",
                      in.probs.rows);
  }
};

MOEREG_NAMESPACE_END
