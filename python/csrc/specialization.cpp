// Intra-layer specialization loss (LOSSES.md section 3), token-major or expert-grouped.
#include "activations.hpp"

namespace moereg_torch {

using namespace detail;

value_grad specialization(const at::Tensor& acts, const at::Tensor& topk, const opt_tensor& mask,
                          const opt_tensor& row_map, double coef, double eps, int64_t pairs, const opt_tensor& stats,
                          bool want_grad) {
  const char* who = "specialization";
  keep kp;
  const auto I = index_matrix_of(topk, who, "topk", kp);
  const auto m = mask_of(mask, who);
  const auto red = stats_of(stats, who, kp);
  moereg::specialization_loss loss;
  loss.cfg.coef = coef;
  loss.cfg.eps = eps;
  loss.cfg.pairs = pairs == 1 ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
  return with_activations(acts, I, row_map, want_grad, who, "acts", kp, [&](const auto& h, auto* gv) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(h.data)>>;
    using L = decltype(h.layout);
    const moereg::specialization_inputs<T, L> in{h, I, m, 0};
    if (gv) return run([&] { return loss.value_and_grad(in, *gv, moereg::grad_options{}, red, backend()); });
    return run([&] { return loss.value(in, red, backend()); });
  });
}

}  // namespace moereg_torch
