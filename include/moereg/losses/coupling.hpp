// Cross-layer coupling loss (Hu, Cao, Kong, Sun, Yuan 2026, "Synergistic Intra- and
// Cross-Layer Regularization Losses for MoE Expert Specialization", R_cp), LOSSES.md section 4.
//
// Input: the routing of L >= 2 consecutive layers over the same T tokens and the same mask:
// P^l [T, E] and I^l [T, k_l] for l = 1..L. E is the same for every layer; each layer has
// its own top-k width k_l (the number of columns of its topk view).
//
//   M^l_t = sum_{s in A^l_t} P^l[t, I^l[t,s]]                        (top-k mass)
//
//   token (default)  L = -lambda (1/T_v) sum_t m_t sum_{l=1}^{L-1} M^l_t M^{l+1}_t
//                    dL/dP^l[t,e] = -lambda m_t/T_v [e selected at l] (M^{l-1}_t + M^{l+1}_t)
//   log              L = -lambda (1/T_v) sum_t m_t sum_l log(M^l_t M^{l+1}_t + eps)   (eps 1e-12)
//                    dL/dP^l[t,e] = -lambda m_t/T_v [e selected at l]
//                                   (M^{l+1}/(M^l M^{l+1} + eps) + M^{l-1}/(M^{l-1} M^l + eps))
//   batch            J^l = (1/T_v) sum_t m_t P^l[t,:]^T P^{l+1}[t,:]     (E x E)
//                    L = -lambda sum_l sum_e sum_{nu in topk_l(J^l[e,:])} J^l[e,nu]
//                    (k_l = top-k width of the source layer l; the selection is a constant,
//                    ties go to the lower expert index; the topk indices themselves are not
//                    used by this form, only their width)
//                    dL/dP^l     = -lambda m/T_v (P^{l+1} S_l^T),
//                    dL/dP^{l+1} = -lambda m/T_v (P^l S_l)      (S_l the 0/1 selection matrix)
// A missing neighbour layer counts 0. lambda defaults to 1e-3.
//
// Inputs: `probs` and `topk` point to `layers` views each (a plain array or a
// std::vector's data()); gradients are written through a pointer to `layers` gradient
// views, one per layer, each with the shape of its probs and its own strides. Gradient
// buffers must not overlap the inputs or each other.
//
// Statistics (LOSSES.md section 9), all sums:
//   token, log  [T_v]                                                   (1 entry)
//   batch       [T_v, U^1, ..., U^{L-1}]   U^l[e,nu] = sum_t m_t P^l[t,e] P^{l+1}[t,nu],
//               each E x E row-major                                    (1 + (L-1) E^2 entries)
// With reduced statistics T_v is global; in the batch form the selection comes from the
// reduced U (J = U / T_v has the same order), so every part selects the whole batch's pairs.
// Each part's value is -lambda * sum over the selected (e, nu) of its OWN U entries / global
// T_v, so the parts' values sum to the whole batch's value and each part's gradient rows equal
// the whole batch's rows (up to float rounding).
//
// Passes over memory (value_and_grad):
//   token, log  one: P at the selected entries, topk and mask read once, gradients written once.
//   batch       two: P is read once to form U (per token block, one GEMM per adjacent pair),
//               then once more to form the gradients (two GEMMs per layer and block); the
//               gradients are written once.
//
// Determinism of the batch form: U is the sum of per-block GEMMs over fixed blocks of
// detail::cpu_block_rows tokens, added in a fixed order; every Eigen product runs on one
// thread (see detail::cp_eigen_serial_blocks) into freshly allocated, aligned buffers, so the
// result is bitwise the same for any number of moereg threads.
#pragma once

#include "../core/config.hpp"
#include "../core/compiled.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../backend/cpu/executor.hpp"
#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/views.hpp"
#include "api.hpp"
#include "common.hpp"

#if MOEREG_HAS_OPENMP
#include <omp.h>
#endif

MOEREG_NAMESPACE_BEGIN

/// Which reading of R_cp (LOSSES.md section 4).
enum class coupling_form { token, log, batch };

/// Configuration of coupling_loss (LOSSES.md section 4).
struct coupling_config {
  double coef = 1e-3;                         ///< lambda
  coupling_form form = coupling_form::token;  ///< token (default), log or batch
  double eps = 1e-12;                         ///< log form: log(M^l M^{l+1} + eps)
};

struct coupling_loss;

/// The routing of `layers` consecutive layers. probs[l] is P^l [T, E], topk[l] is I^l [T, k_l].
template <class T>
struct coupling_inputs {
  static_assert(is_storage_type_v<T>, MOEREG_STORAGE_TYPE_MESSAGE);
  using loss_type = coupling_loss;  ///< the loss these inputs are for
  using grad_type = const matrix_view<T>*;  ///< what backward() writes
  const routing_view<T>* probs = nullptr;     ///< `layers` views
  const topk_view* topk = nullptr;            ///< `layers` views
  index_t layers = 0;                         ///< L >= 2
  mask_view mask{};                           ///< m [T], shared by every layer; empty = all valid
};
/// Deduces the storage type from the views: `coupling_inputs{view(x), ...}` needs no template argument.
template <class T, class... Rest>
coupling_inputs(const routing_view<T>*, Rest...) -> coupling_inputs<T>;

