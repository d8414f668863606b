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
// The description below (importance_kernel) runs on the row engines.
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <type_traits>
#include <vector>

#include "../math/reduce.hpp"
#include "../math/router.hpp"
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
  using loss_type = importance_loss;                      ///< the loss these inputs are for
  using grad_type = matrix_view<T>;                       ///< what backward() writes
  static constexpr const char* matrix_name = "probs";     ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_probs";  ///< its gradient, as errors name it
  routing_view<T> probs;                                  ///< P [T, E]
  mask_view mask{};                                       ///< m [T], empty = all valid
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
  static constexpr const char* label = "importance";      ///< prefix of the CPU backend's error messages
  static constexpr index_t stats_counts = 0;              ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const importance_inputs<T>& in) const {
    return in.probs.cols;
  }
};

namespace detail {

/// The row kernel of importance_loss (the protocol is in backend/cpu/row_engine.hpp): pass 1
/// sums the columns (imp) unless reduced statistics are given; the value is a function of imp
/// alone, and a valid row's gradient is the per-expert coefficient (P is not read again).
template <class T>
struct importance_kernel : per_column_rows<accumulator_t<T>> {
  using storage_type = T;
  using acc_type = accumulator_t<T>;
  using Acc = acc_type;
  matrix_view<const T> x;  ///< P
  mask_view mask;
  double w = 0, grad_scale = 1;
  index_t sum_width = 0, count_width = 0, stats_size = 0;
  bool active = false;

  bool needs_pass1(bool reduced) const { return !reduced; }
  void stats_row(index_t, const Acc* p, Acc* sums, index_t*) const {
    for (index_t e = 0; e < sum_width; ++e) sums[e] += p[e];
  }
  void write_stats(const row_local<Acc>& local, double* out) const {
    for (index_t e = 0; e < sum_width; ++e) out[e] = static_cast<double>(local.sums[e]);
  }
  /// imp from the statistics; mu = 0 (T_v = 0 among them) gives 0 and a zero gradient.
  void prepare(const double* stats, const row_local<Acc>&) {
    const index_t E = sum_width;
    std::vector<Acc> imp(static_cast<std::size_t>(E)), dev2(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) imp[static_cast<std::size_t>(e)] = static_cast<Acc>(stats[e]);
    const Acc Ea = static_cast<Acc>(E);
    const Acc mu = E > 0 ? pairwise_sum(imp.data(), E) / Ea : Acc(0);
    this->coeff.assign(static_cast<std::size_t>(E), Acc(0));
    active = mu != Acc(0);
    if (!active) return;
    for (index_t e = 0; e < E; ++e) {
      const Acc d = imp[static_cast<std::size_t>(e)] - mu;
      dev2[static_cast<std::size_t>(e)] = d * d;
    }
    const Acc var = pairwise_sum(dev2.data(), E) / Ea;
    const Acc mu2 = mu * mu, gw = static_cast<Acc>(grad_scale * w);
    this->value = static_cast<Acc>(w) * var / mu2;
    for (index_t e = 0; e < E; ++e)
      this->coeff[static_cast<std::size_t>(e)] =
          importance_coeff(imp[static_cast<std::size_t>(e)], mu, var, Ea, mu2, gw);
  }
};

}  // namespace detail

/// The row kernel of importance_loss for these inputs (found by ADL by the row engines).
template <class T>
detail::importance_kernel<T> make_row_kernel(const importance_loss& loss, const importance_inputs<T>& in,
                                             grad_options opts) {
  detail::importance_kernel<T> k;
  k.x = in.probs;
  k.mask = in.mask;
  k.w = loss.cfg.coef;
  k.grad_scale = opts.grad_scale;
  k.sum_width = k.stats_size = in.probs.cols;
  return k;
}

MOEREG_NAMESPACE_END
