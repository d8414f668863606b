// The body of every loss of moereg-eval, written once for both backends.
//
// run_NAME(rq, rs, loss, x) builds the loss's inputs from the request, asks the executor `x`
// where they live, and runs the library's value_and_grad (and local_stats for --stats-out).
// The CPU executor (cpu_exec below) uses the host views as they are; the CUDA executor
// (cuda_exec.cu) copies each input to the device, hands out device gradients that it copies
// back into the response, and reads the device status word. Float32 inputs run the float
// instantiation of the library, float64 the double one.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/coupling.hpp>
#include <moereg/losses/entropy.hpp>
#include <moereg/losses/importance.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/orthogonality.hpp>
#include <moereg/losses/specialization.hpp>
#include <moereg/losses/variance.hpp>
#include <moereg/losses/z_loss.hpp>

#include "eval.hpp"

namespace moereg_eval {

/// The CPU executor: views are used where they are.
struct cpu_exec {
  template <class V>
  V in(const V& v) {
    return v;
  }
  template <class V>
  V out(const V& v) {
    return v;
  }
  template <class Loss, class In>
  std::vector<double> stats(const Loss& loss, const In& in) {
    return loss.local_stats(in);
  }
  template <class Loss, class In, class Grad>
  double value_and_grad(const Loss& loss, const In& in, const Grad& grad, moereg::grad_options opts,
                        moereg::stats_view reduced) {
    return loss.value_and_grad(in, grad, opts, reduced);
  }
};

namespace detail {

/// Calls f(T{}) with T = float or double, as the dtype shared by the inputs `names` says.
template <class F>
void by_dtype(const request& rq, const std::vector<std::string>& names, F&& f) {
  if (rq.float_dtype(names) == npy::dtype::f4)
    f(float{});
  else
    f(double{});
}

/// value_and_grad with the gradient of input `name` and --stats-out / --stats-in.
template <class X, class Loss, class In, class Grad>
void finish(const request& rq, response& rs, const Loss& loss, const In& in, const Grad& grad, X& x) {
  if (rq.want_stats()) rs.stats = x.stats(loss, in);
  rs.value = x.value_and_grad(loss, in, grad, moereg::grad_options{rq.grad_scale(), false}, x.in(rq.stats()));
}

}  // namespace detail

template <class X>
void run_load_balancing(const request& rq, response& rs, const moereg::load_balancing_loss& loss, X& x) {
  detail::by_dtype(rq, {"probs"}, [&](auto tag) {
    using T = decltype(tag);
    moereg::load_balancing_inputs<T> in;
    in.probs = x.in(rq.matrix<T>("probs"));
    in.topk = x.in(rq.topk("topk"));
    in.mask = x.in(rq.mask());
    in.cu_seqlens = x.in(rq.offsets("cu_seqlens"));
    detail::finish(rq, rs, loss, in, x.out(rs.add_grad_matrix<T>("probs", rq.input("probs"))), x);
  });
}

/// The losses of one [T, E] matrix `name` and a mask: z-loss (logits), entropy and importance
/// (probs), variance (scores).
template <template <class> class Inputs, class Loss, class X>
void run_matrix_loss(const request& rq, response& rs, const Loss& loss, X& x, const std::string& name) {
  detail::by_dtype(rq, {name}, [&](auto tag) {
    using T = decltype(tag);
    Inputs<T> in{x.in(rq.matrix<T>(name)), x.in(rq.mask())};
    detail::finish(rq, rs, loss, in, x.out(rs.add_grad_matrix<T>(name, rq.input(name))), x);
  });
}

/// The losses of token-major activations [T, k, d] and their top-k (specialization,
/// orthogonality).
template <template <class, class> class Inputs, class Loss, class X>
void run_activation_loss(const request& rq, response& rs, const Loss& loss, X& x) {
  detail::by_dtype(rq, {"acts"}, [&](auto tag) {
    using T = decltype(tag);
    Inputs<T, moereg::token_major> in;
    in.acts = x.in(rq.activations<T>("acts"));
    in.topk = x.in(rq.topk("topk"));
    in.mask = x.in(rq.mask());
    const moereg::activation_view<T, moereg::token_major> grad{rs.add_grad<T>("acts", rq.input("acts")),
                                                               in.acts.layout};
    detail::finish(rq, rs, loss, in, x.out(grad), x);
  });
}

/// Coupling over layers probs0 .. probs{L-1} with topk0 .. topk{L-1} (checked by the caller).
template <class X>
void run_coupling(const request& rq, response& rs, const moereg::coupling_loss& loss, std::size_t L, X& x) {
  std::vector<std::string> floats;
  for (std::size_t l = 0; l < L; ++l) floats.push_back("probs" + std::to_string(l));
  detail::by_dtype(rq, floats, [&](auto tag) {
    using T = decltype(tag);
    std::vector<moereg::routing_view<T>> probs;
    std::vector<moereg::topk_view> topk;
    std::vector<moereg::matrix_view<T>> grads;
    for (std::size_t l = 0; l < L; ++l) {
      probs.push_back(x.in(rq.matrix<T>(floats[l])));
      topk.push_back(x.in(rq.topk("topk" + std::to_string(l))));
    }
    for (std::size_t l = 0; l < L; ++l) grads.push_back(x.out(rs.add_grad_matrix<T>(floats[l], rq.input(floats[l]))));
    moereg::coupling_inputs<T> in;
    in.probs = probs.data();
    in.topk = topk.data();
    in.layers = static_cast<moereg::index_t>(L);
    in.mask = x.in(rq.mask());
    detail::finish(rq, rs, loss, in, grads.data(), x);
  });
}

}  // namespace moereg_eval
