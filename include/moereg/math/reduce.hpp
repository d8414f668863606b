// Fixed-order summation. The order depends only on the number of terms, never on the
// number of threads, so a reduction gives bitwise the same result on every run.
#pragma once

#include "../core/config.hpp"
#include "../core/types.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

/// Pairwise (cascade) sum of v[0], v[stride], ..., v[(n - 1) * stride]: error O(log n)
/// instead of O(n), and a fixed tree for a given n.
template <class Acc>
MOEREG_HOST_DEVICE Acc pairwise_sum(const Acc* v, index_t n, index_t stride = 1) {
  if (n <= 8) {
    Acc s = Acc(0);
    for (index_t i = 0; i < n; ++i) s += v[i * stride];
    return s;
  }
  const index_t h = n / 2;
  return pairwise_sum(v, h, stride) + pairwise_sum(v + h * stride, n - h, stride);
}

}  // namespace detail
MOEREG_NAMESPACE_END
