// The front end every loss shares, written once (STYLE.md: views -> loss -> backend -> gradient
// views). A loss is
//
//   struct entropy_loss : loss_api<entropy_loss, entropy_config> {
//     static constexpr const char* name = "entropy_loss";
//     template <class T> index_t stats_size(const entropy_inputs<T>&) const;
//   };
//
// with inputs that name their loss and their gradient view:
//
//   template <class T> struct entropy_inputs {
//     using loss_type = entropy_loss;       // these inputs belong to entropy_loss
//     using grad_type = matrix_view<T>;     // what backward() writes (a pointer: one view per layer)
//     ...
//   };
//
// and a backend is a pair of functions found by argument-dependent lookup:
//
//   double execute(const Backend&, const Loss&, const Inputs&, stats_view reduced,
//                  const GradView* grad /* null: value only */, grad_options);
//   void execute_stats(const Backend&, const Loss&, const Inputs&, double* out);
//
// The configuration is the base's one member, so a loss is still an aggregate of its
// configuration: `entropy_loss{cfg}`, `entropy_loss{{1e-3, 1e-30}}` and `entropy_loss loss;
// loss.cfg.coef = ...` all work (the braces of the base are elided).
#pragma once

#include "../core/config.hpp"

#include <cstddef>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/validate.hpp"
#include "../core/views.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

/// The argument backward() and value_and_grad() take for inputs `In`: In::grad_type.
template <class In>
using grad_arg_t = typename In::grad_type;

/// The view type the backend's execute() receives a pointer to: the gradient view itself, or
/// the element type when the argument is already a pointer (one view per layer).
template <class In>
using grad_view_t = std::remove_const_t<std::remove_pointer_t<grad_arg_t<In>>>;

/// Pointer to the gradient view(s) for execute(): the address of a view, or the caller's
/// array of views (which must not be null).
template <class G>
const G* grad_pointer(const char* who, const G& g) {
  (void)who;
  return &g;
}
template <class G>
const G* grad_pointer(const char* who, const G* g) {
  require(g != nullptr, who, ": grads is null; pass one gradient view per layer");
  return g;
}

/// True when a backend's execute() for Loss on In is declared (its header is included).
template <class Backend, class Loss, class In, class = void>
struct has_execute : std::false_type {};
template <class Backend, class Loss, class In>
struct has_execute<Backend, Loss, In,
                   std::void_t<decltype(execute(std::declval<const Backend&>(), std::declval<const Loss&>(),
                                                std::declval<const In&>(), stats_view{},
                                                static_cast<const grad_view_t<In>*>(nullptr), grad_options{}))>>
    : std::true_type {};

}  // namespace detail

#define MOEREG_NO_BACKEND_MESSAGE                                                                          \
  "moereg: no backend runs this loss here: include <moereg/backend/cpu.hpp> (or <moereg/moereg.hpp>) for " \
  "the CPU, <moereg/backend/cuda.hpp> for CUDA"

/// The CPU backend needs no workspace: 0 bytes for every loss (the CUDA overload is in
/// backend/cuda/api.cuh), so trainer code can ask every backend the same question.
template <class Loss, class In, std::enable_if_t<std::is_same<typename In::loss_type, Loss>::value, int> = 0>
constexpr std::size_t workspace_size(const Loss&, const In&, const cpu&) {
  return 0;
}

namespace detail {
/// workspace_size(loss, in, be) of whichever backend `be` is (found by argument-dependent lookup).
template <class Loss, class In, class Backend>
std::size_t workspace_of(const Loss& loss, const In& in, const Backend& be) {
  return workspace_size(loss, in, be);
}
}  // namespace detail

/// The front end of loss `Self` with configuration `Config`: local_stats, workspace_size, value,
/// backward and value_and_grad on every backend (the CPU by default). Every call validates its arguments
/// before it reads or writes anything and throws moereg::error on invalid input, leaving the
/// caller's buffers untouched.
template <class Self, class Config>
struct loss_api {
  Config cfg{};  ///< the configuration; defaults from LOSSES.md