/// Cross-layer coupling loss (Hu et al. 2026, R_cp; LOSSES.md section 4), token form
/// L = -lambda * (1 / T_v) sum_t m_t sum_l M^l_t M^{l+1}_t; gradient with respect to every P^l.
struct coupling_loss : loss_api<coupling_loss, coupling_config> {
  static constexpr const char* name = "coupling_loss";  ///< in error messages
  /// Number of doubles local_stats writes: 1 (token, log) or 1 + (L-1) E^2 (batch).
  template <class T>
  index_t stats_size(const coupling_inputs<T>& in) const {
    if (cfg.form != coupling_form::batch) return 1;
    const index_t E = (in.probs != nullptr && in.layers > 0) ? in.probs[0].cols : 0;
    return 1 + std::max<index_t>(in.layers - 1, 0) * E * E;
  }
};

/// Shape checks of a coupling_loss call (core/validate.hpp), for every backend.
template <class T>
void validate_shapes(const char* who, const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced,
                     const matrix_view<T>* grads) {
  const auto form = loss.cfg.form;
  detail::require(form == coupling_form::token || form == coupling_form::log || form == coupling_form::batch, who,
          ": unknown form ", static_cast<int>(form));
  detail::require(in.layers >= 2, who, ": needs at least 2 layers but got layers = ", in.layers);
  detail::require(in.probs != nullptr, who, ": probs is null; pass one routing view per layer");
  detail::require(in.topk != nullptr, who, ": topk is null; pass one topk view per layer");
  detail::require(std::isfinite(loss.cfg.eps) && loss.cfg.eps >= 0, who, ": eps = ", loss.cfg.eps,
          " must be finite and non-negative");
  const index_t T_ = in.probs[0].rows, E = in.probs[0].cols;
  for (index_t l = 0; l < in.layers; ++l) {
    const auto& P = in.probs[l];
    const std::string pn = detail::concat("probs[", l, "]"), tn = detail::concat("topk[", l, "]");
    detail::check_matrix(who, pn.c_str(), P);
    detail::require(P.rows == T_, who, ": ", pn, " has ", P.rows, " rows but probs[0] has ", T_,
            "; every layer routes the same tokens");
    detail::require(P.cols == E, who, ": ", pn, " has E = ", P.cols, " experts but probs[0] has E = ", E,
            "; every layer needs the same number of experts");
    detail::check_topk_shape(who, tn.c_str(), in.topk[l], T_, E);
  }
  detail::check_mask(who, in.mask, T_);
  if (grads)
    for (index_t l = 0; l < in.layers; ++l)
      detail::check_grad(who, detail::concat("grads[", l, "]").c_str(), grads[l], in.probs[l]);
  detail::check_stats_shape(who, reduced, loss.stats_size(in));
}
/// Content checks of a coupling_loss call on the host: every layer's top-k ids; T_v is a count
/// (the batch form's co-occurrence sums are finite).
template <class T>
void validate_contents(const char* who, const coupling_loss&, const coupling_inputs<T>& in, stats_view reduced,
                       const matrix_view<T>*) {
  for (index_t l = 0; l < in.layers; ++l)
    detail::check_topk_ids(who, detail::concat("topk[", l, "]").c_str(), in.topk[l], in.probs[0].cols);
  detail::check_stats_values(who, reduced, 1);
}
/// The memory of a coupling_loss call, by name, for a backend's pointer checks.
template <class T, class F>
void for_each_buffer(const coupling_inputs<T>& in, const matrix_view<T>* grads, F&& f) {
  for (index_t l = 0; l < in.layers; ++l) {
    f(detail::concat("probs[", l, "]").c_str(), in.probs[l].data);
    f(detail::concat("topk[", l, "]").c_str(), in.topk[l].data);
    if (grads) f(detail::concat("grads[", l, "]").c_str(), grads[l].data);
  }
  f("mask", in.mask.data);
}

