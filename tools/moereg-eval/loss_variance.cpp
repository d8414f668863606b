// moereg-eval: variance (LOSSES.md section 6, Guo et al. L_v).
//   options: --coef --axis tokens|experts --reduction mean|sum
//   inputs:  scores [T, E] (required), mask [T]
//   output:  grad_scores
#include "runners.hpp"

namespace moereg_eval {

moereg::variance_loss variance_options(const request& rq) {
  moereg::variance_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.axis = rq.opt_choice("axis", {"tokens", "experts"}, "tokens") == "experts" ? moereg::variance_axis::experts
                                                                                      : moereg::variance_axis::tokens;
  loss.cfg.reduction = rq.opt_choice("reduction", {"mean", "sum"}, "mean") == "sum" ? moereg::variance_reduction::sum
                                                                                    : moereg::variance_reduction::mean;
  return loss;
}

void eval_variance(const request& rq, response& rs) {
  cpu_exec x;
  run_matrix_loss<moereg::variance_inputs>(rq, rs, variance_options(rq), x, "scores");
}

}  // namespace moereg_eval
