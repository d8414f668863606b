// moereg-eval: orthogonality (LOSSES.md section 5, Guo et al. L_o).
//   options: --coef --eps --reduction mean|sum --variant pairwise|subspace --k K
//   inputs:  acts [T, k, d] token-major (required), topk [T, k] (required), mask [T]
//   output:  grad_acts
// --k is the configured top-k width of the subspace variant's 1/k (0 = the topk width).
#include "runners.hpp"

namespace moereg_eval {

moereg::orthogonality_loss orthogonality_options(const request& rq) {
  moereg::orthogonality_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.eps = rq.opt_double("eps", loss.cfg.eps);
  loss.cfg.reduction = rq.opt_choice("reduction", {"mean", "sum"}, "mean") == "sum" ? moereg::ortho_reduction::sum
                                                                                    : moereg::ortho_reduction::mean;
  loss.cfg.variant = rq.opt_choice("variant", {"pairwise", "subspace"}, "pairwise") == "subspace"
                         ? moereg::ortho_variant::subspace
                         : moereg::ortho_variant::pairwise;
  loss.cfg.k = rq.opt_int("k", loss.cfg.k);
  return loss;
}

void eval_orthogonality(const request& rq, response& rs) {
  cpu_exec x;
  run_activation_loss<moereg::orthogonality_inputs>(rq, rs, orthogonality_options(rq), x);
}

}  // namespace moereg_eval
