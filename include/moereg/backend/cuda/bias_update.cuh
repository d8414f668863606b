// CUDA backend of the auxiliary-loss-free bias update (losses/bias_update.hpp, LOSSES.md
// section 7, DeepSeek-V3):
//
//   b_e <- b_e + u * sign(mean_e(c) - c_e)        (sign(0) = 0)
//   center: afterwards b_e <- b_e - mean_e(b)
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// One block of cuda_tuning::threads threads, enqueued on be.stream; counts and bias are device
// pointers (the counts usually come straight from the load-balancing statistics after their
// all-reduce: stats + 1). mean(c) is a fixed-order sum in double (block_sum_strided), the bias
// arithmetic is in accumulator_t of the bias type, as on the CPU. Nothing is allocated and
// nothing synchronises (no workspace: with centring, b_e is formed twice from the untouched
// input, once for the fixed-order block sum of its mean and once for the store). A non-finite count is
// reported as cuda_bad_stats in *be.status and leaves the bias untouched; the host validates
// sizes and pointers first and throws moereg::error without launching anything.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <type_traits>

#include "../../losses/bias_update.hpp"
#include "core.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_bias {

template <class C, class B>
__global__ void __launch_bounds__(cuda_tuning::threads)
    update_kernel(const C* counts, B* bias, index_t E, double rate, bool center, int* status) {
  using Acc = accumulator_t<B>;
  __shared__ double sd[cuda_tuning::threads];
  __shared__ Acc sa[cuda_tuning::threads];
  __shared__ int word;
  if (threadIdx.x == 0) word = 0;
  __syncthreads();
  double part = 0.0;
  bool bad = false;
  for (index_t e = threadIdx.x; e < E; e += cuda_tuning::threads) {
    const double c = static_cast<double>(counts[e]);
    bad = bad || !isfinite(c);
    part += c;
  }
  if (bad) atomicOr(&word, static_cast<int>(cuda_bad_stats));
  const double mean_c = block_sum(part, sd) / static_cast<double>(E);  // barriers inside
  if (word != 0) {
    if (threadIdx.x == 0 && status != nullptr) atomicOr(status, word);
    return;  // the whole block leaves together: word is the same for every thread
  }
  const Acc u = static_cast<Acc>(rate);
  // b_e = bias_e + u * sign(mean(c) - c_e), formed from the untouched input in both passes
  // (the centring pass recomputes it rather than re-reading a rounded 16-bit store).
  auto updated = [&](index_t e) { return bias_step(dload(bias + e), u, mean_c, static_cast<double>(counts[e])); };
  if (!center) {
    for (index_t e = threadIdx.x; e < E; e += cuda_tuning::threads) dstore(bias + e, updated(e));
    return;
  }
  Acc bpart = Acc(0);
  for (index_t e = threadIdx.x; e < E; e += cuda_tuning::threads) bpart += updated(e);
  const Acc mb = block_sum(bpart, sa) / static_cast<Acc>(E);  // every read precedes this barrier
  for (index_t e = threadIdx.x; e < E; e += cuda_tuning::threads) dstore(bias + e, updated(e) - mb);
}

}  // namespace cuda_bias
}  // namespace detail

/// The bias update on the device: bias[0..n_bias) in place from counts[0..n_counts), both
/// device pointers, enqueued on be.stream (be.workspace, be.value are not used; be.status
/// receives cuda_bad_stats for a non-finite count, and the bias is then left untouched).
/// Sizes, the rate and the pointers are checked on the host first (moereg::error, nothing
/// launched).
template <class C, class B>
void bias_update(const bias_update_config& cfg, const C* counts, index_t n_counts, B* bias, index_t n_bias,
                 const cuda& be) {
  static_assert(!std::is_const_v<B>, "bias_update: bias must be float, double, half or bfloat16");
  const char* who = "bias_update (cuda)";
  detail::check_bias_update_shapes(who, cfg, counts, n_counts, bias, n_bias);
  if (n_bias == 0) return;
  detail::cuda_check_pointer(who, "counts", counts, be);
  detail::cuda_check_pointer(who, "bias", bias, be);
  detail::cuda_bias::update_kernel<C, B>
      <<<1, detail::cuda_tuning::threads, 0, be.stream>>>(counts, bias, n_bias, cfg.rate, cfg.center, be.status);
  detail::cuda_check_launch(who, "update_kernel");
}

MOEREG_NAMESPACE_END
