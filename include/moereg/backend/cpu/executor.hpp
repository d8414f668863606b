// The CPU executor (include <moereg/backend/cpu.hpp>): the backend value `cpu`, parallel loops
// over fixed-size blocks of tokens, reductions of per-block partial results in a fixed order,
// and the row helpers every CPU engine uses.
//
// Determinism: blocks have a fixed size that does not depend on the thread count, each block
// is processed sequentially by one thread, and block partials are combined by a pairwise sum
// in block order. The same inputs therefore give bitwise the same value and gradient for any
// number of threads and on every run.
#pragma once

#include "internal.hpp"  // refuses direct inclusion; core/config.hpp

#include <algorithm>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#if MOEREG_HAS_OPENMP
#include <omp.h>
#endif

#include "../../core/types.hpp"
#include "../../core/views.hpp"
#include "../../math/reduce.hpp"

MOEREG_NAMESPACE_BEGIN

namespace detail {

/// Rows per block of the CPU reductions. Part of the numerical contract: changing it
/// changes the rounding of sums (not their exactness).
inline constexpr index_t cpu_block_rows = 256;

inline index_t num_blocks(index_t n, index_t block) {
  return n <= 0 ? 0 : (n + block - 1) / block;
}

/// Calls f(b, begin, end) for every block b of [0, n), in parallel across blocks.
template <class F>
void parallel_blocks(const cpu& be, index_t n, index_t block, F&& f) {
  const index_t nb = num_blocks(n, block);
#if MOEREG_HAS_OPENMP
  const int nt = be.threads > 0 ? be.threads : omp_get_max_threads();
  if (nb > 1 && nt > 1) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (index_t b = 0; b < nb; ++b) f(b, b * block, std::min(n, (b + 1) * block));
    return;
  }
#else
  (void)be;
#endif
  for (index_t b = 0; b < nb; ++b) f(b, b * block, std::min(n, (b + 1) * block));
}

/// out[j] = sum over blocks b of partials[b * width + j], in a fixed pairwise order.
template <class Acc>
void combine_blocks(const std::vector<Acc>& partials, index_t blocks, index_t width, Acc* out) {
  for (index_t j = 0; j < width; ++j) out[j] = blocks == 0 ? Acc(0) : pairwise_sum(partials.data() + j, blocks, width);
}

/// Writes one gradient element: overwrite or accumulate, in the storage type.
template <class T, class A>
MOEREG_FORCEINLINE void put_grad(T& dst, A v, bool accumulate) {
  if (accumulate)
    store(dst, load(dst) + v);
  else
    store(dst, v);
}

// ---------------------------------------------------------------------------------------
// Vectorised rows. Per-row losses whose cost is one exp or log per element (z-loss,
// entropy) evaluate a row with Eigen's packet math (AVX-512 / AVX2 / SSE2, whatever the
// build targets) on a scratch buffer that each block allocates once. Every reduction runs
// over that aligned scratch, never over the caller's memory, so its order depends only on
// the row length: the same row gives the same bits wherever it lies and whichever thread
// computes it.
// ---------------------------------------------------------------------------------------

/// Scratch for one row, aligned for Eigen's widest packet.
template <class Acc>
using row_scratch = std::vector<Acc, Eigen::aligned_allocator<Acc>>;

/// An Eigen array over aligned row scratch.
template <class Acc>
using scratch_array = Eigen::Map<Eigen::Array<Acc, Eigen::Dynamic, 1>, Eigen::AlignedMax>;

/// An Eigen array over row elements that may lie anywhere (read element-wise only).
template <class Acc>
using row_array = Eigen::Map<const Eigen::Array<Acc, Eigen::Dynamic, 1>>;

/// True when acc_row() needs its `conv` scratch for `m`: 16-bit storage or strided rows.
template <class T>
bool acc_row_converts(const matrix_view<const T>& m) {
  return !std::is_same_v<T, accumulator_t<T>> || !m.contiguous_rows();
}

/// Row t of `m` as contiguous accumulator values: the row itself when it is contiguous and
/// stored in the accumulator type, otherwise `conv` (m.cols elements) holding the converted
/// (or gathered) row. Either way the values are the same, so a strided view computes
/// bitwise what a compact copy of the same data computes.
template <class T>
MOEREG_FORCEINLINE const accumulator_t<T>* acc_row(const matrix_view<const T>& m, index_t t, accumulator_t<T>* conv) {
  const T* r = m.row(t);
  if constexpr (std::is_same_v<T, accumulator_t<T>>) {
    if (m.contiguous_rows()) return r;
  }
  for (index_t e = 0; e < m.cols; ++e) conv[e] = load(r[e * m.col_stride]);
  return conv;
}

/// Overwrites row t of a gradient with zeros, in the storage type.
template <class T>
MOEREG_FORCEINLINE void zero_grad_row(const matrix_view<T>& g, index_t t) {
  for (index_t e = 0; e < g.cols; ++e) store(g(t, e), accumulator_t<T>(0));
}

/// Writes row t of a gradient, c * v[e] for every column, per put_grad: a plain loop the
/// compiler vectorises when the row is contiguous, strided stores otherwise.
template <class T, class Acc>
MOEREG_FORCEINLINE void put_grad_row(const matrix_view<T>& g, index_t t, Acc c, const Acc* MOEREG_RESTRICT v,
                                     bool accumulate) {
  const index_t n = g.cols;
  if (g.contiguous_rows()) {
    T* MOEREG_RESTRICT d = g.row(t);
    if (accumulate)
      for (index_t e = 0; e < n; ++e) store(d[e], load(d[e]) + c * v[e]);
    else
      for (index_t e = 0; e < n; ++e) store(d[e], c * v[e]);
  } else {
    for (index_t e = 0; e < n; ++e) put_grad(g(t, e), c * v[e], accumulate);
  }
}

}  // namespace detail
MOEREG_NAMESPACE_END
