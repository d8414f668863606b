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
  cuda_validate(who, loss, in, reduced, grad, be);
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

// This loss's entries for the CUDA front end (backend/cuda/api.cuh).
template <class T>
void cuda_run(const cuda& be, const importance_loss& loss, const importance_inputs<T>& in,
              stats_view reduced, const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  cuda_imp::run(be, loss, in, reduced, grad, opts, stats_out);
}
template <class T>
std::size_t cuda_workspace_bytes(const importance_loss& loss, const importance_inputs<T>& in) {
  return cuda_router::required_bytes(cuda_imp::engine_request(loss, in));
}

}  // namespace detail
MOEREG_NAMESPACE_END
