// Variance loss (Guo, Lu, Nan et al. 2025, "Advancing Expert Specialization for Better MoE",
// L_v), LOSSES.md section 6.
//
// S [T, E] is the routing score matrix the caller passes (the paper: the scores after the
// top-k step, each row summing to 1).
//
//   tokens axis (paper, default):
//     sbar_e = (1 / T_v) sum_t m_t S[t,e]
//     L = -gamma (1/E) (1/T_v) sum_t m_t sum_e (S[t,e] - sbar_e)^2
//     dL/dS[t,e] = -gamma 2 m_t (S[t,e] - sbar_e) / (E T_v)
//     (the derivative through sbar vanishes: sum_t m_t (S[t,e] - sbar_e) = 0)
//   experts axis (the authors' released code):
//     L = -gamma (1/T_v) sum_t m_t var_unbiased_e(S[t,:]),   E = 1 gives 0
//     dL/dS[t,e] = -gamma m_t 2 (S[t,e] - mean_e S[t,:]) / ((E - 1) T_v)
//   reduction = sum drops the outer 1/T_v (the paper sums over tokens). LOSSES.md names the
//   option for the tokens axis; the library applies it to both axes. sbar always divides
//   by T_v: it is a mean by definition.
// gamma defaults to 1e-3.
//
// Statistics (LOSSES.md section 9), all sums:
//   tokens   [T_v, sum_t m_t S[t,0], ..., sum_t m_t S[t,E-1]]   (1 + E entries)
//   experts  [T_v]                                               (1 entry)
// With reduced statistics sbar (tokens axis) and T_v are global; everything else is this
// call's rows. Each part's value is its own rows' share of the whole sum, so the parts'
// values add up to the whole batch's value and each part's gradient rows equal the whole
// batch's rows. With reduction = sum the statistics are still needed on the tokens axis
// (sbar is a mean over the whole batch) and behave the same way; the parts' values then add
// to the whole batch's un-normalised sum. On the experts axis with reduction = sum, the
// statistics only decide the T_v = 0 rule.
//
// Passes over memory (value_and_grad): tokens axis two (column sums, then deviations and the
// gradient), one when reduced statistics are given; experts axis one. The gradient is
// written once. The description below (variance_kernel) runs on the row engines.
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <type_traits>
#include <vector>

#include "../math/router.hpp"
#include "common.hpp"

MOEREG_NAMESPACE_BEGIN

/// Over which axis the variance is taken (LOSSES.md section 6).
enum class variance_axis { tokens, experts };
/// Outer normalisation: mean over valid tokens (1/T_v) or plain sum over tokens.
enum class variance_reduction { mean, sum };

/// Configuration of variance_loss (LOSSES.md section 6).
struct variance_config {
  double coef = 1e-3;                                       ///< gamma
  variance_axis axis = variance_axis::tokens;               ///< tokens (the paper, default) or experts
  variance_reduction reduction = variance_reduction::mean;  ///< tokens axis: mean (default) or sum
};

struct variance_loss;

/// Inputs of variance_loss; T is the storage type of S.
template <class T>
struct variance_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = variance_loss;                         ///< the loss these inputs are for
  using grad_type = matrix_view<T>;                        ///< what backward() writes
  static constexpr const char* matrix_name = "scores";     ///< the routing matrix, as errors name it
  static constexpr const char* grad_name = "grad_scores";  ///< its gradient, as errors name it
  routing_view<T> scores;                                  ///< S [T, E]
  mask_view mask{};                                        ///< m [T], empty = all valid
  /// The routing matrix (the generic checks of losses/common.hpp read it).
  const routing_view<T>& matrix() const { return scores; }
};
/// Deduces the storage type from the views: `variance_inputs{view(x), ...}` needs no template argument.
template <class U, class... Rest>
variance_inputs(matrix_view<U>, Rest...) -> variance_inputs<std::remove_const_t<U>>;

/// Variance loss L_v = -gamma * (1 / E) (1 / T_v) sum_t m_t sum_e (S[t,e] - sbar_e)^2 (Guo et al. 2025;
/// LOSSES.md section 6), gradient with respect to the routing scores S.
struct variance_loss : loss_api<variance_loss, variance_config> {
  static constexpr const char* name = "variance_loss";  ///< in error messages
  static constexpr const char* label = "variance";      ///< prefix of the CPU backend's error messages
  static constexpr index_t stats_counts = 1;            ///< leading entries of the statistics that are counts
  /// Number of doubles local_stats() writes for these inputs (layout in the header comment).
  template <class T>
  index_t stats_size(const variance_inputs<T>& in) const {
    return cfg.axis == variance_axis::tokens ? 1 + in.scores.cols : 1;
  }
};

/// The configuration checks of variance_loss (the generic shape checks of losses/common.hpp
/// call them): a known axis and reduction.
template <class T>
void validate_config(const char* who, const variance_loss& loss, const variance_inputs<T>&) {
  const auto& c = loss.cfg;
  detail::require(c.axis == variance_axis::tokens || c.axis == variance_axis::experts, who, ": unknown axis ",
                  static_cast<int>(c.axis));
  detail::require(c.reduction == variance_reduction::mean || c.reduction == variance_reduction::sum, who,
                  ": unknown reduction ", static_cast<int>(c.reduction));
}

