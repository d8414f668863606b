// CUDA backend of the orthogonality loss (losses/orthogonality.hpp, LOSSES.md section 5): the
// Gram engine of gram.cuh with math::orthogonality_pairwise_token or
// math::orthogonality_subspace_token, the functions the CPU executor calls.
//
// Include <moereg/backend/cuda.hpp>, not this file.
#pragma once

#include "../../core/config.hpp"

#include <limits>

#include "../../losses/orthogonality.hpp"
#include "core.cuh"
#include "gram.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_orth {

template <class T, class Layout>
cuda_gram::request<T, Layout> engine_request(const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in,
                                             const activation_view<T, Layout>* grad) {
  cuda_gram::request<T, Layout> rq;
  rq.acts = in.acts;
  rq.topk = in.topk;
  rq.mask = in.mask;
  rq.num_experts = in.num_experts;
  rq.grad = grad;
  rq.orth = &loss;
  return rq;
}


template <class T, class Layout>
void run(const cuda& be, const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in,
         stats_view reduced, const activation_view<T, Layout>* grad, grad_options opts, double* stats_out) {
  const char* who = "orthogonality (cuda)";
  check_ortho_config(who, loss.cfg);
  auto rq = engine_request(loss, in, grad);
  cuda_gram::validate(who, loss.cfg.coef, loss.cfg.eps, rq, reduced, be);
  if (stats_out != nullptr) cuda_check_pointer(who, "statistics output", stats_out, be);
  rq.opts = opts;
  rq.stats_mode = stats_out != nullptr;
  rq.orth_reduced = reduced;
  rq.orth_value = be.value;
  rq.orth_stats = stats_out;
  cuda_gram::run(rq, be, who);
}

}  // namespace cuda_orth

// This loss's entries for the CUDA front end (backend/cuda/api.cuh).
template <class T, class Layout>
void cuda_run(const cuda& be, const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in,
              stats_view reduced, const activation_view<T, Layout>* grad, grad_options opts, double* stats_out) {
  cuda_orth::run(be, loss, in, reduced, grad, opts, stats_out);
}
template <class T, class Layout>
std::size_t cuda_workspace_bytes(const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in) {
  return cuda_gram::required_bytes(
      cuda_orth::engine_request(loss, in, static_cast<const activation_view<T, Layout>*>(nullptr)));
}

}  // namespace detail
MOEREG_NAMESPACE_END
