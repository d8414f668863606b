// moereg-eval: variance (LOSSES.md section 6, Guo et al. L_v).
//   options: --coef --axis tokens|experts --reduction mean|sum
//   inputs:  scores [T, E] (required), mask [T]
//   output:  grad_scores
#include <moereg/losses/variance.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_variance(const request& rq, response& rs, const moereg::variance_loss& loss) {
  moereg::variance_inputs<T> in;
  in.scores = rq.matrix<T>("scores");
  in.mask = rq.mask();
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  const auto grad = rs.add_grad_matrix<T>("scores", rq.input("scores"));
  rs.value = loss.value_and_grad(in, grad, moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_variance(const request& rq, response& rs) {
  moereg::variance_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.axis = rq.opt_choice("axis", {"tokens", "experts"}, "tokens") == "experts" ? moereg::variance_axis::experts
                                                                                      : moereg::variance_axis::tokens;
  loss.cfg.reduction = rq.opt_choice("reduction", {"mean", "sum"}, "mean") == "sum" ? moereg::variance_reduction::sum
                                                                                    : moereg::variance_reduction::mean;
  if (rq.float_dtype({"scores"}) == npy::dtype::f4)
    run_variance<float>(rq, rs, loss);
  else
    run_variance<double>(rq, rs, loss);
}

}  // namespace moereg_eval