namespace detail {

/// The row kernel of variance_loss (the protocol is in backend/cpu/row_engine.hpp). Tokens
/// axis: pass 1 sums the columns unless reduced statistics are given, and the centre of a row
/// is sbar = column sum / T_v; experts axis: no pass 1, the centre is the row's own mean. A
/// valid row's term is q_t = sum_e (S[t,e] - centre)^2 and its gradient gc * (S - centre);
/// value = vc * sum_t m_t q_t (variance_scale in math/router.hpp).
template <class T>
struct variance_kernel {
  using storage_type = T;
  using acc_type = accumulator_t<T>;
  using Acc = acc_type;
  matrix_view<const T> x;  ///< S
  mask_view mask;
  variance_config cfg;
  double grad_scale = 1;
  index_t sum_width = 0, count_width = 0, stats_size = 1;
  bool reads_row = true, active = false;
  Acc vc = Acc(0), gc = Acc(0);
  std::vector<Acc> sbar;  ///< tokens axis: the column means

  bool tokens() const { return cfg.axis == variance_axis::tokens; }
  bool needs_pass1(bool reduced) const { return tokens() && !reduced; }
  void stats_row(index_t, const Acc* s, Acc* sums, index_t*) const {
    for (index_t e = 0; e < sum_width; ++e) sums[e] += s[e];
  }
  void write_stats(const row_local<Acc>& local, double* out) const {
    out[0] = static_cast<double>(local.tv);
    for (index_t e = 0; e < sum_width; ++e) out[e + 1] = static_cast<double>(local.sums[e]);
  }
  /// T_v = 0, and E = 1 on the experts axis, give 0 and a zero gradient.
  void prepare(const double* stats, const row_local<Acc>&) {
    const double tv = stats[0];
    const index_t E = x.cols;
    sbar.assign(static_cast<std::size_t>(sum_width), Acc(0));
    for (index_t e = 0; e < sum_width; ++e)
      sbar[static_cast<std::size_t>(e)] = tv > 0 ? static_cast<Acc>(stats[e + 1] / tv) : Acc(0);
    active = tv > 0 && (tokens() || E > 1);
    if (!active) return;
    const double norm = cfg.reduction == variance_reduction::mean ? 1.0 / tv : 1.0;
    const auto c = variance_scale<Acc>(cfg.coef, grad_scale, norm, static_cast<double>(tokens() ? E : E - 1));
    vc = c.vc;
    gc = c.gc;
  }
  bool wants_rows(bool) const { return true; }
  template <class Ops>
  Acc row(index_t, const Acc* s, Acc* g, Ops& ops) const {
    const index_t E = x.cols;
    if (tokens()) return deviations(s, sbar.data(), g, ops);
    Acc mean = Acc(0);
    for (index_t e = 0; e < E; ++e) mean += s[e];
    mean /= static_cast<Acc>(E);
    return deviations(s, mean, g, ops);
  }
  /// sum_e d_e^2 and the gradient gc * d_e of d_e = s_e - center_e, in one loop (the sum's
  /// latency hides the gradient's stores). center: the column means, or the row's mean.
  template <class C, class Ops>
  Acc deviations(const Acc* MOEREG_RESTRICT s, C center, Acc* MOEREG_RESTRICT g, Ops& ops) const {
    const index_t E = x.cols;
    const auto c = [&](index_t e) {
      if constexpr (std::is_pointer_v<C>)
        return center[e];
      else
        return center;
    };
    Acc q = Acc(0);
    if (g == nullptr) {
      for (index_t e = 0; e < E; ++e) {
        const Acc d = s[e] - c(e);
        q += d * d;
      }
    } else if (ops.assigning()) {
      for (index_t e = 0; e < E; ++e) {
        const Acc d = s[e] - c(e);
        q += d * d;
        g[e] = gc * d;
      }
    } else {
      for (index_t e = 0; e < E; ++e) {
        const Acc d = s[e] - c(e);
        q += d * d;
        g[e] += gc * d;
      }
    }
    return q;
  }
  double finish(Acc rows) const { return active ? static_cast<double>(vc * rows) : 0.0; }
};

}  // namespace detail

/// The row kernel of variance_loss for these inputs (found by ADL by the row engines).
template <class T>
detail::variance_kernel<T> make_row_kernel(const variance_loss& loss, const variance_inputs<T>& in, grad_options opts) {
  detail::variance_kernel<T> k;
  k.x = in.scores;
  k.mask = in.mask;
  k.cfg = loss.cfg;
  k.grad_scale = opts.grad_scale;
  k.sum_width = k.tokens() ? in.scores.cols : 0;
  k.stats_size = loss.stats_size(in);
  return k;
}

MOEREG_NAMESPACE_END
