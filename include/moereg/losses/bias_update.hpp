// Auxiliary-loss-free load balancing (DeepSeek-V3, Liu et al. 2024), LOSSES.md section 7.
// An update rule, not a loss: there is no value and no gradient.
//
//   b_e <- b_e + u * sign(mean_e(c) - c_e)        (sign(0) = 0)
//   center: afterwards b_e <- b_e - mean_e(b)     (keeps the biases from drifting together)
//
// c_e is the number of tokens routed to expert e over the balancing window. The counts of
// the load-balancing loss's statistics are exactly these: for the micro or global scope,
// load_balancing_loss::local_stats returns [T_v, count_0, ..., count_{E-1}], so after the
// reduction over ranks / steps pass `stats.data() + 1` and E. Counts may be any arithmetic
// type (double, float, integers); the bias any storage type (float, double, half, bfloat16).
// mean(c) is formed in double and the bias arithmetic in accumulator_t of the bias type.
//
// Passes: the counts are read once, the bias read and written once (twice with center).
#pragma once

#include "../core/config.hpp"

#include <cmath>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../math/reduce.hpp"
#include "../math/router.hpp"

MOEREG_NAMESPACE_BEGIN

/// Configuration of bias_update() (auxiliary-loss-free balancing, LOSSES.md section 7).
struct bias_update_config {
  double rate = 1e-3;   ///< u, the bias update speed
  bool center = false;  ///< subtract mean(b) after the update
};

namespace detail {
/// The checks of a bias update that read no content, for every backend: the types, the sizes,
/// the pointers against the sizes, a finite rate.
template <class C, class B>
void check_bias_update_shapes(const char* who, const bias_update_config& cfg, const C* counts, index_t n_counts,
                              const B* bias, index_t n_bias) {
  static_assert(std::is_arithmetic_v<C>, "bias_update: counts must be an arithmetic type");
  static_assert(is_storage_type_v<B>, "bias_update: bias must be float, double, half or bfloat16");
  require(n_counts >= 0 && n_bias >= 0, who, ": negative size (counts ", n_counts, ", bias ", n_bias, ")");
  require(n_counts == n_bias, who, ": counts has ", n_counts, " entries but bias has ", n_bias);
  require(counts != nullptr || n_counts == 0, who, ": counts is null but has ", n_counts, " entries");
  require(bias != nullptr || n_bias == 0, who, ": bias is null but has ", n_bias, " entries");
  require(std::isfinite(cfg.rate), who, ": rate = ", cfg.rate, " is not finite");
}
}  // namespace detail

/// Updates bias[0..n_bias) in place from counts[0..n_counts); n_counts must equal n_bias.
/// Validates everything first: on a throw the bias is untouched.
template <class C, class B>
void bias_update(const bias_update_config& cfg, const C* counts, index_t n_counts, B* bias, index_t n_bias) {
  static_assert(!std::is_const_v<B>, "bias_update: bias must be float, double, half or bfloat16");
  using Acc = accumulator_t<B>;
  const char* who = "bias_update";
  detail::check_bias_update_shapes(who, cfg, counts, n_counts, bias, n_bias);
  const index_t E = n_bias;
  std::vector<double> c(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e) {
    c[static_cast<std::size_t>(e)] = static_cast<double>(counts[e]);
    detail::require(std::isfinite(c[static_cast<std::size_t>(e)]), who, ": counts[", e,
                    "] = ", c[static_cast<std::size_t>(e)], " is not finite");
  }
  if (E == 0) return;
  const double mean_c = detail::pairwise_sum(c.data(), E) / static_cast<double>(E);
  const Acc u = static_cast<Acc>(cfg.rate);
  std::vector<Acc> b(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e) {
    b[static_cast<std::size_t>(e)] = detail::bias_step(load(bias[e]), u, mean_c, c[static_cast<std::size_t>(e)]);
  }
  if (cfg.center) {
    const Acc mb = detail::pairwise_sum(b.data(), E) / static_cast<Acc>(E);
    for (auto& x : b) x -= mb;
  }
  for (index_t e = 0; e < E; ++e) store(bias[e], b[static_cast<std::size_t>(e)]);
}

/// std::vector convenience: bias.size() must equal counts.size().
template <class C, class B>
void bias_update(const bias_update_config& cfg, const std::vector<C>& counts, std::vector<B>& bias) {
  bias_update(cfg, counts.data(), static_cast<index_t>(counts.size()), bias.data(), static_cast<index_t>(bias.size()));
}

MOEREG_NAMESPACE_END
