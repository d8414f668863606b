// The CPU engine of the cross-layer coupling loss (losses/coupling.hpp): the L layers of a
// call read together, token by token (token and log forms) or block by block through GEMMs
// (batch form).
//
// Token and log forms: one pass; per token the top-k mass M^l of every layer, the pair terms
// and dM^l (math: detail::coupling_pair, shared with the CUDA backend), and every layer's
// gradient row.
//
// Batch form: U^l = sum_t m_t P^l[t,:]^T P^{l+1}[t,:] as per-block GEMMs, the pair selection
// (detail::coupling_select_row, shared with the CUDA backend) from the reduced U when given,
// then the gradients as two GEMMs per layer and block.
//
// Determinism of the batch form: U is the sum of per-block GEMMs over fixed blocks of
// detail::cpu_block_rows tokens, added in a fixed order; every Eigen product runs on one
// thread (see detail::cp_eigen_serial_blocks) into freshly allocated, aligned buffers, so the
// result is bitwise the same for any number of moereg threads.
#pragma once

#include "internal.hpp"  // refuses direct inclusion; core/config.hpp

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#if MOEREG_HAS_OPENMP
#include <omp.h>
#endif

#include "../../core/types.hpp"
#include "../../core/views.hpp"
#include "../../losses/coupling.hpp"
#include "../../math/router.hpp"
#include "executor.hpp"

MOEREG_NAMESPACE_BEGIN

namespace detail {

/// Writes zeros into every row of every layer's gradient (overwrite mode only).
template <class T, class GT>
void cp_zero_grads(const cpu& be, const coupling_inputs<T>& in, const matrix_view<GT>* grads, grad_options opts) {
  if (grads == nullptr || opts.accumulate) return;
  const index_t T_ = in.probs[0].rows;
  parallel_blocks(be, T_, cpu_block_rows, [&](index_t, index_t r0, index_t r1) {
    for (index_t l = 0; l < in.layers; ++l)
      for (index_t t = r0; t < r1; ++t) zero_grad_row(grads[l], t);
  });
}

// ---------------------------------------------------------------------------------------
// token and log forms: one pass, every token on its own.
// ---------------------------------------------------------------------------------------
template <class T, class GT>
double cp_execute_token(const cpu& be, const coupling_loss& loss, const coupling_inputs<T>& in, double tv,
                        const matrix_view<GT>* grads, grad_options opts) {
  using Acc = accumulator_t<T>;
  const index_t L = in.layers, T_ = in.probs[0].rows;
  const bool is_log = loss.cfg.form == coupling_form::log;
  const Acc lam = static_cast<Acc>(loss.cfg.coef);
  const Acc eps = static_cast<Acc>(loss.cfg.eps);
  const Acc inv_tv = static_cast<Acc>(1.0 / tv);
  const Acc gc = static_cast<Acc>(-opts.grad_scale * loss.cfg.coef / tv);
  const index_t nb = num_blocks(T_, cpu_block_rows);
  std::vector<Acc> partial(static_cast<std::size_t>(nb), Acc(0));
  parallel_blocks(be, T_, cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    std::vector<Acc> M(static_cast<std::size_t>(L)), dM(static_cast<std::size_t>(L));
    Acc sum = Acc(0);
    for (index_t t = r0; t < r1; ++t) {
      if (!in.mask(t)) {
        if (grads && !opts.accumulate)
          for (index_t l = 0; l < L; ++l) zero_grad_row(grads[l], t);
        continue;
      }
      for (index_t l = 0; l < L; ++l) {
        const auto& I = in.topk[l];
        const auto& P = in.probs[l];
        Acc m = Acc(0);
        for (index_t s = 0; s < I.k; ++s) {
          const index_t e = I(t, s);
          if (e >= 0) m += load(P(t, e));
        }
        M[static_cast<std::size_t>(l)] = m;
        dM[static_cast<std::size_t>(l)] = Acc(0);
      }
      for (index_t l = 0; l + 1 < L; ++l) {
        const Acc a = M[static_cast<std::size_t>(l)], c = M[static_cast<std::size_t>(l + 1)];
        Acc w;
        sum += coupling_pair(a, c, is_log, eps, w);
        dM[static_cast<std::size_t>(l)] += w * c;
        dM[static_cast<std::size_t>(l + 1)] += w * a;
      }
      if (!grads) continue;
      for (index_t l = 0; l < L; ++l) {
        const auto& G = grads[l];
        const auto& I = in.topk[l];
        if (!opts.accumulate) zero_grad_row(G, t);
        const Acc g = gc * dM[static_cast<std::size_t>(l)];
        for (index_t s = 0; s < I.k; ++s) {
          const index_t e = I(t, s);
          if (e >= 0) put_grad(G(t, e), g, opts.accumulate);
        }
      }
    }
    partial[static_cast<std::size_t>(b)] = sum;
  });
  return static_cast<double>(-lam * inv_tv * pairwise_sum(partial.data(), nb));
}

