// Chain helpers (LOSSES.md section 7): carry a gradient with respect to router
// probabilities back to the router logits, so a loss on P can be added to the router's
// gradient.
//
//   softmax:   P = softmax(Z) row-wise,          dZ = P * (dP - rowsum(P * dP))
//   sigmoid:   S = sigmoid(Z) / rowsum(sigmoid(Z)) (normalised over all E experts of the row),
//              dZ = S * (1 - sigmoid(Z)) * (dS - rowsum(S * dS))
//
// Both write grad_scale * dZ into the caller's buffer (overwrite or accumulate). dP and dZ
// may be the same buffer only when accumulate is false.
#pragma once

#include "core/config.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu.hpp"
#include "core/error.hpp"
#include "core/types.hpp"
#include "core/views.hpp"
#include "losses/common.hpp"

MOEREG_NAMESPACE_BEGIN

namespace detail {
/// The checks of a chain-rule step from the router's output back to its logits: the storage
/// type, grad_scale and threads, the input matrix, the incoming and the outgoing gradient with
/// its shape.
template <class T>
void check_chain_rule(const char* who, const char* in_name, const routing_view<T>& in, const char* grad_name,
                      const matrix_view<const T>& grad_in, const matrix_view<T>& grad_logits, const grad_options& opts,
                      const cpu& be) {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  check_scalars(who, 0.0, opts, be.threads);
  check_matrix(who, in_name, in);
  check_grad(who, grad_name, grad_in, in);
  check_grad(who, "grad_logits", grad_logits, in);
}
}  // namespace detail

/// dZ = P * (dP - rowsum(P * dP)) for P = softmax(Z) row-wise.
template <class T>
void softmax_backward(detail::nondeduced_t<routing_view<T>> probs,
                      detail::nondeduced_t<matrix_view<const T>> grad_probs, matrix_view<T> grad_logits,
                      grad_options opts = {}, const cpu& be = {}) {
  using Acc = accumulator_t<T>;
  detail::check_chain_rule("softmax_backward", "probs", probs, "grad_probs", grad_probs, grad_logits, opts, be);
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

/// dZ for normalised sigmoid scores S = sigmoid(Z) / sum_e sigmoid(Z) over all E experts of
/// each row (the "normalised scores of a sigmoid router" of LOSSES.md; the normalisation over
/// the selected experts only, as in DeepSeek-V3's gate weights, is a different function):
///   dZ[t,j] = S[t,j] (1 - sigmoid(Z[t,j])) (dS[t,j] - sum_e S[t,e] dS[t,e])
/// S is formed in the log domain (log sigmoid, then a max shift), so it stays finite when
/// every sigmoid of a row underflows. grad_scores and grad_logits may be the same buffer only
/// when accumulate is false.
template <class T>
void sigmoid_norm_backward(detail::nondeduced_t<routing_view<T>> logits,
                           detail::nondeduced_t<matrix_view<const T>> grad_scores, matrix_view<T> grad_logits,
                           grad_options opts = {}, const cpu& be = {}) {
  using Acc = accumulator_t<T>;
  detail::check_chain_rule("sigmoid_norm_backward", "logits", logits, "grad_scores", grad_scores, grad_logits, opts,
                           be);
  const Acc gs = static_cast<Acc>(opts.grad_scale);
  const index_t E = logits.cols;
  detail::parallel_blocks(be, logits.rows, detail::cpu_block_rows, [&](index_t, index_t r0, index_t r1) {
    // Per row: ls = log sigmoid(z), om = 1 - sigmoid(z) = sigmoid(-z), both without overflow.
    std::vector<Acc> ls(static_cast<std::size_t>(E)), om(static_cast<std::size_t>(E));
    for (index_t t = r0; t < r1; ++t) {
      Acc mx = -std::numeric_limits<Acc>::infinity();
      for (index_t e = 0; e < E; ++e) {
        const Acc z = load(logits(t, e));
        const Acc x = std::exp(-std::abs(z));  // in (0, 1]
        const Acc l1p = std::log1p(x);
        const std::size_t i = static_cast<std::size_t>(e);
        ls[i] = z >= Acc(0) ? -l1p : z - l1p;
        om[i] = z >= Acc(0) ? x / (Acc(1) + x) : Acc(1) / (Acc(1) + x);
        mx = std::max(mx, ls[i]);
      }
      Acc sum = Acc(0);
      for (index_t e = 0; e < E; ++e) {
        const std::size_t i = static_cast<std::size_t>(e);
        ls[i] = std::exp(ls[i] - mx);  // now sigmoid(z_e) / max_j sigmoid(z_j)
        sum += ls[i];
      }
      Acc dot = Acc(0);
      for (index_t e = 0; e < E; ++e) {
        const std::size_t i = static_cast<std::size_t>(e);
        ls[i] /= sum;  // now S_e
        dot += ls[i] * load(grad_scores(t, e));
      }
      for (index_t e = 0; e < E; ++e) {
        const std::size_t i = static_cast<std::size_t>(e);
        detail::put_grad(grad_logits(t, e), gs * ls[i] * om[i] * (load(grad_scores(t, e)) - dot), opts.accumulate);
      }
    }
  });
}

MOEREG_NAMESPACE_END
