// moereg-eval: specialization (LOSSES.md section 3, Hu et al. R_sp).
//   options: --coef --eps --pairs sum|mean
//   inputs:  acts [T, k, d] token-major (required), topk [T, k] (required), mask [T]
//   output:  grad_acts
// The number of experts is not an input, so expert ids are checked for repeats within a row
// but not against E.
#include "runners.hpp"

namespace moereg_eval {

moereg::specialization_loss specialization_options(const request& rq) {
  moereg::specialization_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.eps = rq.opt_double("eps", loss.cfg.eps);
  loss.cfg.pairs =
      rq.opt_choice("pairs", {"sum", "mean"}, "sum") == "mean" ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
  return loss;
}

void eval_specialization(const request& rq, response& rs) {
  cpu_exec x;
  run_activation_loss<moereg::specialization_inputs>(rq, rs, specialization_options(rq), x);
}

}  // namespace moereg_eval
