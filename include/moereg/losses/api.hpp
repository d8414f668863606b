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

/// The storage type of a view (its first template argument) and the same view over storage
/// U: matrix_view<T> -> matrix_view<U>, activation_view<T, L> -> activation_view<U, L>.
template <class V>
struct view_storage {};
template <template <class...> class V, class T, class... R>
struct view_storage<V<T, R...>> {
  using type = T;
  template <class U>
  using rebind = V<U, R...>;
};

/// True when G (a view, or a pointer to views where In takes one per layer) is a gradient for
/// inputs In in another storage type than In's own: In::grad_type with only its storage type
/// changed, to float, double, half or bfloat16 (mixed precision: a float gradient for bfloat16
/// activations).
template <class In, class G, class = void>
struct is_mixed_grad : std::false_type {};
template <class In, class G>
struct is_mixed_grad<In, G,
                     std::void_t<typename view_storage<std::remove_const_t<std::remove_pointer_t<G>>>::type,
                                 typename view_storage<grad_view_t<In>>::type>> {
  using own = view_storage<grad_view_t<In>>;
  using view = std::remove_const_t<std::remove_pointer_t<G>>;
  using U = typename view_storage<view>::type;
  static constexpr bool value = std::is_pointer<G>::value == std::is_pointer<grad_arg_t<In>>::value &&
                                is_storage_type_v<U> && !std::is_same<U, typename own::type>::value &&
                                std::is_same<view, typename own::template rebind<U>>::value;
};
template <class In, class G>
using enable_mixed_grad = std::enable_if_t<is_mixed_grad<In, G>::value, int>;

/// Pointer to the gradient view(s) for execute(): the address of a view, or the caller's
/// array of views (which must not be null), const or not.
template <class G, std::enable_if_t<!std::is_pointer<G>::value, int> = 0>
const G* grad_pointer(const char* who, const G& g) {
  (void)who;
  return &g;
}
template <class G>
const G* grad_pointer(const char* who, const G* g) {
  require(g != nullptr, who, ": grads is null; pass one gradient view per layer");
  return g;
}

/// The backend a call context runs on: a backend that writes its value to memory of its own
/// (CUDA, be.value) is given the context's value output by value_destination() (found by
/// argument-dependent lookup, backend/cuda/api.cuh); any other backend is used as it is.
template <class Backend>
Backend value_destination(const Backend& be, double*) {
  return be;
}
/// Runs f(backend) for call context c and returns its value; on the CPU the value is also
/// stored in c.value_out when it is given.
template <class Backend, class F>
double with_value_out(const call_context<Backend>& c, F&& f) {
  if constexpr (is_cpu_backend_v<Backend>) {
    const double v = f(c.backend);
    if (c.value_out != nullptr) *c.value_out = v;
    return v;
  } else {
    return f(c.value_out != nullptr ? value_destination(c.backend, c.value_out) : c.backend);
  }
}

/// True when a backend's execute() for Loss on In, with gradient view GV, is declared (its
/// header is included).
template <class Backend, class Loss, class In, class GV = grad_view_t<In>, class = void>
struct has_execute : std::false_type {};
template <class Backend, class Loss, class In, class GV>
struct has_execute<
    Backend, Loss, In, GV,
    std::void_t<decltype(execute(std::declval<const Backend&>(), std::declval<const Loss&>(), std::declval<const In&>(),
                                 stats_view{}, static_cast<const GV*>(nullptr), grad_options{}))>> : std::true_type {};

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

  /// backward() into a gradient of another storage type than the input's (mixed precision:
  /// a float gradient for bfloat16 or half inputs, the layout trainers keep). The values are
  /// those of the same-type call before their one rounding into the input's type; in
  /// accumulate mode they are added in the gradient's type. Every storage pair works on the
  /// CPU; on CUDA the gradient has the input's storage type.
  template <class In, class G, class Backend = cpu, enable_for<In> = 0, detail::enable_mixed_grad<In, G> = 0>
  void backward(const In& in, const G& grad, grad_options opts = {}, stats_view reduced = {},
                const Backend& be = {}) const {
    (void)value_and_grad(in, grad, opts, reduced, be);
  }
  /// value_and_grad() into a gradient of another storage type than the input's (see backward()).
  template <class In, class G, class Backend = cpu, enable_for<In> = 0, detail::enable_mixed_grad<In, G> = 0>
  double value_and_grad(const In& in, const G& grad, grad_options opts = {}, stats_view reduced = {},
                        const Backend& be = {}) const {
    using GV = typename detail::is_mixed_grad<In, G>::view;
    static_assert(detail::has_execute<Backend, Self, In, GV>::value, MOEREG_NO_BACKEND_MESSAGE);
    return execute(be, self(), in, reduced, detail::grad_pointer(Self::name, grad), opts);
  }
  /// The mixed-precision backward() with the options, reduced statistics and backend of a call
  /// context.
  template <class In, class G, class Backend, enable_for<In> = 0, detail::enable_mixed_grad<In, G> = 0>
  void backward(const In& in, const G& grad, const call_context<Backend>& c) const {
    (void)value_and_grad(in, grad, c);
  }
  /// The mixed-precision value_and_grad() with the options, reduced statistics and backend of a
  /// call context.
  template <class In, class G, class Backend, enable_for<In> = 0, detail::enable_mixed_grad<In, G> = 0>
  double value_and_grad(const In& in, const G& grad, const call_context<Backend>& c) const {
    return detail::with_value_out(c,
                                  [&](const Backend& be) { return value_and_grad(in, grad, c.opts, c.reduced, be); });
  }

  /// value() with the backend and reduced statistics of a call context (moereg::on(be)...).
  template <class In, class Backend, enable_for<In> = 0>
  double value(const In& in, const call_context<Backend>& c) const {
    return detail::with_value_out(c, [&](const Backend& be) { return value(in, c.reduced, be); });
  }
  /// backward() with the options, reduced statistics and backend of a call context.
  template <class In, class Backend, enable_for<In> = 0>
  void backward(const In& in, detail::grad_arg_t<In> grad, const call_context<Backend>& c) const {
    (void)value_and_grad(in, grad, c);
  }
  /// value_and_grad() with the options, reduced statistics and backend of a call context.
  template <class In, class Backend, enable_for<In> = 0>
  double value_and_grad(const In& in, detail::grad_arg_t<In> grad, const call_context<Backend>& c) const {
    return detail::with_value_out(c,
                                  [&](const Backend& be) { return value_and_grad(in, grad, c.opts, c.reduced, be); });
  }
};

MOEREG_NAMESPACE_END
