// CUDA backend of the importance loss (losses/importance.hpp, LOSSES.md section 7).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// Runs the router engine (router.cuh) with this loss alone: masked column sums of P per block
// of 256 rows (skipped with reduced statistics, which are checked: finite), a one-block finish
// (imp, mu, the population variance and every expert's coefficient through
// detail::importance_coeff of math/router.hpp, the CPU's expressions; fixed-order sums), and a
// gradient kernel that writes m_t * coeff[e] (P is not read again).
#pragma once

#include "../../core/config.hpp"

#include <limits>

#include "../../losses/importance.hpp"
#include "core.cuh"
#include "router.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_imp {

template <class T>
void validate(const importance_loss& loss, const importance_inputs<T>& in, stats_view reduced,
              const matrix_view<T>* grad, const cuda& be) {
  const char* who = "importance (cuda)";
  check_matrix(who, "probs", in.probs);
  require(in.probs.cols >= 1 || in.probs.rows == 0, who, ": probs has E = 0 columns");
  check_mask(who, in.mask, in.probs.rows);
  if (grad) check_grad(who, "grad_probs", *grad, in.probs);
  cuda_check_stats_shape(who, reduced, loss.stats_size(in));
  cuda_check_pointer(who, "probs", in.probs.data, be);
  cuda_check_pointer(who, "mask", in.mask.data, be);
  cuda_check_pointer(who, "reduced statistics", reduced.data, be);
  if (grad) cuda_check_pointer(who, "grad_probs", grad->data, be);
}

template <class T>
cuda_router::request<T> engine_request(const importance_loss& loss, const importance_inputs<T>& in) {
  cuda_router::request<T> rq;
  rq.probs = in.probs;
  rq.mask = in.mask;
  rq.imp = &loss;
  return rq;
}

template <class T>
void run(const cuda& be, const importance_loss& loss, const importance_inputs<T>& in, stats_view reduced,
         const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  const char* who = "importance (cuda)";
  validate(loss, in, reduced, grad, be);
  if (stats_out != nullptr) {
    cuda_check_stats_out(who, stats_out, loss.stats_size(in));
    cuda_check_pointer(who, "statistics output", stats_out, be);
  }
  auto rq = engine_request(loss, in);
  rq.stats_mode = stats_out != nullptr;
  rq.imp_reduced = reduced;
  rq.imp_value = be.value;
  rq.imp_stats = stats_out;
  if (grad != nullptr) rq.grad_probs = *grad, rq.want_grad_probs = true;
  rq.opts = opts;
  cuda_router::run(rq, be, who);
}

}  // namespace cuda_imp
}  // namespace detail

/// Bytes of workspace every CUDA entry point of the importance loss needs for these inputs.
template <class T>
std::size_t workspace_size(const importance_loss& loss, const importance_inputs<T>& in, const cuda& = {}) {
  return detail::cuda_router::required_bytes(detail::cuda_imp::engine_request(loss, in));
}

/// Local statistics [imp_0, ..., imp_{E-1}] into device memory `out`, enqueued on be.stream.
template <class T>
void execute_stats(const cuda& be, const importance_loss& loss, const importance_inputs<T>& in, double* out) {
  detail::cuda_imp::run(be, loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr), grad_options{}, out);
}

/// Value into *be.value and, with `grad`, the gradient, enqueued on be.stream. Returns NaN.
template <class T>
double execute(const cuda& be, const importance_loss& loss, const importance_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::cuda_imp::run(be, loss, in, reduced, grad, opts, nullptr);
  return std::numeric_limits<double>::quiet_NaN();
}

MOEREG_NAMESPACE_END
