// CUDA backend of the router z-loss (losses/z_loss.hpp, LOSSES.md section 2).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// Runs the router engine (router.cuh) with this loss alone: a one-block count of T_v (or the
// reduced T_v, checked), a warp per row for lse and the gradient (row maximum by a warp max,
// sum of exp(z - shift) per lane in order and then by a butterfly; lse_shift / lse_term /
// lse_finish / z_row_grad_coeff of math/router.hpp, the CPU's arithmetic), and a one-block
// sum of the per-block partials of lse^2 in a fixed order. Z is read per valid row for the
// maximum, the sum and the gradient (the second and third reads are served by L1/L2); the
// gradient is written once.
#pragma once

#include "../../core/config.hpp"

#include <limits>

#include "../../losses/z_loss.hpp"
#include "core.cuh"
#include "router.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_z {

template <class T>
void validate(const z_loss_inputs<T>& in, stats_view reduced, const matrix_view<T>* grad, const cuda& be) {
  const char* who = "z_loss (cuda)";
  check_matrix(who, "logits", in.logits);
  require(in.logits.cols >= 1 || in.logits.rows == 0, who, ": logits has E = 0 columns");
  check_mask(who, in.mask, in.logits.rows);
  if (grad) check_grad(who, "grad_logits", *grad, in.logits);
  cuda_check_stats_shape(who, reduced, 1);
  cuda_check_pointer(who, "logits", in.logits.data, be);
  cuda_check_pointer(who, "mask", in.mask.data, be);
  cuda_check_pointer(who, "reduced statistics", reduced.data, be);
  if (grad) cuda_check_pointer(who, "grad_logits", grad->data, be);
}

template <class T>
cuda_router::request<T> engine_request(const z_loss& loss, const z_loss_inputs<T>& in) {
  cuda_router::request<T> rq;
  rq.logits = in.logits;
  rq.mask = in.mask;
  rq.z = &loss;
  return rq;
}

template <class T>
void run(const cuda& be, const z_loss& loss, const z_loss_inputs<T>& in, stats_view reduced, const matrix_view<T>* grad,
         grad_options opts, double* stats_out) {
  const char* who = "z_loss (cuda)";
  validate(in, reduced, grad, be);
  if (stats_out != nullptr) cuda_check_pointer(who, "statistics output", stats_out, be);
  auto rq = engine_request(loss, in);
  rq.stats_mode = stats_out != nullptr;
  rq.z_reduced = reduced;
  rq.z_value = be.value;
  rq.z_stats = stats_out;
  if (grad != nullptr) rq.grad_logits = *grad, rq.want_grad_logits = true;
  rq.opts = opts;
  cuda_router::run(rq, be, who);
}

}  // namespace cuda_z
}  // namespace detail

/// Bytes of workspace every CUDA entry point of the z-loss needs for these inputs.
template <class T>
std::size_t workspace_size(const z_loss& loss, const z_loss_inputs<T>& in, const cuda& = {}) {
  return detail::cuda_router::required_bytes(detail::cuda_z::engine_request(loss, in));
}

/// Local statistics [T_v] into device memory `out`, enqueued on be.stream.
template <class T>
void execute_stats(const cuda& be, const z_loss& loss, const z_loss_inputs<T>& in, double* out) {
  detail::cuda_z::run(be, loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr), grad_options{}, out);
}

/// Value into *be.value and, with `grad`, the gradient, enqueued on be.stream. Returns NaN.
template <class T>
double execute(const cuda& be, const z_loss& loss, const z_loss_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::cuda_z::run(be, loss, in, reduced, grad, opts, nullptr);
  return std::numeric_limits<double>::quiet_NaN();
}

MOEREG_NAMESPACE_END