 private:
  template <class In>
  using enable_for = std::enable_if_t<std::is_same<typename In::loss_type, Self>::value, int>;
  const Self& self() const { return static_cast<const Self&>(*this); }

 public:
  /// This call's sum-reducible statistics (LOSSES.md section 9), stats_size(in) doubles in the
  /// layout of the loss's header comment. Host memory, so the CPU backend only.
  template <class In, class Backend = cpu, enable_for<In> = 0>
  std::vector<double> local_stats(const In& in, const Backend& be = {}) const {
    static_assert(detail::is_cpu_backend_v<Backend>, MOEREG_HOST_STATS_MESSAGE);
    std::vector<double> s(static_cast<std::size_t>(self().stats_size(in)));
    execute_stats(be, self(), in, s.data());
    return s;
  }
  /// local_stats() into a caller buffer of stats_size(in) doubles on the backend's device;
  /// `out` is untouched when it throws.
  template <class In, class Backend = cpu, enable_for<In> = 0>
  void local_stats(const In& in, double* out, const Backend& be = {}) const {
    detail::check_stats_out(Self::name, out, self().stats_size(in));
    execute_stats(be, self(), in, out);
  }
  /// Bytes of workspace a call with these inputs needs on backend `be` (0 on the CPU; on CUDA
  /// the caller allocates it once and passes it in be.workspace).
  template <class In, class Backend = cpu, enable_for<In> = 0>
  std::size_t workspace_size(const In& in, const Backend& be = {}) const {
    return detail::workspace_of(self(), in, be);
  }
  /// The loss (coefficient included). With `reduced` (statistics summed over the parts of a
  /// batch) the global counts of LOSSES.md section 9 are used.
  template <class In, class Backend = cpu, enable_for<In> = 0>
  double value(const In& in, stats_view reduced = {}, const Backend& be = {}) const {
    static_assert(detail::has_execute<Backend, Self, In>::value, MOEREG_NO_BACKEND_MESSAGE);
    return execute(be, self(), in, reduced, static_cast<const detail::grad_view_t<In>*>(nullptr), grad_options{});
  }
  /// Writes grad_scale * dL/d(input) into `grad` (the input's shape, its own strides or
  /// layout; for the coupling loss an array of one view per layer), overwriting or adding
  /// per `opts`.
  template <class In, class Backend = cpu, enable_for<In> = 0>
  void backward(const In& in, detail::grad_arg_t<In> grad, grad_options opts = {}, stats_view reduced = {},
                const Backend& be = {}) const {
    static_assert(detail::has_execute<Backend, Self, In>::value, MOEREG_NO_BACKEND_MESSAGE);
    (void)execute(be, self(), in, reduced, detail::grad_pointer(Self::name, grad), opts);
  }
  /// value() and backward() in one pass (the inputs read once, the gradient written once);
  /// returns the value.
  template <class In, class Backend = cpu, enable_for<In> = 0>
  double value_and_grad(const In& in, detail::grad_arg_t<In> grad, grad_options opts = {}, stats_view reduced = {},
                        const Backend& be = {}) const {
    static_assert(detail::has_execute<Backend, Self, In>::value, MOEREG_NO_BACKEND_MESSAGE);
    return execute(be, self(), in, reduced, detail::grad_pointer(Self::name, grad), opts);
  }

  /// value() with the backend and reduced statistics of a call context (moereg::on(be)...).
  template <class In, class Backend, enable_for<In> = 0>
  double value(const In& in, const call_context<Backend>& c) const {
    return value(in, c.reduced, c.backend);
  }
  /// backward() with the options, reduced statistics and backend of a call context.
  template <class In, class Backend, enable_for<In> = 0>
  void backward(const In& in, detail::grad_arg_t<In> grad, const call_context<Backend>& c) const {
    backward(in, grad, c.opts, c.reduced, c.backend);
  }
  /// value_and_grad() with the options, reduced statistics and backend of a call context.
  template <class In, class Backend, enable_for<In> = 0>
  double value_and_grad(const In& in, detail::grad_arg_t<In> grad, const call_context<Backend>& c) const {
    return value_and_grad(in, grad, c.opts, c.reduced, c.backend);
  }
};

MOEREG_NAMESPACE_END
