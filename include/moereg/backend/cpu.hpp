// The CPU executor: parallel loops over fixed-size blocks of tokens, and reductions of
// per-block partial results in a fixed order.
//
// Determinism: blocks have a fixed size that does not depend on the thread count, each block
// is processed sequentially by one thread, and block partials are combined by a pairwise sum
// in block order. The same inputs therefore give bitwise the same value and gradient for any
// number of threads and on every run.
#pragma once

#include <algorithm>
#include <vector>

#if MOEREG_HAS_OPENMP
#include <omp.h>
#endif

#include "../core/config.hpp"
#include "../core/types.hpp"
#include "../math/reduce.hpp"

namespace moereg {

/// Selects the CPU backend. `threads` = 0 uses OpenMP's default (OMP_NUM_THREADS), 1 runs
/// serially; without OpenMP every call is serial.
struct cpu {
  int threads = 0;  ///< 0 = OpenMP default, 1 = serial, n > 1 = n OpenMP threads
};

namespace detail {

/// Rows per block of the CPU reductions. Part of the numerical contract: changing it
/// changes the rounding of sums (not their exactness).
inline constexpr index_t cpu_block_rows = 256;

inline index_t num_blocks(index_t n, index_t block) { return n <= 0 ? 0 : (n + block - 1) / block; }

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
  if (accumulate) store(dst, load(dst) + v);
  else store(dst, v);
}

}  // namespace detail
}  // namespace moereg