// ---------------------------------------------------------------------------------------
// batch form: blocked GEMMs.
// ---------------------------------------------------------------------------------------

template <class Acc>
using cp_rowmat = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Acc>
using cp_cmap = Eigen::Map<const cp_rowmat<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Calls f(b, begin, end) for every fixed block b of [0, n) such that every Eigen product
/// evaluated inside f runs on one thread.
///
/// Why not Eigen::setNbThreads(1): it is process-wide state, racy and visible to the caller.
/// Eigen's GEMM stays sequential when it is called from inside an OpenMP team of more than
/// one thread, or when Eigen::nbThreads() (= omp_get_max_threads() unless the program set
/// it) is 1. So the blocks always run inside a parallel region of our own, and each implicit
/// task first sets its own nthreads ICV to 1 (omp_set_num_threads inside a region changes only
/// the calling task's copy, nothing outside the region). With one moereg thread the team has
/// one thread and Eigen sees nbThreads() == 1; with more the team already forces Eigen's
/// sequential path. Each block's product is then the same sequential GEMM for any moereg
/// thread count. (A program that raises Eigen::setNbThreads above 1 AND enables nested
/// OpenMP could still let Eigen split a block's product when moereg runs on one thread.)
template <class F>
void cp_eigen_serial_blocks(const cpu& be, index_t b0, index_t b1, index_t n, index_t block, F&& f) {
  if (b1 <= b0) return;
#if MOEREG_HAS_OPENMP
  const index_t want = be.threads > 0 ? be.threads : omp_get_max_threads();
  const int nt = static_cast<int>(std::max<index_t>(1, std::min<index_t>(want, b1 - b0)));
#pragma omp parallel num_threads(nt)
  {
    omp_set_num_threads(1);
#pragma omp for schedule(static)
    for (index_t b = b0; b < b1; ++b) f(b, b * block, std::min(n, (b + 1) * block));
  }
#else
  (void)be;
  for (index_t b = b0; b < b1; ++b) f(b, b * block, std::min(n, (b + 1) * block));
#endif
}

/// The valid rows of block [r0, r1) of P as an Acc matrix [rows.size(), E]: mapped in place
/// when the storage already is Acc with unit column stride and every row of the block is
/// valid; otherwise gathered (and converted: half/bfloat16 -> float) into `buf`. Padding rows
/// never enter a product, so garbage in them cannot leak in as 0 * NaN.
template <class T, class Acc>
cp_cmap<Acc> cp_block(const routing_view<T>& P, const std::vector<index_t>& rows, index_t r0, index_t r1,
                      cp_rowmat<Acc>& buf) {
  const index_t nv = static_cast<index_t>(rows.size()), E = P.cols;
  if constexpr (std::is_same_v<T, Acc>) {
    if (P.col_stride == 1 && nv == r1 - r0 && nv > 0)
      return cp_cmap<Acc>(P.row(r0), nv, E, Eigen::OuterStride<>(P.row_stride));
  }
  buf.resize(nv, E);
  for (index_t i = 0; i < nv; ++i) {
    const index_t t = rows[static_cast<std::size_t>(i)];
    for (index_t e = 0; e < E; ++e) buf(i, e) = load(P(t, e));
  }
  return cp_cmap<Acc>(buf.data(), nv, E, Eigen::OuterStride<>(E));
}

/// Per-block state: the valid rows and one Acc matrix per layer.
template <class T, class Acc>
struct cp_block_data {
  std::vector<index_t> rows;
  std::vector<cp_rowmat<Acc>> bufs;
  std::vector<cp_cmap<Acc>> X;

