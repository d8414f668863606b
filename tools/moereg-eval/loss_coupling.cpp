// moereg-eval: coupling (LOSSES.md section 4, Hu et al. R_cp).
//   options: --coef --eps --form token|log|batch
//   inputs:  probs0 .. probs{L-1} [T, E] and topk0 .. topk{L-1} [T, k_l] (L >= 2, required,
//            numbered without gaps), mask [T] shared by every layer
//   output:  grad_probs0 .. grad_probs{L-1}
// Every probsL must have the same dtype.
#include "runners.hpp"

namespace moereg_eval {

moereg::coupling_loss coupling_options(const request& rq) {
  moereg::coupling_loss loss;
  loss.cfg.coef = rq.opt_double("coef", loss.cfg.coef);
  loss.cfg.eps = rq.opt_double("eps", loss.cfg.eps);
  const std::string form = rq.opt_choice("form", {"token", "log", "batch"}, "token");
  loss.cfg.form = form == "log"     ? moereg::coupling_form::log
                  : form == "batch" ? moereg::coupling_form::batch
                                    : moereg::coupling_form::token;
  return loss;
}

std::size_t coupling_layers(const request& rq) {
  // Layers are numbered 0 .. L-1 without gaps, each with both probsL and topkL.
  const std::size_t L = rq.count_numbered("probs");
  if (L < 2)
    throw moereg::error("coupling needs at least two layers: --in probs0=... --in probs1=... (and topk0, topk1)");
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
  for (std::size_t l = 0; l < L; ++l)
    if (!rq.has("topk" + std::to_string(l)))
      throw moereg::error("coupling: probs" + std::to_string(l) + " has no topk" + std::to_string(l) + " (--in topk" +
                          std::to_string(l) + "=FILE.npy)");
  return L;
}

void eval_coupling(const request& rq, response& rs) {
  const moereg::coupling_loss loss = coupling_options(rq);
  const std::size_t L = coupling_layers(rq);
  cpu_exec x;
  run_coupling(rq, rs, loss, L, x);
}

}  // namespace moereg_eval
