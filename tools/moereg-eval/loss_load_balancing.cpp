// moereg-eval: load_balancing (LOSSES.md section 1).
//   options: --coef --scope micro|sequence|global --seq-len S --k K
//   inputs:  probs [T, E] (required), topk [T, k] (required), mask [T], cu_seqlens [B + 1]
//   output:  grad_probs
#include "runners.hpp"

namespace moereg_eval {

moereg::load_balancing_loss load_balancing_options(const request& rq) {
  moereg::load_balancing_loss loss;  // defaults from the library's config
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  const std::string scope = rq.opt_choice("scope", {"micro", "sequence", "global"}, "micro");
  loss.cfg.scope = scope == "sequence" ? moereg::lb_scope::sequence
                   : scope == "global" ? moereg::lb_scope::global
                                       : moereg::lb_scope::micro;
  loss.cfg.seq_len = rq.opt_int("seq-len", loss.cfg.seq_len);
  loss.cfg.k = rq.opt_int("k", loss.cfg.k);
  return loss;
}

void eval_load_balancing(const request& rq, response& rs) {
  cpu_exec x;
  run_load_balancing(rq, rs, load_balancing_options(rq), x);
}

}  // namespace moereg_eval
