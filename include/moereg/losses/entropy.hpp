// Router entropy, LOSSES.md section 7.
//
//   L = eta (1/T_v) sum_t m_t (-sum_e P[t,e] log max(P[t,e], tiny)),   tiny = 1e-30
//   dL/dP[t,e] = eta m_t / T_v * ( -(log P[t,e] + 1)   if P[t,e] > tiny
//                                  -log(tiny)          otherwise: max(P, tiny) is constant there )
//
// eta defaults to 1e-3 (LOSSES.md gives no default; this is the library's choice). A positive
// eta penalises spread-out routing (sharper routers); pass a negative eta to reward entropy.
//
// Statistics (LOSSES.md section 9): [T_v]. With reduced statistics the 1/T_v is global, so a
// batch split into parts gives each part the whole batch's gradient rows, and the parts'
// values sum to the whole batch's value.
//
// Passes over memory (value_and_grad): P read once, the gradient written once. The
// description below (entropy_kernel) runs on the row engines; on the CPU rows are evaluated
// with the engine's vectorised log (a strided or 16-bit row is converted first, so every
// layout gives the same bits), element by element only for a subnormal tiny.
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <limits>
#include <type_traits>

#include "../math/router.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Configuration of entropy_loss (LOSSES.md section 7).
struct entropy_config {
  double coef = 1e-3;   ///< eta (library default; LOSSES.md gives none)
  double tiny = 1e-30;  ///< floor inside the log
};

struct entropy_loss;

/// Inputs of entropy_loss; T is the storage type of P.
template <class T>
struct entropy_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = entropy_loss;                         ///< the loss these inputs are for
  using grad_type = matrix_view<T>;                       ///< what backward() writes
  static constexpr const char* matrix_name = "probs";     ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_probs";  ///< its gradient, as errors name it
  routing_view<T> probs;                                  ///< P [T, E]
  mask_view mask{};                                       ///< m [T], empty = all valid
  /// The routing matrix (the generic checks of losses/common.hpp read it).
  const routing_view<T>& matrix() const { return probs; }
};
/// Deduces the storage type from the views: `entropy_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
entropy_inputs(matrix_view<U>, Rest...) -> entropy_inputs<std::remove_const_t<U>>;

/// Router entropy L_H = eta * (1 / T_v) sum_t m_t (-sum_e P[t,e] log max(P[t,e], tiny))
/// (LOSSES.md section 7), gradient with respect to P.
struct entropy_loss : loss_api<entropy_loss, entropy_config> {
  static constexpr const char* name = "entropy_loss";  ///< in error messages
  static constexpr const char* label = "entropy";      ///< prefix of the CPU backend's error messages
  static constexpr index_t stats_counts = 1;           ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const entropy_inputs<T>&) const {
    return 1;
  }
};

/// The configuration checks of entropy_loss (the generic shape checks of losses/common.hpp
/// call them): tiny must be positive and finite in the accumulator type.
template <class T>
void validate_config(const char* who, const entropy_loss& loss, const entropy_inputs<T>&) {
  detail::require(loss.cfg.tiny > 0 && std::isfinite(loss.cfg.tiny) && static_cast<accumulator_t<T>>(loss.cfg.tiny) > 0,
                  who, ": tiny = ", loss.cfg.tiny, " must be positive and finite in the accumulator type");
}

namespace detail {

/// The row kernel of entropy_loss (the protocol is in backend/cpu/row_engine.hpp): no pass 1;
/// a valid row's term is -sum_e P log max(P, tiny) and its gradient gc * dfactor
/// (entropy_elem in math/router.hpp). With a normal tiny the logarithms run on the engine's
/// packets: the factor is written -(lp + one) with one = 1 above tiny and 0 below, which is
/// -(log p + 1) and -(log_tiny + 0) = -log_tiny exactly, entropy_elem's two cases; selecting
/// only loaded values and constants, with all arithmetic unconditional, lets the compiler
/// vectorise the loop (it does not speculate floating-point arithmetic under
/// -ftrapping-math). A subnormal tiny takes entropy_elem element by element.
template <class T>
struct entropy_kernel {
  using storage_type = T;
  using acc_type = accumulator_t<T>;
  using Acc = acc_type;
  matrix_view<const T> x;  ///< P
  mask_view mask;
  double eta = 0, grad_scale = 1;
  Acc tiny = Acc(0), log_tiny = Acc(0);
  index_t sum_width = 0, count_width = 0, stats_size = 1;
  bool reads_row = true, active = true;
  Acc inv_tv = Acc(0), gc = Acc(0);

  bool needs_pass1(bool) const { return false; }
  void stats_row(index_t, const Acc*, Acc*, index_t*) const {}
  void write_stats(const row_local<Acc>& local, double* out) const { out[0] = static_cast<double>(local.tv); }
  void prepare(const double* stats, const row_local<Acc>&) {
    const double tv = stats[0];
    active = tv > 0;
    inv_tv = active ? static_cast<Acc>(1.0 / tv) : Acc(0);
    gc = active ? static_cast<Acc>(grad_scale * eta / tv) : Acc(0);
  }
  bool wants_rows(bool) const { return true; }
  template <class Ops>
  Acc row(index_t, const Acc* MOEREG_RESTRICT p, Acc* g, Ops& ops) const {
    const index_t n = x.cols;
    if (!(tiny >= std::numeric_limits<Acc>::min())) {
      Acc sum = Acc(0);
      for (index_t e = 0; e < n; ++e) {
        const auto r = entropy_elem(p[e], tiny, log_tiny);
        sum -= r.plogp;
        if (g != nullptr) ops.put_at(g, e, gc * r.dfactor);
      }
      return sum;
    }
    Acc* MOEREG_RESTRICT df = ops.scratch(0);
    Acc* MOEREG_RESTRICT terms = ops.scratch(1);
    ops.log(p, n, df);
    for (index_t e = 0; e < n; ++e) {
      const Acc pe = p[e], log_pe = df[e];
      const bool above = pe > tiny;
      const Acc lp = above ? log_pe : log_tiny;
      const Acc one = above ? Acc(1) : Acc(0);
      terms[e] = pe * lp;
      df[e] = -(lp + one);
    }
    if (g != nullptr) ops.put(g, n, [&](index_t e) { return gc * df[e]; });
    return -ops.sum(terms, n);
  }
  double finish(Acc rows) const { return static_cast<double>(static_cast<Acc>(eta) * inv_tv * rows); }
};

}  // namespace detail

/// The row kernel of entropy_loss for these inputs (found by ADL by the row engines).
template <class T>
detail::entropy_kernel<T> make_row_kernel(const entropy_loss& loss, const entropy_inputs<T>& in, grad_options opts) {
  detail::entropy_kernel<T> k;
  k.x = in.probs;
  k.mask = in.mask;
  k.eta = loss.cfg.coef;
  k.grad_scale = opts.grad_scale;
  k.tiny = static_cast<accumulator_t<T>>(loss.cfg.tiny);
  k.log_tiny = std::log(k.tiny);
  return k;
}

MOEREG_NAMESPACE_END
