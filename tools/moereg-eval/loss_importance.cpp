// moereg-eval: importance (LOSSES.md section 7, Shazeer et al. 2017: w * CV(imp)^2).
//   options: --coef
//   inputs:  probs [T, E] (required), mask [T]
//   output:  grad_probs
// With --stats-in each part's value is the whole batch's value (CV^2 is not a sum over
// tokens; see the library header), so parts' values must not be added up.
#include "runners.hpp"

namespace moereg_eval {

moereg::importance_loss importance_options(const request& rq) {
  moereg::importance_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  return loss;
}

void eval_importance(const request& rq, response& rs) {
  cpu_exec x;
  run_matrix_loss<moereg::importance_inputs>(rq, rs, importance_options(rq), x, "probs");
}

}  // namespace moereg_eval
