// Chain helpers (LOSSES.md section 7): carry a gradient with respect to router
// probabilities back to the router logits, so a loss on P can be added to the router's
// gradient.
//
//   softmax:   P = softmax(Z) row-wise,          dZ = P * (dP - rowsum(P * dP))
//
// Both write grad_scale * dZ into the caller's buffer (overwrite or accumulate). dP and dZ
// may be the same buffer only when accumulate is false.
#pragma once

#include <vector>

#include "backend/cpu.hpp"
#include "core/error.hpp"
#include "core/types.hpp"
#include "core/views.hpp"
#include "losses/common.hpp"

namespace moereg {

/// dZ = P * (dP - rowsum(P * dP)) for P = softmax(Z) row-wise.
template <class T>
void softmax_backward(routing_view<T> probs, matrix_view<const T> grad_probs, matrix_view<T> grad_logits,
                      grad_options opts = {}, const cpu& be = {}) {
  using Acc = accumulator_t<T>;
  const char* who = "softmax_backward";
  detail::check_matrix(who, "probs", probs);
  detail::check_grad(who, "grad_probs", grad_probs, probs);
  detail::check_grad(who, "grad_logits", grad_logits, probs);
  const Acc gs = static_cast<Acc>(opts.grad_scale);
  detail::parallel_blocks(be, probs.rows, detail::cpu_block_rows, [&](index_t, index_t r0, index_t r1) {
    for (index_t t = r0; t < r1; ++t) {
      Acc dot = Acc(0);
      for (index_t e = 0; e < probs.cols; ++e) dot += load(probs(t, e)) * load(grad_probs(t, e));
      for (index_t e = 0; e < probs.cols; ++e) {
        const Acc p = load(probs(t, e));
        detail::put_grad(grad_logits(t, e), gs * p * (load(grad_probs(t, e)) - dot), opts.accumulate);
      }
    }
  });
}

}  // namespace moereg
