// moereg-eval: z_loss (LOSSES.md section 2).
//   options: --coef
//   inputs:  logits [T, E] (required), mask [T]
//   output:  grad_logits
#include <moereg/losses/z_loss.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_z_loss(const request& rq, response& rs, const moereg::z_loss& loss) {
  moereg::z_loss_inputs<T> in;
  in.logits = rq.matrix<T>("logits");
  in.mask = rq.mask();
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  const auto grad = rs.add_grad_matrix<T>("logits", rq.input("logits"));
  rs.value = loss.value_and_grad(in, grad, moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_z_loss(const request& rq, response& rs) {
  moereg::z_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  if (rq.float_dtype({"logits"}) == npy::dtype::f4)
    run_z_loss<float>(rq, rs, loss);
  else
    run_z_loss<double>(rq, rs, loss);
}

}  // namespace moereg_eval
