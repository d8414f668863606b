// moereg-eval: load_balancing (LOSSES.md section 1).
//   options: --coef --scope micro|sequence|global --seq-len S --k K
//   inputs:  probs [T, E] (required), topk [T, k] (required), mask [T], cu_seqlens [B + 1]
//   output:  grad_probs
#include <moereg/losses/load_balancing.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_load_balancing(const request& rq, response& rs, const moereg::load_balancing_loss& loss) {
  moereg::load_balancing_inputs<T> in;
  in.probs = rq.matrix<T>("probs");
  in.topk = rq.topk("topk");
  in.mask = rq.mask();
  in.cu_seqlens = rq.offsets("cu_seqlens");
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  const auto grad = rs.add_grad_matrix<T>("probs", rq.input("probs"));
  rs.value = loss.value_and_grad(in, grad, moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_load_balancing(const request& rq, response& rs) {
  moereg::load_balancing_loss loss;  // defaults from the library's config
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  const std::string scope = rq.opt_choice("scope", {"micro", "sequence", "global"}, "micro");
  loss.cfg.scope = scope == "sequence" ? moereg::lb_scope::sequence
                   : scope == "global" ? moereg::lb_scope::global
                                       : moereg::lb_scope::micro;
  loss.cfg.seq_len = rq.opt_int("seq-len", loss.cfg.seq_len);
  loss.cfg.k = rq.opt_int("k", loss.cfg.k);
  if (rq.float_dtype({"probs"}) == npy::dtype::f4)
    run_load_balancing<float>(rq, rs, loss);
  else
    run_load_balancing<double>(rq, rs, loss);
}

}  // namespace moereg_eval
