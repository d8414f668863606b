// moereg-eval: entropy (LOSSES.md section 7, router entropy).
//   options: --coef
//   inputs:  probs [T, E] (required), mask [T]
//   output:  grad_probs
#include "runners.hpp"

namespace moereg_eval {

moereg::entropy_loss entropy_options(const request& rq) {
  moereg::entropy_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  return loss;
}

void eval_entropy(const request& rq, response& rs) {
  cpu_exec x;
  run_matrix_loss<moereg::entropy_inputs>(rq, rs, entropy_options(rq), x, "probs");
}

}  // namespace moereg_eval
