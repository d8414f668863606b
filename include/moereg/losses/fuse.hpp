// Fusion: several router losses evaluated in one read of their routing matrices.
//
//   auto f = moereg::fuse(load_balancing_loss{}, z_loss{}, entropy_loss{});
//   std::array<double, 3> v = f.value_and_grad(std::tie(lb_in, z_in, ent_in),
//                                              std::make_tuple(view(gP), view(gZ), view(gP)));
//
// Each loss keeps its own inputs, configuration, reduced statistics and value; what they share
// is the work: a matrix that several losses read (the same view) is read once per row, and a
// gradient that several losses write (the same view) is written once per row, with the sum of
// their contributions, so `lb` and `entropy` on the same P above give gP = dL_lb/dP +
// dL_H/dP. A gradient view with null data means that loss's gradient is not wanted. The
// values, the gradients and the statistics are those of the separate calls: the same
// formulas, summed in the same order (a shared gradient gets each contribution rounded into
// its sum instead of into storage).
//
// Every loss of a fusion must run on the row engine (backend/cpu/row_engine.hpp: the
// load-balancing micro and global scopes, z-loss, entropy, importance, variance, and any loss
// described by a row kernel), all on the same storage type and the same number of rows.
// Distinct gradient views must not overlap each other. The CPU backend runs fusions; on CUDA,
// backend/cuda/router_fused.cuh has its own fused router request.
#pragma once

#include "../core/config.hpp"

#include <array>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/types.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"

MOEREG_NAMESPACE_BEGIN

/// A fusion of losses L... (make one with fuse()).
template <class... L>
struct fused {
  static constexpr std::size_t size = sizeof...(L);   ///< the number of losses
  using values_type = std::array<double, size>;       ///< one value per loss, in order
  using reduced_type = std::array<stats_view, size>;  ///< one reduced statistics view per loss (empty: local)
  std::tuple<L...> losses;                            ///< the losses, each with its configuration

  /// Each loss's value for its inputs (a tuple of one inputs object per loss, e.g. std::tie).
  template <class... In, class Backend = cpu>
  values_type value(const std::tuple<In...>& in, const reduced_type& reduced = {}, const Backend& be = {}) const {
    static_assert(sizeof...(In) == size, "moereg::fused::value: pass one inputs object per loss");
    values_type v{};
    execute_fused(be, *this, in, reduced, null_grads(in), grad_options{}, v.data());
    return v;
  }
  /// Each loss's value, and grad_scale * its gradient written into its gradient view (the
  /// input's shape; null data: not wanted), per `opts`. A view shared by several losses
  /// receives the sum of their gradients.
  template <class... In, class... G, class Backend = cpu>
  values_type value_and_grad(const std::tuple<In...>& in, const std::tuple<G...>& grads, grad_options opts = {},
                             const reduced_type& reduced = {}, const Backend& be = {}) const {
    static_assert(sizeof...(In) == size && sizeof...(G) == size,
                  "moereg::fused::value_and_grad: pass one inputs object and one gradient view per loss");
    values_type v{};
    execute_fused(be, *this, in, reduced, grad_pointers(grads), opts, v.data());
    return v;
  }
  /// backward() of every loss: value_and_grad() without the values.
  template <class... In, class... G, class Backend = cpu>
  void backward(const std::tuple<In...>& in, const std::tuple<G...>& grads, grad_options opts = {},
                const reduced_type& reduced = {}, const Backend& be = {}) const {
    (void)value_and_grad(in, grads, opts, reduced, be);
  }
  /// Each loss's local statistics (LOSSES.md section 9), in one pass.
  template <class... In, class Backend = cpu>
  std::array<std::vector<double>, size> local_stats(const std::tuple<In...>& in, const Backend& be = {}) const {
    static_assert(sizeof...(In) == size, "moereg::fused::local_stats: pass one inputs object per loss");
    static_assert(detail::is_cpu_backend_v<Backend>, MOEREG_HOST_STATS_MESSAGE);
    std::array<std::vector<double>, size> s;
    std::array<double*, size> outs{};
    for_each_loss([&](auto i) {
      s[i].resize(static_cast<std::size_t>(std::get<i>(losses).stats_size(std::get<i>(in))));
      outs[i] = s[i].data();
    });
    execute_fused_stats(be, *this, in, outs.data());
    return s;
  }

 private:
  template <class F>
  static void for_each_loss(F&& f) {
    each(f, std::make_index_sequence<size>{});
  }
  template <class F, std::size_t... I>
  static void each(F& f, std::index_sequence<I...>) {
    (f(std::integral_constant<std::size_t, I>{}), ...);
  }
  template <class... In>
  static auto null_grads(const std::tuple<In...>&) {
    return std::tuple<const typename std::decay_t<In>::grad_type*...>{
        static_cast<const typename std::decay_t<In>::grad_type*>(nullptr)...};
  }
  template <class... G>
  static auto grad_pointers(const std::tuple<G...>& g) {
    return grad_pointers(g, std::index_sequence_for<G...>{});
  }
  template <class... G, std::size_t... I>
  static std::tuple<const G*...> grad_pointers(const std::tuple<G...>& g, std::index_sequence<I...>) {
    return {(std::get<I>(g).data != nullptr ? &std::get<I>(g) : nullptr)...};
  }
};

/// The fusion of losses l... (each a loss object with its configuration).
template <class... L>
fused<L...> fuse(const L&... l) {
  static_assert(sizeof...(L) >= 1, "moereg::fuse: give at least one loss");
  return fused<L...>{std::tuple<L...>(l...)};
}

MOEREG_NAMESPACE_END
