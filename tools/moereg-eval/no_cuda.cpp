// moereg-eval without the CUDA backend (built when MOEREG_ENABLE_CUDA is off): --backend cuda
// is refused (exit code 2) rather than silently run on the CPU.
#include "eval.hpp"

namespace moereg_eval {

void eval_cuda(const request&, response&) {
  throw moereg::error(
      "CUDA backend not built: this moereg-eval runs the CPU backend only "
      "(configure with -DMOEREG_ENABLE_CUDA=ON)");
}

}  // namespace moereg_eval
