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
  cuda_validate(who, loss, in, reduced, grad, be);
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

// This loss's entries for the CUDA front end (backend/cuda/api.cuh).
template <class T>
void cuda_run(const cuda& be, const z_loss& loss, const z_loss_inputs<T>& in,
              stats_view reduced, const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  cuda_z::run(be, loss, in, reduced, grad, opts, stats_out);
}
template <class T>
std::size_t cuda_workspace_bytes(const z_loss& loss, const z_loss_inputs<T>& in) {
  return cuda_router::required_bytes(cuda_z::engine_request(loss, in));
}

}  // namespace detail
MOEREG_NAMESPACE_END
