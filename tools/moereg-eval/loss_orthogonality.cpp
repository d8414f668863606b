// moereg-eval: orthogonality (LOSSES.md section 5, Guo et al. L_o).
//   options: --coef --eps --reduction mean|sum --variant pairwise|subspace --k K
//   inputs:  acts [T, k, d] token-major (required), topk [T, k] (required), mask [T]
//   output:  grad_acts
// --k is the configured top-k width of the subspace variant's 1/k (0 = the topk width).
#include <moereg/losses/orthogonality.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_orthogonality(const request& rq, response& rs, const moereg::orthogonality_loss& loss) {
  moereg::orthogonality_inputs<T, moereg::token_major> in;
  in.acts = rq.activations<T>("acts");
  in.topk = rq.topk("topk");
  in.mask = rq.mask();
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  T* g = rs.add_grad<T>("acts", rq.input("acts"));
  const moereg::activation_view<T, moereg::token_major> grad{g, in.acts.layout};
  rs.value = loss.value_and_grad(in, grad, moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_orthogonality(const request& rq, response& rs) {
  moereg::orthogonality_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.eps = rq.opt_double("eps", loss.cfg.eps);
  loss.cfg.reduction = rq.opt_choice("reduction", {"mean", "sum"}, "mean") == "sum" ? moereg::ortho_reduction::sum
                                                                                    : moereg::ortho_reduction::mean;
  loss.cfg.variant = rq.opt_choice("variant", {"pairwise", "subspace"}, "pairwise") == "subspace"
                         ? moereg::ortho_variant::subspace
                         : moereg::ortho_variant::pairwise;
  loss.cfg.k = rq.opt_int("k", loss.cfg.k);
  if (rq.float_dtype({"acts"}) == npy::dtype::f4)
    run_orthogonality<float>(rq, rs, loss);
  else
    run_orthogonality<double>(rq, rs, loss);
}

}  // namespace moereg_eval
