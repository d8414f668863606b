// moereg-eval: importance (LOSSES.md section 7, Shazeer et al. 2017).
//   options: --coef
//   inputs:  probs [T, E] (required), mask [T]
//   output:  grad_probs
// With --stats-in each part's value is the whole batch's value (CV^2 is not a sum over
// tokens; see the library header), so parts' values must not be added up.
#include <moereg/losses/importance.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_importance(const request& rq, response& rs, const moereg::importance_loss& loss) {
  moereg::importance_inputs<T> in;
  in.probs = rq.matrix<T>("probs");
  in.mask = rq.mask();
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  const auto grad = rs.add_grad_matrix<T>("probs", rq.input("probs"));
  rs.value = loss.value_and_grad(in, grad, moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_importance(const request& rq, response& rs) {
  moereg::importance_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  if (rq.float_dtype({"probs"}) == npy::dtype::f4)
    run_importance<float>(rq, rs, loss);
  else
    run_importance<double>(rq, rs, loss);
}

}  // namespace moereg_eval
