// moereg-eval: z_loss (LOSSES.md section 2, ST-MoE router z-loss).
//   options: --coef
//   inputs:  logits [T, E] (required), mask [T]
//   output:  grad_logits
#include "runners.hpp"

namespace moereg_eval {

moereg::z_loss z_loss_options(const request& rq) {
  moereg::z_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  return loss;
}

void eval_z_loss(const request& rq, response& rs) {
  cpu_exec x;
  run_matrix_loss<moereg::z_loss_inputs>(rq, rs, z_loss_options(rq), x, "logits");
}

}  // namespace moereg_eval
