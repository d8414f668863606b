// CUDA backend of the router entropy (losses/entropy.hpp, LOSSES.md section 7).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// Runs the router engine (router.cuh) with this loss alone: a one-block count of T_v (or the
// reduced T_v, checked), a warp per row that reads P once and writes the gradient once
// (detail::entropy_elem of math/router.hpp per entry: the CPU's expressions), and a one-block
// fixed-order sum of the per-block partials of -sum p log max(p, tiny).
#pragma once

#include "../../core/config.hpp"

#include <cmath>
#include <limits>

#include "../../losses/entropy.hpp"
#include "core.cuh"
#include "router.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_ent {

template <class T>
void validate(const entropy_loss& loss, const entropy_inputs<T>& in, stats_view reduced, const matrix_view<T>* grad,
              const cuda& be) {
  const char* who = "entropy (cuda)";
  require(loss.cfg.tiny > 0 && std::isfinite(loss.cfg.tiny) && static_cast<accumulator_t<T>>(loss.cfg.tiny) > 0,
          who, ": tiny = ", loss.cfg.tiny, " must be positive and finite in the accumulator type");
  check_matrix(who, "probs", in.probs);
  require(in.probs.cols >= 1 || in.probs.rows == 0, who, ": probs has E = 0 columns");
  check_mask(who, in.mask, in.probs.rows);
  if (grad) check_grad(who, "grad_probs", *grad, in.probs);
  cuda_check_stats_shape(who, reduced, 1);
  cuda_check_pointer(who, "probs", in.probs.data, be);
  cuda_check_pointer(who, "mask", in.mask.data, be);
  cuda_check_pointer(who, "reduced statistics", reduced.data, be);
  if (grad) cuda_check_pointer(who, "grad_probs", grad->data, be);
}

template <class T>
cuda_router::request<T> engine_request(const entropy_loss& loss, const entropy_inputs<T>& in) {
  cuda_router::request<T> rq;
  rq.probs = in.probs;
  rq.mask = in.mask;
  rq.ent = &loss;
  return rq;
}

template <class T>
void run(const cuda& be, const entropy_loss& loss, const entropy_inputs<T>& in, stats_view reduced,
         const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  const char* who = "entropy (cuda)";
  validate(loss, in, reduced, grad, be);
  if (stats_out != nullptr) cuda_check_pointer(who, "statistics output", stats_out, be);
  auto rq = engine_request(loss, in);
  rq.stats_mode = stats_out != nullptr;
  rq.ent_reduced = reduced;
  rq.ent_value = be.value;
  rq.ent_stats = stats_out;
  if (grad != nullptr) rq.grad_probs = *grad, rq.want_grad_probs = true;
  rq.opts = opts;
  cuda_router::run(rq, be, who);
}

}  // namespace cuda_ent
}  // namespace detail

/// Bytes of workspace every CUDA entry point of the entropy loss needs for these inputs.
template <class T>
std::size_t workspace_size(const entropy_loss& loss, const entropy_inputs<T>& in, const cuda& = {}) {
  return detail::cuda_router::required_bytes(detail::cuda_ent::engine_request(loss, in));
}

/// Local statistics [T_v] into device memory `out`, enqueued on be.stream.
template <class T>
void execute_stats(const cuda& be, const entropy_loss& loss, const entropy_inputs<T>& in, double* out) {
  detail::cuda_ent::run(be, loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr), grad_options{}, out);
}

/// Value into *be.value and, with `grad`, the gradient, enqueued on be.stream. Returns NaN.
template <class T>
double execute(const cuda& be, const entropy_loss& loss, const entropy_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::cuda_ent::run(be, loss, in, reduced, grad, opts, nullptr);
  return std::numeric_limits<double>::quiet_NaN();
}

MOEREG_NAMESPACE_END
