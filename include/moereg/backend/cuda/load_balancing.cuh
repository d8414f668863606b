// CUDA backend of the load-balancing loss (losses/load_balancing.hpp, LOSSES.md section 1).
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// Micro and global scopes run the router engine (router.cuh) with this loss alone: a
// column-sum kernel (masked column sums of P, expert counts, T_v and the top-k check per block
// of 256 rows), a one-block finish (partials combined in a fixed order, detail::lb_expert of
// math/router.hpp for every expert: the CPU's arithmetic) and a gradient kernel that writes
// m_t * coeff[e] (P is not read again).
// Sequence scope: one block per sequence computes that sequence's sums, value term and
// gradient rows (detail::lb_seq_expert); a final block takes the mean over sequences.
//
// Device checks: top-k indices >= E or repeated in a row (cuda_topk_*), cu_seqlens not
// starting at 0, decreasing or not ending at T (cuda_bad_offsets), reduced statistics
// negative or not finite (cuda_bad_stats). With a flag set the value is NaN; in the micro
// and global scopes every gradient entry is NaN (the counts are global), in the sequence
// scope the rows of the sequences concerned.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <cstdint>
#include <limits>

#include "../../losses/load_balancing.hpp"
#include "core.cuh"
#include "router.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_lb {

/// Sequence scope workspace.
template <class Acc>
struct seq_workspace {
  Acc* colsum = nullptr;      // [B * E]
  int* counts = nullptr;      // [B * E]
  Acc* terms = nullptr;       // [B * E]
  Acc* coeff = nullptr;       // [B * E]
  Acc* seq_values = nullptr;  // [B]
  int* err = nullptr;         // [B]
};

template <class Acc>
seq_workspace<Acc> carve_seq(workspace_carver& c, index_t B, index_t E) {
  seq_workspace<Acc> w;
  w.colsum = c.take<Acc>(B * E);
  w.counts = c.take<int>(B * E);
  w.terms = c.take<Acc>(B * E);
  w.coeff = c.take<Acc>(B * E);
  w.seq_values = c.take<Acc>(B);
  w.err = c.take<int>(B);
  return w;
}

/// Number of sequences of the sequence scope (without reading device memory).
template <class T>
index_t sequences(const load_balancing_loss& loss, const load_balancing_inputs<T>& in) {
  if (loss.cfg.seq_len > 0) return in.probs.rows / loss.cfg.seq_len;
  return in.cu_seqlens.size > 0 ? in.cu_seqlens.size - 1 : 0;
}

/// Host-side checks: every backend's shape checks and the device pointers (no device memory read).
template <class T>
void validate(const load_balancing_loss& loss, const load_balancing_inputs<T>& in, stats_view reduced,
              const matrix_view<T>* grad, const cuda& be) {
  const char* who = "load_balancing (cuda)";
  cuda_validate(who, loss, in, reduced, grad, be);
  require(sequences(loss, in) <= static_cast<index_t>(std::numeric_limits<int>::max()), who,
          ": too many sequences for one grid");
}

/// Rows of sequence b, or an empty range (and a flag) when the offsets are inconsistent.
template <class T>
__device__ inline int sequence_rows(const load_balancing_inputs<T>& in, index_t fixed, index_t b, index_t B,
                                    index_t& r0, index_t& r1) {
  const index_t T_ = in.probs.rows;
  if (fixed > 0) {
    r0 = b * fixed, r1 = (b + 1) * fixed;
    return 0;
  }
  r0 = in.cu_seqlens[b], r1 = in.cu_seqlens[b + 1];
  int flags = 0;
  if (r0 < 0 || r1 < r0 || r1 > T_) flags = cuda_bad_offsets;
  if (b == 0 && r0 != 0) flags = cuda_bad_offsets;
  if (b == B - 1 && r1 != T_) flags = cuda_bad_offsets;
  if (flags != 0) r0 = r1 = 0;
  return flags;
}

