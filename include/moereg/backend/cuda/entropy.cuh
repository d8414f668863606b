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
  cuda_validate(who, loss, in, reduced, grad, be);
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

// This loss's entries for the CUDA front end (backend/cuda/api.cuh).
template <class T>
void cuda_run(const cuda& be, const entropy_loss& loss, const entropy_inputs<T>& in,
              stats_view reduced, const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  cuda_ent::run(be, loss, in, reduced, grad, opts, stats_out);
}
template <class T>
std::size_t cuda_workspace_bytes(const entropy_loss& loss, const entropy_inputs<T>& in) {
  return cuda_router::required_bytes(cuda_ent::engine_request(loss, in));
}

}  // namespace detail
MOEREG_NAMESPACE_END