  void load_block(const coupling_inputs<T>& in, index_t r0, index_t r1) {
    rows.clear();
    for (index_t t = r0; t < r1; ++t)
      if (in.mask(t)) rows.push_back(t);
    bufs.resize(static_cast<std::size_t>(in.layers));
    X.clear();
    for (index_t l = 0; l < in.layers; ++l)
      X.push_back(cp_block(in.probs[l], rows, r0, r1, bufs[static_cast<std::size_t>(l)]));
  }
};

/// Blocks per reduction wave: partial sums of one wave are summed pairwise into one wave
/// partial, and the wave partials pairwise at the end. Bounds the memory to about
/// (wave + T / (wave * cpu_block_rows)) (L-1) E^2 values; a fixed number, not a thread count.
inline constexpr index_t cp_wave_blocks = 64;

/// U^l = sum_t m_t P^l[t,:]^T P^{l+1}[t,:] for every adjacent pair, row-major, and T_v.
template <class T>
void cp_joint_sums(const cpu& be, const coupling_inputs<T>& in, std::vector<accumulator_t<T>>& U, index_t& tv) {
  using Acc = accumulator_t<T>;
  const index_t T_ = in.probs[0].rows, E = in.probs[0].cols, L = in.layers;
  const index_t E2 = E * E, W = (L - 1) * E2, B = cpu_block_rows;
  const index_t nb = num_blocks(T_, B);
  const index_t nw = num_blocks(nb, cp_wave_blocks);
  std::vector<Acc> wave_part(static_cast<std::size_t>(std::min(nb, cp_wave_blocks) * W));
  std::vector<Acc> waves(static_cast<std::size_t>(nw * W));
  std::vector<index_t> ptv(static_cast<std::size_t>(nb), 0);
  for (index_t w = 0; w < nw; ++w) {
    const index_t b0 = w * cp_wave_blocks, b1 = std::min(nb, b0 + cp_wave_blocks);
    cp_eigen_serial_blocks(be, b0, b1, T_, B, [&](index_t b, index_t r0, index_t r1) {
      cp_block_data<T, Acc> blk;
      blk.load_block(in, r0, r1);
      ptv[static_cast<std::size_t>(b)] = static_cast<index_t>(blk.rows.size());
      Acc* out = wave_part.data() + (b - b0) * W;
      cp_rowmat<Acc> Ub(E, E);  // fresh aligned destination: same alignment in every run
      for (index_t l = 0; l + 1 < L; ++l) {
        if (blk.rows.empty())
          Ub.setZero();
        else
          Ub.noalias() = blk.X[static_cast<std::size_t>(l)].transpose() * blk.X[static_cast<std::size_t>(l + 1)];
        std::copy(Ub.data(), Ub.data() + E2, out + l * E2);
      }
    });
    combine_blocks(wave_part, b1 - b0, W, waves.data() + w * W);
  }
  U.assign(static_cast<std::size_t>(W), Acc(0));
  combine_blocks(waves, nw, W, U.data());
  tv = 0;
  for (index_t x : ptv) tv += x;
}