/// Sequence scope: one block per sequence; value term and gradient rows of that sequence.
template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    sequence_kernel(load_balancing_inputs<T> in, seq_workspace<Acc> ws, index_t fixed, index_t B, const double* reduced,
                    Acc k, Acc alpha_e, Acc gs, matrix_view<T> g, bool has_grad, bool accumulate) {
  __shared__ Acc scratch[cuda_tuning::threads];
  __shared__ unsigned long long s_tv;
  __shared__ int s_flags;
  const index_t b = blockIdx.x, E = in.probs.cols;
  index_t r0 = 0, r1 = 0;
  const int off_flags = sequence_rows(in, fixed, b, B, r0, r1);
  Acc* colsum = ws.colsum + b * E;
  cuda_router::block_rows(in.probs, in.topk, in.mask, true, true, r0, r1, colsum, ws.counts + b * E, &s_tv, &s_flags,
                          scratch);
  const double b_total = reduced != nullptr ? reduced[0] : static_cast<double>(B);
  int flags = s_flags | off_flags;
  if (reduced != nullptr && !stat_ok(reduced[0])) flags |= cuda_bad_stats;
  const Acc inv_b = b_total > 0 ? static_cast<Acc>(1.0 / b_total) : Acc(0);
  const unsigned long long tv = s_tv;
  const Acc inv_tv = tv > 0 ? Acc(1) / static_cast<Acc>(tv) : Acc(0);
  Acc* terms = ws.terms + b * E;
  Acc* coeff = ws.coeff + b * E;
  for (index_t e = threadIdx.x; e < E; e += cuda_tuning::threads) {
    const auto r = lb_seq_expert(static_cast<Acc>(ws.counts[b * E + e]), inv_tv, colsum[e], k, alpha_e, gs, inv_b);
    terms[e] = r.term;
    coeff[e] = flags != 0 ? acc_nan<Acc>() : r.coeff;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ws.seq_values[b] = alpha_e * pairwise_sum(terms, E);
    ws.err[b] = flags;
  }
  if (!has_grad) return;
  // Rows of an inconsistent sequence are unknown: nothing to write (the status says so).
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  for (index_t t = r0 + warp; t < r1; t += cuda_tuning::warps) {
    const bool valid = in.mask(t);
    if (!valid && accumulate) continue;
    for (index_t e = lane; e < E; e += 32) dput_grad(&g(t, e), valid ? coeff[e] : Acc(0), accumulate);
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads)
    sequence_finish_kernel(load_balancing_inputs<T> in, seq_workspace<Acc> ws, index_t fixed, index_t B,
                           const double* reduced, double* value, int* status, double* stats_out) {
  __shared__ int word;
  int flags = 0;
  if (stats_out != nullptr) {
    // Statistics only: check the offsets (the sequence kernel did not run).
    if (threadIdx.x == 0) word = 0;
    __syncthreads();
    int f = 0;
    for (index_t b = threadIdx.x; b < B; b += cuda_tuning::threads) {
      index_t r0 = 0, r1 = 0;
      f |= sequence_rows(in, fixed, b, B, r0, r1);
    }
    if (f != 0) atomicOr(&word, f);
    __syncthreads();
    flags = word;
  } else {
    flags = block_or(ws.err, B, &word);
    if (reduced != nullptr) flags |= block_check_stats(reduced, 1, 1, &word);
  }
  if (threadIdx.x != 0) return;
  if (fixed <= 0 && B == 0 && (in.cu_seqlens[0] != 0 || in.probs.rows != 0)) flags |= cuda_bad_offsets;
  if (stats_out != nullptr) {
    stats_out[0] = flags != 0 ? static_cast<double>(NAN) : static_cast<double>(B);
    publish(nullptr, status, 0.0, flags);
    return;
  }
  const double b_total = reduced != nullptr ? reduced[0] : static_cast<double>(B);
  const Acc inv_b = b_total > 0 ? static_cast<Acc>(1.0 / b_total) : Acc(0);
  publish(value, status, static_cast<double>(inv_b * pairwise_sum(ws.seq_values, B)), flags);
}

}  // namespace cuda_lb

// This loss's entries for the CUDA front end (backend/cuda/api.cuh). The whole call;
// `stats_out` non-null: local statistics instead of value and gradient.
template <class T>
void cuda_run(const cuda& be, const load_balancing_loss& loss, const load_balancing_inputs<T>& in, stats_view reduced,
              const matrix_view<T>* grad, grad_options opts, double* stats_out) {
  using namespace cuda_lb;  // this loss's kernels and helpers
  using Acc = accumulator_t<T>;
  const char* who = "load_balancing (cuda)";
  validate(loss, in, reduced, grad, be);
  if (stats_out != nullptr) cuda_check_stats_out(who, stats_out, loss.stats_size(in), be);
  if (loss.cfg.scope != lb_scope::sequence) {
    cuda_router::run_single(be, loss, in, reduced, grad, opts, stats_out);
    return;
  }
  const index_t E = in.probs.cols, B = sequences(loss, in);
  workspace_carver carver(be.workspace);
  const auto ws = carve_seq<Acc>(carver, B, E);
  cuda_check_workspace(who, be, carver.required());
  const Acc k = static_cast<Acc>(loss.cfg.k > 0 ? loss.cfg.k : in.topk.k);
  const Acc alpha_e = static_cast<Acc>(loss.cfg.coef) * static_cast<Acc>(E);
  const Acc gs = static_cast<Acc>(opts.grad_scale);
  const index_t fixed = loss.cfg.seq_len;
  const dim3 block(cuda_tuning::threads);
  if (stats_out == nullptr && B > 0) {
    const matrix_view<T> g = grad != nullptr ? *grad : matrix_view<T>{};
    sequence_kernel<T, Acc><<<static_cast<unsigned>(B), block, 0, be.stream>>>(
        in, ws, fixed, B, reduced.data, k, alpha_e, gs, g, grad != nullptr, opts.accumulate);
    cuda_check_launch(who, "sequence kernel");
  }
  sequence_finish_kernel<T, Acc>
      <<<1, block, 0, be.stream>>>(in, ws, fixed, B, reduced.data, be.value, be.status, stats_out);
  cuda_check_launch(who, "sequence finish kernel");
}

template <class T>
std::size_t cuda_workspace_bytes(const load_balancing_loss& loss, const load_balancing_inputs<T>& in) {
  if (loss.cfg.scope != lb_scope::sequence) return cuda_router::required_bytes(cuda_router::single_request(loss, in));
  workspace_carver c(nullptr);
  const index_t B = cuda_lb::sequences(loss, in);
  (void)cuda_lb::carve_seq<accumulator_t<T>>(c, B > 0 ? B : 0, in.probs.cols > 0 ? in.probs.cols : 0);
  return c.required();
}

}  // namespace detail
MOEREG_NAMESPACE_END
