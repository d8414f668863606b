// moereg-eval: entropy (LOSSES.md section 7, router entropy).
//   options: --coef
//   inputs:  probs [T, E] (required), mask [T]
//   output:  grad_probs
#include <moereg/losses/entropy.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_entropy(const request& rq, response& rs, const moereg::entropy_loss& loss) {
  moereg::entropy_inputs<T> in;
  in.probs = rq.matrix<T>("probs");
  in.mask = rq.mask();
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  const auto grad = rs.add_grad_matrix<T>("probs", rq.input("probs"));
  rs.value = loss.value_and_grad(in, grad, moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_entropy(const request& rq, response& rs) {
  moereg::entropy_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  if (rq.float_dtype({"probs"}) == npy::dtype::f4)
    run_entropy<float>(rq, rs, loss);
  else
    run_entropy<double>(rq, rs, loss);
}

}  // namespace moereg_eval