template <class T, class GT>
double cp_execute_batch(const cpu& be, const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced,
                        const matrix_view<GT>* grads, grad_options opts) {
  using Acc = accumulator_t<T>;
  const index_t T_ = in.probs[0].rows, E = in.probs[0].cols, L = in.layers, E2 = E * E;
  std::vector<Acc> U;
  index_t tv_local = 0;
  cp_joint_sums(be, in, U, tv_local);
  const double tv = reduced.empty() ? static_cast<double>(tv_local) : reduced.data[0];
  if (!(tv > 0)) {
    cp_zero_grads(be, in, grads, opts);
    return 0.0;
  }

  // Selection S_l from the reduced sums (or this call's own), one 0/1 matrix per pair.
  std::vector<cp_rowmat<Acc>> S(static_cast<std::size_t>(L - 1));
  std::vector<Acc> terms;
  for (index_t l = 0; l + 1 < L; ++l) {
    auto& Sl = S[static_cast<std::size_t>(l)];
    Sl.resize(E, E);
    const index_t k = in.topk[l].k;
    for (index_t e = 0; e < E; ++e) {
      if (reduced.empty())
        coupling_select_row(U.data() + l * E2 + e * E, E, k, Sl.data() + e * E);
      else
        coupling_select_row(reduced.data + 1 + l * E2 + e * E, E, k, Sl.data() + e * E);
      for (index_t nu = 0; nu < E; ++nu)
        if (Sl(e, nu) != Acc(0)) terms.push_back(U[static_cast<std::size_t>(l * E2 + e * E + nu)]);
    }
  }
  const Acc value =
      static_cast<Acc>(-loss.cfg.coef / tv) * pairwise_sum(terms.data(), static_cast<index_t>(terms.size()));
  if (!grads) return static_cast<double>(value);

  // X * S^T through Eigen's transposed view, not a stored S^T: one more GEMM instantiation,
  // 2-6% faster at 2 threads (E = 64 and 256, measured side by side).
  const Acc gc = static_cast<Acc>(-opts.grad_scale * loss.cfg.coef / tv);
  const index_t nb = num_blocks(T_, cpu_block_rows);
  cp_eigen_serial_blocks(be, 0, nb, T_, cpu_block_rows, [&](index_t, index_t r0, index_t r1) {
    cp_block_data<T, Acc> blk;
    blk.load_block(in, r0, r1);
    const index_t nv = static_cast<index_t>(blk.rows.size());
    cp_rowmat<Acc> G(nv, E);
    for (index_t l = 0; l < L; ++l) {
      const auto& Gv = grads[l];
      if (nv > 0) {
        if (l + 1 < L)
          G.noalias() = blk.X[static_cast<std::size_t>(l + 1)] * S[static_cast<std::size_t>(l)].transpose();
        else
          G.setZero();
        if (l > 0) G.noalias() += blk.X[static_cast<std::size_t>(l - 1)] * S[static_cast<std::size_t>(l - 1)];
      }
      index_t i = 0;
      for (index_t t = r0; t < r1; ++t) {
        const bool valid = i < nv && blk.rows[static_cast<std::size_t>(i)] == t;
        if (valid) {
          for (index_t e = 0; e < E; ++e) put_grad(Gv(t, e), gc * G(i, e), opts.accumulate);
          ++i;
        } else if (!opts.accumulate) {
          zero_grad_row(Gv, t);
        }
      }
    }
  });
  return static_cast<double>(value);
}

}  // namespace detail

/// CPU backend of coupling_loss::local_stats() (found by ADL): validates, then writes the statistics
/// to `out`.
template <class T>
void execute_stats(const cpu& be, const coupling_loss& loss, const coupling_inputs<T>& in, double* out) {
  detail::check_scalars(coupling_loss::label, loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host(coupling_loss::label, loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr));
  if (loss.cfg.form != coupling_form::batch) {
    out[0] = static_cast<double>(detail::count_valid(in.mask, in.probs[0].rows));
    return;
  }
  std::vector<accumulator_t<T>> U;
  index_t tv = 0;
  detail::cp_joint_sums(be, in, U, tv);
  out[0] = static_cast<double>(tv);
  for (std::size_t i = 0; i < U.size(); ++i) out[i + 1] = static_cast<double>(U[i]);
}

/// CPU backend of coupling_loss's value(), backward() and value_and_grad() (found by ADL): validates,
/// returns the value and, when `grad` is not null, writes the gradient per `opts`.
template <class T, class GT>
double execute(const cpu& be, const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced,
               const matrix_view<GT>* grads, grad_options opts) {
  detail::check_scalars(coupling_loss::label, loss.cfg.coef, opts, be.threads);
  validate_on_host(coupling_loss::label, loss, in, reduced, grads);
  if (loss.cfg.form == coupling_form::batch) return detail::cp_execute_batch(be, loss, in, reduced, grads, opts);
  const double tv =
      reduced.empty() ? static_cast<double>(detail::count_valid(in.mask, in.probs[0].rows)) : reduced.data[0];
  if (!(tv > 0)) {
    detail::cp_zero_grads(be, in, grads, opts);
    return 0.0;
  }
  return detail::cp_execute_token(be, loss, in, tv, grads, opts);
}

MOEREG_NAMESPACE_END
