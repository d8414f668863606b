// Router z-loss (ST-MoE, Zoph et al. 2022), LOSSES.md section 2.
//
//   lse_t = log sum_e exp(Z[t,e])                  (max-shifted: finite for |Z| up to 1e4 in float)
//   L     = beta * (1 / T_v) sum_t m_t lse_t^2
//   dL/dZ[t,e] = beta * (2 / T_v) * m_t * lse_t * softmax(Z_t)_e
//
// Statistics: [T_v]. With reduced statistics the 1/T_v is the global one, so a batch split
// into parts gives each part the whole batch's gradient rows, and the parts' values sum to
// the whole batch's value.
//
// Passes over memory (value_and_grad): Z is read once (a row is kept in a small buffer
// while its softmax is formed) and the gradient written once; the mask is read twice.
// The description below (z_kernel) runs on the row engines; on the CPU each row is evaluated
// with the engine's vectorised log-sum-exp (a strided or 16-bit row is converted first, so
// every layout gives the same bits).
#pragma once

#include "../core/config.hpp"

#include <type_traits>

#include "../math/router.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Configuration of z_loss (LOSSES.md section 2).
struct z_loss_config {
  double coef = 1e-3;  ///< beta
};

struct z_loss;

/// Inputs of z_loss; T is the storage type of Z.
template <class T>
struct z_loss_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = z_loss;                                ///< the loss these inputs are for
  using grad_type = matrix_view<T>;                        ///< what backward() writes
  static constexpr const char* matrix_name = "logits";     ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_logits";  ///< its gradient, as errors name it
  routing_view<T> logits;                                  ///< Z [T, E]
  mask_view mask{};                                        ///< m [T], empty = all valid
  /// The routing matrix (the generic checks of losses/common.hpp read it).
  const routing_view<T>& matrix() const { return logits; }
};
/// Deduces the storage type from the views: `z_loss_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
z_loss_inputs(matrix_view<U>, Rest...) -> z_loss_inputs<std::remove_const_t<U>>;

/// Router z-loss L = beta * (1 / T_v) sum_t m_t lse_t^2 (ST-MoE; LOSSES.md section 2), gradient
/// with respect to the router logits Z.
struct z_loss : loss_api<z_loss, z_loss_config> {
  static constexpr const char* name = "z_loss";   ///< in error messages
  static constexpr const char* label = "z_loss";  ///< prefix of the CPU backend's error messages
  static constexpr index_t stats_counts = 1;      ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const z_loss_inputs<T>&) const {
    return 1;
  }
};

namespace detail {

/// The row kernel of z_loss (the protocol is in backend/cpu/row_engine.hpp): no pass 1; a
/// valid row's term is lse_t^2 and its gradient gcoef * lse_t * softmax(Z_t).
template <class T>
struct z_kernel {
  using storage_type = T;
  using acc_type = accumulator_t<T>;
  using Acc = acc_type;
  matrix_view<const T> x;  ///< Z
  mask_view mask;
  double beta = 0, grad_scale = 1;
  index_t sum_width = 0, count_width = 0, stats_size = 1;
  bool reads_row = true, active = true;
  Acc inv_tv = Acc(0), gcoef = Acc(0);

  bool needs_pass1(bool) const { return false; }
  void stats_row(index_t, const Acc*, Acc*, index_t*) const {}
  void write_stats(const row_local<Acc>& local, double* out) const { out[0] = static_cast<double>(local.tv); }
  void prepare(const double* stats, const row_local<Acc>&) {
    inv_tv = stats[0] > 0 ? static_cast<Acc>(1.0 / stats[0]) : Acc(0);
    gcoef = static_cast<Acc>(grad_scale) * static_cast<Acc>(beta) * Acc(2) * inv_tv;
  }
  bool wants_rows(bool) const { return true; }
  template <class Ops>
  Acc row(index_t, const Acc* z, Acc* g, Ops& ops) const {
    Acc* ex = ops.scratch(0);
    Acc expsum = Acc(0);
    const Acc lse = ops.logsumexp(z, x.cols, ex, expsum);
    if (g != nullptr) {
      const Acc c = z_row_grad_coeff(gcoef, lse, expsum);
      ops.put(g, x.cols, [&](index_t e) { return c * ex[e]; });
    }
    return lse * lse;
  }
  double finish(Acc rows) const { return static_cast<double>(static_cast<Acc>(beta) * inv_tv * rows); }
};

}  // namespace detail

/// The row kernel of z_loss for these inputs (found by ADL by the row engines).
template <class T>
detail::z_kernel<T> make_row_kernel(const z_loss& loss, const z_loss_inputs<T>& in, grad_options opts) {
  detail::z_kernel<T> k;
  k.x = in.logits;
  k.mask = in.mask;
  k.beta = loss.cfg.coef;
  k.grad_scale = opts.grad_scale;
  return k;
}

MOEREG_NAMESPACE_END
