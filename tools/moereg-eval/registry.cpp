// The loss table of moereg-eval: one row per loss of LOSSES.md, with the options and inputs
// it takes. A row whose function is nullptr is a loss this build does not evaluate yet; the
// tool answers it with exit code 2 and says so.
#include "eval.hpp"

namespace moereg_eval {

const std::vector<loss_entry>& registry() {
  static const std::vector<loss_entry> table = {
      {"load_balancing",
       {"coef", "scope", "seq-len", "k"},
       {"probs", "topk", "mask", "cu_seqlens"},
       {"probs", "topk"},
       eval_load_balancing},
      {"z_loss", {"coef"}, {"logits", "mask"}, {"logits"}, eval_z_loss},
      {"specialization", {"coef", "eps", "pairs"}, {"acts", "topk", "mask"}, {"acts", "topk"}, eval_specialization},
      {"coupling",
       {"coef", "eps", "form"},
       {"probs#", "topk#", "mask"},
       {"probs0", "probs1", "topk0", "topk1"},
       eval_coupling},
      {"orthogonality",
       {"coef", "eps", "reduction", "variant", "k"},
       {"acts", "topk", "mask"},
       {"acts", "topk"},
       eval_orthogonality},
      {"variance", {"coef", "axis", "reduction"}, {"scores", "mask"}, {"scores"}, eval_variance},
      {"entropy", {"coef"}, {"probs", "mask"}, {"probs"}, eval_entropy},
      {"importance", {"coef"}, {"probs", "mask"}, {"probs"}, eval_importance},
  };
  return table;
}

}  // namespace moereg_eval