namespace detail {

/// Writes zeros into every row of every layer's gradient (overwrite mode only).
template <class T>
void cp_zero_grads(const cpu& be, const coupling_inputs<T>& in, const matrix_view<T>* grads, grad_options opts) {
  if (grads == nullptr || opts.accumulate) return;
  using Acc = accumulator_t<T>;
  const index_t T_ = in.probs[0].rows, E = in.probs[0].cols;
  parallel_blocks(be, T_, cpu_block_rows, [&](index_t, index_t r0, index_t r1) {
    for (index_t l = 0; l < in.layers; ++l)
      for (index_t t = r0; t < r1; ++t)
        for (index_t e = 0; e < E; ++e) put_grad(grads[l](t, e), Acc(0), false);
  });
}

// ---------------------------------------------------------------------------------------
// token and log forms: one pass, every token on its own.
// ---------------------------------------------------------------------------------------
template <class T>
double cp_execute_token(const cpu& be, const coupling_loss& loss, const coupling_inputs<T>& in, double tv,
                        const matrix_view<T>* grads, grad_options opts) {
  using Acc = accumulator_t<T>;
  const index_t L = in.layers, T_ = in.probs[0].rows, E = in.probs[0].cols;
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
          for (index_t l = 0; l < L; ++l)
            for (index_t e = 0; e < E; ++e) put_grad(grads[l](t, e), Acc(0), false);
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
        Acc w = Acc(1);
        if (is_log) {
          const Acc q = a * c + eps;
          sum += std::log(q);
          w = Acc(1) / q;
        } else {
          sum += a * c;
        }
        dM[static_cast<std::size_t>(l)] += w * c;
        dM[static_cast<std::size_t>(l + 1)] += w * a;
      }
      if (!grads) continue;
      for (index_t l = 0; l < L; ++l) {
        const auto& G = grads[l];
        const auto& I = in.topk[l];
        if (!opts.accumulate)
          for (index_t e = 0; e < E; ++e) put_grad(G(t, e), Acc(0), false);
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
    if (P.col_stride == 1 && nv == r1 - r0 && nv > 0) return cp_cmap<Acc>(P.row(r0), nv, E, Eigen::OuterStride<>(P.row_stride));
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
        if (blk.rows.empty()) Ub.setZero();
        else Ub.noalias() = blk.X[static_cast<std::size_t>(l)].transpose() * blk.X[static_cast<std::size_t>(l + 1)];
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

/// The k largest entries of row[0..E) by value, ties to the lower index (a NaN never wins),
/// marked with 1 in sel[0..E).
template <class Src, class Acc>
void cp_select_row(const Src* row, index_t E, index_t k, Acc* sel) {
  for (index_t e = 0; e < E; ++e) sel[e] = Acc(0);
  for (index_t c = 0; c < k; ++c) {
    index_t best = -1;
    for (index_t e = 0; e < E; ++e) {
      if (sel[e] != Acc(0)) continue;
      if (best < 0 || row[e] > row[best]) best = e;  // strict: the earlier index keeps a tie
    }
    sel[best] = Acc(1);
  }
}

template <class T>
double cp_execute_batch(const cpu& be, const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced,
                        const matrix_view<T>* grads, grad_options opts) {
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
      if (reduced.empty()) cp_select_row(U.data() + l * E2 + e * E, E, k, Sl.data() + e * E);
      else cp_select_row(reduced.data + 1 + l * E2 + e * E, E, k, Sl.data() + e * E);
      for (index_t nu = 0; nu < E; ++nu)
        if (Sl(e, nu) != Acc(0)) terms.push_back(U[static_cast<std::size_t>(l * E2 + e * E + nu)]);
    }
  }
  const Acc value = static_cast<Acc>(-loss.cfg.coef / tv) *
                    pairwise_sum(terms.data(), static_cast<index_t>(terms.size()));
  if (!grads) return static_cast<double>(value);

  // S_l^T stored: both gradient products are then X * (row-major E x E), one GEMM
  // instantiation instead of two (compile time).
  std::vector<cp_rowmat<Acc>> St(S.size());
  for (std::size_t l = 0; l < S.size(); ++l) St[l] = S[l].transpose();
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
          G.noalias() = blk.X[static_cast<std::size_t>(l + 1)] * St[static_cast<std::size_t>(l)];
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
          for (index_t e = 0; e < E; ++e) put_grad(Gv(t, e), Acc(0), false);
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
  detail::check_scalars("coupling", loss.cfg.coef, grad_options{}, be.threads);
  validate_on_host("coupling", loss, in, stats_view{}, static_cast<const matrix_view<T>*>(nullptr));
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
template <class T>
double execute(const cpu& be, const coupling_loss& loss, const coupling_inputs<T>& in, stats_view reduced,
               const matrix_view<T>* grads, grad_options opts) {
  detail::check_scalars("coupling", loss.cfg.coef, opts, be.threads);
  validate_on_host("coupling", loss, in, reduced, grads);
  if (loss.cfg.form == coupling_form::batch) return detail::cp_execute_batch(be, loss, in, reduced, grads, opts);
  const double tv =
      reduced.empty() ? static_cast<double>(detail::count_valid(in.mask, in.probs[0].rows)) : reduced.data[0];
  if (!(tv > 0)) {
    detail::cp_zero_grads(be, in, grads, opts);
    return 0.0;
  }
  return detail::cp_execute_token(be, loss, in, tv, grads, opts);
}

// Declared extern when this unit links moereg::compiled (core/compiled.hpp).
MOEREG_DETAIL_EXTERN_ROUTER(coupling_loss, coupling_inputs)

MOEREG_NAMESPACE_END
