// Orthogonality loss (LOSSES.md section 5), token-major or expert-grouped.
#include "activations.hpp"

namespace moereg_torch {

using namespace detail;

value_grad orthogonality(const at::Tensor& outs, const at::Tensor& topk, const opt_tensor& mask,
                         const opt_tensor& row_map, double coef, double eps, int64_t variant, int64_t reduction,
                         const opt_tensor& stats, bool want_grad) {
  const char* who = "orthogonality";
  keep kp;
  const auto I = index_matrix_of(topk, who, "topk", kp);
  const auto m = mask_of(mask, who);
  const auto red = stats_of(stats, who, kp);
  moereg::orthogonality_loss loss;
  loss.cfg.coef = coef;
  loss.cfg.eps = eps;
  loss.cfg.variant = variant == 1 ? moereg::ortho_variant::subspace : moereg::ortho_variant::pairwise;
  loss.cfg.reduction = reduction == 1 ? moereg::ortho_reduction::sum : moereg::ortho_reduction::mean;
  return with_activations(outs, I, row_map, want_grad, who, "outs", kp, [&](const auto& h, auto* gv) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(h.data)>>;
    using L = decltype(h.layout);
    const moereg::orthogonality_inputs<T, L> in{h, I, m, 0};
    if (gv) return run([&] { return loss.value_and_grad(in, *gv, moereg::grad_options{}, red, backend()); });
    return run([&] { return loss.value(in, red, backend()); });
  });
}

}  // namespace moereg_torch
