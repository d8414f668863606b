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

inline void check_config(const char* who, const orthogonality_loss& loss) {
  require(loss.cfg.k >= 0, who, ": config k = ", loss.cfg.k, " is negative");
  require(loss.cfg.variant == ortho_variant::pairwise || loss.cfg.variant == ortho_variant::subspace, who,
          ": unknown variant");
  require(loss.cfg.reduction == ortho_reduction::mean || loss.cfg.reduction == ortho_reduction::sum, who,
          ": unknown reduction");
}

template <class T, class Layout>
void run(const cuda& be, const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in,
         stats_view reduced, const activation_view<T, Layout>* grad, grad_options opts, double* stats_out) {
  const char* who = "orthogonality (cuda)";
  check_config(who, loss);
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
}  // namespace detail

/// Bytes of workspace every CUDA entry point of the orthogonality loss needs for these inputs.
template <class T, class Layout>
std::size_t workspace_size(const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in,
                           const cuda& = {}) {
  return detail::cuda_gram::required_bytes(
      detail::cuda_orth::engine_request(loss, in, static_cast<const activation_view<T, Layout>*>(nullptr)));
}

/// Local statistics [T_v] into device memory `out`, enqueued on be.stream.
template <class T, class Layout>
void execute_stats(const cuda& be, const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in,
                   double* out) {
  detail::cuda_orth::run(be, loss, in, stats_view{}, static_cast<const activation_view<T, Layout>*>(nullptr),
                         grad_options{}, out);
}

/// Value into *be.value and, with `grad`, the gradient (through the grad view's layout),
/// enqueued on be.stream. Returns NaN.
template <class T, class Layout>
double execute(const cuda& be, const orthogonality_loss& loss, const orthogonality_inputs<T, Layout>& in,
               stats_view reduced, const activation_view<T, Layout>* grad, grad_options opts) {
  detail::cuda_orth::run(be, loss, in, reduced, grad, opts, nullptr);
  return std::numeric_limits<double>::quiet_NaN();
}

MOEREG_NAMESPACE_END
