// Importance loss (Shazeer et al. 2017, "Outrageously Large Neural Networks: The
// Sparsely-Gated Mixture-of-Experts Layer"), LOSSES.md section 7.
//
//   imp_e = sum_t m_t P[t,e]                       (a sum, not a mean)
//   mu    = (1/E) sum_e imp_e,   var = (1/E) sum_e (imp_e - mu)^2   (population variance)
//   L     = w * CV(imp)^2 = w * var / mu^2
//   dL/dP[t,e] = m_t * w * ( 2 (imp_e - mu) / (E mu^2) - 2 var / (E mu^3) )
// T_v = 0 or mu = 0 gives 0 and a zero gradient.
//
// w defaults to 1e-2: LOSSES.md gives no default; this is the library's choice (the order of
// magnitude of the load-balancing alpha).
//
// Statistics (LOSSES.md section 9): [imp_0, ..., imp_{E-1}] (E entries, sums). The whole loss
// is a function of imp, which is global: with reduced statistics each part's gradient rows
// equal the whole batch's rows, and the value each part returns IS the whole batch's value
// (CV^2 is not a sum over tokens), so the parts' values must not be added up.
//
// Passes over memory (value_and_grad): P read once (column sums), the gradient written once;
// with reduced statistics P is not read at all (the gradient depends only on e and m_t).
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <cmath>
#include <type_traits>
#include <vector>

#include "../backend/cpu.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "api.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Configuration of importance_loss (LOSSES.md section 7).
struct importance_config {
  double coef = 1e-2;  ///< w (library default; LOSSES.md gives none)
};

struct importance_loss;

/// Inputs of importance_loss; T is the storage type of P.
template <class T>
struct importance_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = importance_loss;  ///< the loss these inputs are for
  using grad_type = matrix_view<T>;  ///< what backward() writes
  static constexpr const char* matrix_name = "probs";  ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_probs";  ///< its gradient, as errors name it
  routing_view<T> probs;  ///< P [T, E]
  mask_view mask{};       ///< m [T], empty = all valid
  /// The routing matrix (the generic checks of losses/common.hpp read it).
  const routing_view<T>& matrix() const { return probs; }
};
/// Deduces the storage type from the views: `importance_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
importance_inputs(matrix_view<U>, Rest...) -> importance_inputs<std::remove_const_t<U>>;

/// Importance loss L = w * CV(imp)^2, imp_e = sum_t m_t P[t,e] (Shazeer et al. 2017; LOSSES.md
/// section 7), gradient with respect to P.
struct importance_loss : loss_api<importance_loss, importance_config> {
  static constexpr const char* name = "importance_loss";  ///< in error messages
  static constexpr index_t stats_counts = 0;  ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const importance_inputs<T>& in) const {
    return in.probs.cols;
  }
};

namespace detail {

/// imp_e = sum_t m_t P[t,e] and T_v, per block and combined in block order.
template <class T>
void imp_sums(const cpu& be, const importance_inputs<T>& in, std::vector<accumulator_t<T>>& imp, index_t& tv) {
  using Acc = accumulator_t<T>;
  const auto& P = in.probs;
  const index_t E = P.cols, nb = num_blocks(P.rows, cpu_block_rows);
  std::vector<Acc> part(static_cast<std::size_t>(nb * E), Acc(0));
  std::vector<index_t> ptv(static_cast<std::size_t>(nb), 0);
  parallel_blocks(be, P.rows, cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    Acc* c = part.data() + b * E;
    index_t n = 0;
    for (index_t t = r0; t < r1; ++t) {
      if (!in.mask(t)) continue;
      ++n;
      for (index_t e = 0; e < E; ++e) c[e] += load(P(t, e));
    }
    ptv[static_cast<std::size_t>(b)] = n;
  });
  imp.assign(static_cast<std::size_t>(E), Acc(0));
  combine_blocks(part, nb, E, imp.data());
  tv = 0;
  for (index_t n : ptv) tv += n;
}

}  // namespace detail

/// CPU backend of importance_loss::local_stats() (found by ADL): validates, then writes the statistics
/// to `out`.
template <class T>
void execute_stats(const cpu& be, const importance_loss& loss, const importance_inputs<T>& in, double* out) {
  detail::check_scalars("importance", loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host("importance", loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr));
  std::vector<accumulator_t<T>> imp;
  index_t tv = 0;
  detail::imp_sums(be, in, imp, tv);
  for (std::size_t e = 0; e < imp.size(); ++e) out[e] = static_cast<double>(imp[e]);
}

/// CPU backend of importance_loss's value(), backward() and value_and_grad() (found by ADL): validates,
/// returns the value and, when `grad` is not null, writes the gradient per `opts`.
template <class T>
double execute(const cpu& be, const importance_loss& loss, const importance_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::check_scalars("importance", loss.cfg.coef, opts, be.threads);
  using Acc = accumulator_t<T>;
  validate_on_host("importance", loss, in, reduced, grad);
  const auto& P = in.probs;
  const index_t E = P.cols;
  std::vector<Acc> imp;
  bool any = true;
  if (reduced.empty()) {
    index_t tv = 0;
    detail::imp_sums(be, in, imp, tv);
    any = tv > 0;
  } else {
    imp.resize(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) imp[static_cast<std::size_t>(e)] = static_cast<Acc>(reduced.data[e]);
  }
  const Acc Ea = static_cast<Acc>(E);
  const Acc mu = E > 0 ? detail::pairwise_sum(imp.data(), E) / Ea : Acc(0);
  std::vector<Acc> dev2(static_cast<std::size_t>(E)), coeff(static_cast<std::size_t>(E), Acc(0));
  Acc value = Acc(0);
  if (any && mu != Acc(0)) {
    for (index_t e = 0; e < E; ++e) {
      const Acc d = imp[static_cast<std::size_t>(e)] - mu;
      dev2[static_cast<std::size_t>(e)] = d * d;
    }
    const Acc var = detail::pairwise_sum(dev2.data(), E) / Ea;
    const Acc w = static_cast<Acc>(loss.cfg.coef), gw = static_cast<Acc>(opts.grad_scale * loss.cfg.coef);
    const Acc mu2 = mu * mu;
    value = w * var / mu2;
    for (index_t e = 0; e < E; ++e)
      coeff[static_cast<std::size_t>(e)] =
          gw * (Acc(2) * (imp[static_cast<std::size_t>(e)] - mu) / (Ea * mu2) - Acc(2) * var / (Ea * mu2 * mu));
  }
  if (grad) {
    const auto& G = *grad;
    detail::parallel_blocks(be, P.rows, detail::cpu_block_rows, [&](index_t, index_t r0, index_t r1) {
      for (index_t t = r0; t < r1; ++t) {
        const bool valid = in.mask(t);
        if (!valid && opts.accumulate) continue;
        for (index_t e = 0; e < E; ++e)
          detail::put_grad(G(t, e), valid ? coeff[static_cast<std::size_t>(e)] : Acc(0), opts.accumulate);
      }
    });
  }
  return static_cast<double>(value);
}

// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(importance_loss, importance_inputs)

MOEREG_NAMESPACE_END
