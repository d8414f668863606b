// The CUDA side of the one front end (losses/api.hpp): workspace_size, execute_stats and
// execute for every loss, written once over the entries each loss's .cuh provides:
//
//   void detail::cuda_run(const cuda&, const Loss&, const Inputs&, stats_view reduced,
//                         const GradView* grad, grad_options, double* stats_out);
//   std::size_t detail::cuda_workspace_bytes(const Loss&, const Inputs&);
//
// Include <moereg/backend/cuda.hpp>, not this file; it comes after every loss's .cuh.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <cstddef>
#include <limits>
#include <type_traits>

#include "../../losses/api.hpp"
#include "core.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
template <class Loss, class In>
using enable_cuda_entry = std::enable_if_t<std::is_same<typename In::loss_type, Loss>::value, int>;
}  // namespace detail

/// The CUDA backend of a call context with a value output (moereg::on(be).value_into(d)):
/// `be` with its value pointer replaced by the device pointer `out`.
inline cuda value_destination(cuda be, double* out) {
  be.value = out;
  return be;
}

/// Bytes of workspace every CUDA entry point of `loss` needs for these inputs (be.workspace,
/// be.workspace_bytes; the CUB convention: ask first, allocate once).
template <class Loss, class In, detail::enable_cuda_entry<Loss, In> = 0>
std::size_t workspace_size(const Loss& loss, const In& in, const cuda& = {}) {
  return detail::cuda_workspace_bytes(loss, in);
}

/// Local statistics (stats_size(in) doubles) into device memory `out`, enqueued on be.stream.
template <class Loss, class In, detail::enable_cuda_entry<Loss, In> = 0>
void execute_stats(const cuda& be, const Loss& loss, const In& in, double* out) {
  detail::cuda_run(be, loss, in, stats_view{}, static_cast<const detail::grad_view_t<In>*>(nullptr), grad_options{},
                   out);
}

/// The value into *be.value and, with `grad`, the gradient, enqueued on be.stream. Returns NaN:
/// the value is on the device. The gradient has the input's storage type (mixed-precision
/// gradients run on the CPU backend).
template <class Loss, class In, class G, detail::enable_cuda_entry<Loss, In> = 0>
double execute(const cuda& be, const Loss& loss, const In& in, stats_view reduced, const G* grad, grad_options opts) {
  static_assert(std::is_same<G, detail::grad_view_t<In>>::value,
                "moereg: on the CUDA backend the gradient has the input's storage type; mixed-precision "
                "gradients (a float gradient for bfloat16 inputs) run on the CPU backend");
  detail::cuda_run(be, loss, in, reduced, grad, opts, nullptr);
  return std::numeric_limits<double>::quiet_NaN();
}

MOEREG_NAMESPACE_END
