// Shared by the two Gram-based losses (specialization, orthogonality): the activations in
// either layout, read in place with the tensor's strides, and the gradient in the same layout.
#pragma once

#include "binding.hpp"

namespace moereg_torch {
namespace detail {

/// Calls f(input_view, grad_view_or_empty, grad_tensor) for token-major [T, k, d] acts (no
/// row_map) or expert-grouped [N, d] rows with row_map [T, k]. Both layouts take any strides,
/// so the activations are never copied; the gradient is a new contiguous tensor (zeroed for
/// the grouped layout, whose rows without a (token, slot) moereg never touches).
template <class F>
value_grad with_activations(const at::Tensor& acts, const moereg::topk_view& I, const opt_tensor& row_map,
                            bool want_grad, const char* who, const char* name, keep& kp, F&& f) {
  check_cpu(acts, who, name);
  return dispatch_float(acts, who, name, [&](auto tag) -> value_grad {
    using T = decltype(tag);
    at::Tensor g;
    double v;
    if (!row_map.has_value() || !row_map->defined()) {
      check_dim(acts, 3, who, name, "[T, k, d] (token-major; pass row_map for expert-grouped [N, d] rows)");
      const index_t d = acts.size(2), k = acts.size(1);
      const moereg::token_major lay(acts.size(0), k, d, stride_of(acts, 0, k * d), stride_of(acts, 1, d),
                                    stride_of(acts, 2, 1));
      const moereg::activation_view<const T, moereg::token_major> in{data_of<const T>(acts), lay};
      moereg::activation_view<T, moereg::token_major> gv{};
      if (want_grad) {
        g = grad_like(acts);
        gv = {data_of<T>(g), moereg::token_major(g.size(0), g.size(1), g.size(2))};
      }
      v = f(in, want_grad ? &gv : nullptr);
    } else {
      check_dim(acts, 2, who, name, "[N, d] (expert-grouped rows, with row_map)");
      const auto map = index_matrix_of(*row_map, who, "row_map", kp);
      (void)I;
      const index_t d = acts.size(1);
      const moereg::expert_grouped lay(map, acts.size(0), d, stride_of(acts, 0, d), stride_of(acts, 1, 1));
      const moereg::activation_view<const T, moereg::expert_grouped> in{data_of<const T>(acts), lay};
      moereg::activation_view<T, moereg::expert_grouped> gv{};
      if (want_grad) {
        g = at::zeros(acts.sizes(), acts.options().memory_format(at::MemoryFormat::Contiguous));
        gv = {data_of<T>(g), moereg::expert_grouped(map, g.size(0), d)};
      }
      v = f(in, want_grad ? &gv : nullptr);
    }
    return {value_tensor(v, acts), g};
  });
}

}  // namespace detail
}  // namespace moereg_torch
