// moereg-eval: specialization (LOSSES.md section 3, Hu et al. R_sp).
//   options: --coef --eps --pairs sum|mean
//   inputs:  acts [T, k, d] token-major (required), topk [T, k] (required), mask [T]
//   output:  grad_acts
// The number of experts is not an input, so expert ids are checked for repeats within a row
// but not against E.
#include <moereg/losses/specialization.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_specialization(const request& rq, response& rs, const moereg::specialization_loss& loss) {
  moereg::specialization_inputs<T, moereg::token_major> in;
  in.acts = rq.activations<T>("acts");
  in.topk = rq.topk("topk");
  in.mask = rq.mask();
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  T* g = rs.add_grad<T>("acts", rq.input("acts"));
  const moereg::activation_view<T, moereg::token_major> grad{g, in.acts.layout};
  rs.value = loss.value_and_grad(in, grad, moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_specialization(const request& rq, response& rs) {
  moereg::specialization_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.eps = rq.opt_double("eps", loss.cfg.eps);
  loss.cfg.pairs =
      rq.opt_choice("pairs", {"sum", "mean"}, "sum") == "mean" ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
  if (rq.float_dtype({"acts"}) == npy::dtype::f4)
    run_specialization<float>(rq, rs, loss);
  else
    run_specialization<double>(rq, rs, loss);
}

}  // namespace moereg_eval
