// CUDA backend of the variance loss (losses/variance.hpp, LOSSES.md section 6).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// Runs the router engine (router.cuh) with this loss alone. Tokens axis: masked column sums
// of S per block of 256 rows, a one-block finish for T_v and sbar (or both from the reduced
// statistics, checked: finite, T_v >= 0), then a warp per row that reads S once more and
// writes the gradient gc * (S - sbar) once while summing (S - sbar)^2. Experts axis: the row
// mean by a warp sum, then the same row pass. The constants come from
// detail::variance_scale of math/router.hpp (the CPU's expressions).
#pragma once

#include "../../core/config.hpp"

#include <limits>

#include "../../losses/variance.hpp"
#include "core.cuh"
#include "router.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_var {

template <class T>
cuda_router::request<T> engine_request(const variance_loss& loss, const variance_inputs<T>& in) {
  cuda_router::request<T> rq;
  rq.probs = in.scores;
  rq.mask = in.mask;
  rq.var = &loss;
  return rq;
}

template <class T>
void run(const cuda& be, const variance_loss& loss, const variance_inputs<T>& in, stats_view reduced,
         const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  const char* who = "variance (cuda)";
  cuda_validate(who, loss, in, reduced, grad, be);
  if (stats_out != nullptr) {
    cuda_check_stats_out(who, stats_out, loss.stats_size(in));
    cuda_check_pointer(who, "statistics output", stats_out, be);
  }
  auto rq = engine_request(loss, in);
  rq.stats_mode = stats_out != nullptr;
  rq.var_reduced = reduced;
  rq.var_value = be.value;
  rq.var_stats = stats_out;
  if (grad != nullptr) rq.grad_probs = *grad, rq.want_grad_probs = true;
  rq.opts = opts;
  cuda_router::run(rq, be, who);
}

}  // namespace cuda_var

// This loss's entries for the CUDA front end (backend/cuda/api.cuh).
template <class T>
void cuda_run(const cuda& be, const variance_loss& loss, const variance_inputs<T>& in,
              stats_view reduced, const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  cuda_var::run(be, loss, in, reduced, grad, opts, stats_out);
}
template <class T>
std::size_t cuda_workspace_bytes(const variance_loss& loss, const variance_inputs<T>& in) {
  return cuda_router::required_bytes(cuda_var::engine_request(loss, in));
}

}  // namespace detail
MOEREG_NAMESPACE_END
