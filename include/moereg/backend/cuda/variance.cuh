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
void validate(const variance_loss& loss, const variance_inputs<T>& in, stats_view reduced, const matrix_view<T>* grad,
              const cuda& be) {
  const char* who = "variance (cuda)";
  const auto& c = loss.cfg;
  require(c.axis == variance_axis::tokens || c.axis == variance_axis::experts, who, ": unknown axis ",
          static_cast<int>(c.axis));
  require(c.reduction == variance_reduction::mean || c.reduction == variance_reduction::sum, who,
          ": unknown reduction ", static_cast<int>(c.reduction));
  check_matrix(who, "scores", in.scores);
  require(in.scores.cols >= 1 || in.scores.rows == 0, who, ": scores has E = 0 columns");
  check_mask(who, in.mask, in.scores.rows);
  if (grad) check_grad(who, "grad_scores", *grad, in.scores);
  cuda_check_stats_shape(who, reduced, loss.stats_size(in));
  cuda_check_pointer(who, "scores", in.scores.data, be);
  cuda_check_pointer(who, "mask", in.mask.data, be);
  cuda_check_pointer(who, "reduced statistics", reduced.data, be);
  if (grad) cuda_check_pointer(who, "grad_scores", grad->data, be);
}

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
  validate(loss, in, reduced, grad, be);
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
}  // namespace detail

/// Bytes of workspace every CUDA entry point of the variance loss needs for these inputs.
template <class T>
std::size_t workspace_size(const variance_loss& loss, const variance_inputs<T>& in, const cuda& = {}) {
  return detail::cuda_router::required_bytes(detail::cuda_var::engine_request(loss, in));
}

/// Local statistics into device memory `out` (stats_size(in) doubles), enqueued on be.stream.
template <class T>
void execute_stats(const cuda& be, const variance_loss& loss, const variance_inputs<T>& in, double* out) {
  detail::cuda_var::run(be, loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr), grad_options{}, out);
}

/// Value into *be.value and, with `grad`, the gradient, enqueued on be.stream. Returns NaN.
template <class T>
double execute(const cuda& be, const variance_loss& loss, const variance_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grad, grad_options opts) {
  detail::cuda_var::run(be, loss, in, reduced, grad, opts, nullptr);
  return std::numeric_limits<double>::quiet_NaN();
}

MOEREG_NAMESPACE_END
