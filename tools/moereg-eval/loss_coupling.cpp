// moereg-eval: coupling (LOSSES.md section 4, Hu et al. R_cp).
//   options: --coef --eps --form token|log|batch
//   inputs:  probs0 .. probs{L-1} [T, E] and topk0 .. topk{L-1} [T, k_l] (L >= 2, required,
//            numbered without gaps), mask [T] shared by every layer
//   output:  grad_probs0 .. grad_probs{L-1}
// Every probsL must have the same dtype.
#include <string>
#include <vector>

#include <moereg/losses/coupling.hpp>

#include "eval.hpp"

namespace moereg_eval {
namespace {

template <class T>
void run_coupling(const request& rq, response& rs, const moereg::coupling_loss& loss, std::size_t L) {
  std::vector<moereg::routing_view<T>> probs;
  std::vector<moereg::topk_view> topk;
  for (std::size_t l = 0; l < L; ++l) {
    probs.push_back(rq.matrix<T>("probs" + std::to_string(l)));
    topk.push_back(rq.topk("topk" + std::to_string(l)));
  }
  moereg::coupling_inputs<T> in;
  in.probs = probs.data();
  in.topk = topk.data();
  in.layers = static_cast<moereg::index_t>(L);
  in.mask = rq.mask();
  if (rq.want_stats()) rs.stats = loss.local_stats(in);
  std::vector<moereg::matrix_view<T>> grads;
  for (std::size_t l = 0; l < L; ++l) {
    const std::string name = "probs" + std::to_string(l);
    grads.push_back(rs.add_grad_matrix<T>(name, rq.input(name)));
  }
  rs.value = loss.value_and_grad(in, grads.data(), moereg::grad_options{rq.grad_scale(), false}, rq.stats());
}

}  // namespace

void eval_coupling(const request& rq, response& rs) {
  moereg::coupling_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.eps = rq.opt_double("eps", loss.cfg.eps);
  const std::string form = rq.opt_choice("form", {"token", "log", "batch"}, "token");
  loss.cfg.form = form == "log"     ? moereg::coupling_form::log
                  : form == "batch" ? moereg::coupling_form::batch
                                    : moereg::coupling_form::token;

  // Layers are numbered 0 .. L-1 without gaps, each with both probsL and topkL.
  const std::size_t L = rq.count_numbered("probs");
  if (L < 2)
    throw moereg::error("coupling needs at least two layers: --in probs0=... --in probs1=... (and topk0, topk1)");
  std::vector<std::string> floats;
  for (const auto& name : rq.input_names()) {
    for (const char* stem : {"probs", "topk"}) {
      const std::string s = stem;
      if (name.compare(0, s.size(), s) != 0 || name.size() == s.size()) continue;
      const std::size_t l = std::stoul(name.substr(s.size()));  // the registry admits digits only
      if (l >= L)
        throw moereg::error("coupling: " + name + " is given but probs" + std::to_string(L) +
                            " is missing; layers must be numbered 0, 1, ... without gaps");
    }
  }
  for (std::size_t l = 0; l < L; ++l) {
    if (!rq.has("topk" + std::to_string(l)))
      throw moereg::error("coupling: probs" + std::to_string(l) + " has no topk" + std::to_string(l) + " (--in topk" +
                          std::to_string(l) + "=FILE.npy)");
    floats.push_back("probs" + std::to_string(l));
  }
  if (rq.float_dtype(floats) == npy::dtype::f4)
    run_coupling<float>(rq, rs, loss, L);
  else
    run_coupling<double>(rq, rs, loss, L);
}

}  // namespace moereg_eval
