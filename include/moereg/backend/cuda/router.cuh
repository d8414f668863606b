// The CUDA engine of the router losses that read one [T, E] matrix: load balancing (micro and
// global scopes), z-loss, entropy, variance and importance. Every single-loss CUDA entry point
// of those losses runs it with one loss; moereg::router_fused (router_fused.cuh) runs it with
// several, so that the matrix is read and the gradient written once for all of them.
//
// Include <moereg/backend/cuda.hpp>, not this file.
//
// Kernels, each enqueued only when a present loss needs it:
//   1. colsum   one block per cuda_tuning::rows_per_block rows of P: masked column sums
//               (32 columns x 8 lanes, each lane sums its rows in order, the lanes are added in
//               order), valid-token count, and for load balancing the top-k check and expert
//               counts (integer atomics into the block's own row: exact).
//   2. finish1  one block: partials combined in a fixed order; T_v of every loss (local or
//               reduced, reduced statistics checked); the per-expert gradient coefficients of
//               load balancing and importance (summed into one vector) and their values;
//               sbar for the variance; the constants of z-loss, entropy, variance.
//   3. rows     a warp per row, cuda_row_block rows per block: one pass over P that writes
//               dP = sum of every present P-loss's gradient once (broadcast coefficients,
//               entropy and variance terms), one pass over Z for the z-loss (row max, sum of
//               exp, gradient), and per-block partial sums of lse^2, -p log p and d^2.
//   4. finish2  one block: the values of z-loss, entropy and variance from those partials.
// The per-element and per-expert arithmetic is math/router.hpp's (the CPU's expressions).
// All sums run in fixed orders that depend only on T and E: bitwise reproducible.
#pragma once

#include "internal.cuh"  // refuses direct inclusion; core/config.hpp

#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "../../losses/entropy.hpp"
#include "../../losses/importance.hpp"
#include "../../losses/load_balancing.hpp"
#include "../../losses/variance.hpp"
#include "../../losses/z_loss.hpp"
#include "core.cuh"

MOEREG_NAMESPACE_BEGIN
namespace detail {
namespace cuda_router {

/// The engine's slot of each loss; also the value slots of router_fused.
enum router_slot : int { slot_lb = 0, slot_z = 1, slot_ent = 2, slot_var = 3, slot_imp = 4, router_slots = 5 };

/// What one loss of a run reads and writes (device memory): its reduced statistics (empty =
/// its local ones), its value and its statistics output (null = not wanted).
struct router_io {
  stats_view reduced{};
  double* value = nullptr;
  double* stats = nullptr;
};

/// What one engine run computes. Views point to device memory; null value/stats pointers
/// mean "not wanted".
template <class T>
struct request {
  routing_view<T> probs{};   // P (the variance's S): load balancing, entropy, variance, importance
  routing_view<T> logits{};  // Z: z-loss
  topk_view topk{};          // load balancing
  mask_view mask{};
  matrix_view<T> grad_probs{};
  matrix_view<T> grad_logits{};
  bool want_grad_probs = false, want_grad_logits = false;
  grad_options opts{};
  bool stats_mode = false;  // write local statistics instead of values and gradients

  const load_balancing_loss* lb = nullptr;
  const z_loss* z = nullptr;
  const entropy_loss* ent = nullptr;
  const variance_loss* var = nullptr;
  const importance_loss* imp = nullptr;
  router_io io[router_slots]{};  // per loss, by slot

  bool p_losses() const { return lb != nullptr || ent != nullptr || var != nullptr || imp != nullptr; }
  index_t rows() const { return p_losses() ? probs.rows : logits.rows; }
};

/// Constants computed once per run by finish1 and read by rows / finish2.
template <class Acc>
struct scalars {
  int flags_lb, flags_z, flags_ent, flags_var, flags_imp;
  Acc z_inv_tv, z_gcoef;
  int ent_any;
  Acc ent_inv_tv, ent_gc;
  int var_active;
  Acc var_vc, var_gc;
};

/// The kernels' parameters (passed by value).
template <class T, class Acc>
struct plan {
  routing_view<T> P, Z;
  topk_view I;
  mask_view mask;
  matrix_view<T> gP, gZ;
  index_t rows, E;  // rows; columns of P
  bool want_gP, want_gZ, accumulate, stats_mode;
  bool lb, z, ent, var, imp;
  bool need_colsum, need_counts, coeff_any;
  bool lb_global;
  Acc lb_k, lb_alpha_e, lb_gs;
  Acc z_beta, z_gs;
  double ent_coef, ent_gs;
  Acc ent_eta, ent_tiny, ent_log_tiny;
  double var_coef, var_gs;
  bool var_tokens, var_mean;
  double imp_coef, imp_gs;
  const double* red[router_slots];  // per loss, by slot: reduced statistics, value, statistics output
  double* value[router_slots];
  double* stats[router_slots];
  int* status;
};

template <class Acc>
struct workspace {
  Acc* colsum = nullptr;             // [nb1 * E] per-block column sums
  int* counts = nullptr;             // [nb1 * E] per-block expert counts (load balancing)
  long long* tv = nullptr;           // [nb1]
  int* err = nullptr;                // [nb1] top-k flags
  Acc* colsum_total = nullptr;       // [E]
  long long* count_total = nullptr;  // [E]
  Acc* coeff = nullptr;              // [E] broadcast gradient coefficients (load balancing + importance)
  Acc* lb_terms = nullptr;           // [E]
  Acc* imp = nullptr;                // [E]
  Acc* imp_tmp = nullptr;            // [E]
  Acc* sbar = nullptr;               // [E]
  scalars<Acc>* sc = nullptr;        // [1]
  Acc* row_partials = nullptr;       // [nb3 * 3]: lse^2, -p log p, d^2
};

inline index_t colsum_blocks(index_t T) {
  return cuda_blocks(T, cuda_tuning::rows_per_block);
}
inline index_t row_blocks(index_t T) {
  return cuda_blocks(T, cuda_row_block);
}

/// One layout for the size query and the run. Depends only on the losses present and the
/// sizes (not on gradients or statistics being wanted), so workspace_size needs nothing else.
template <class Acc, class T>
workspace<Acc> carve(workspace_carver& c, const request<T>& rq) {
  workspace<Acc> w;
  const index_t T_ = rq.rows() > 0 ? rq.rows() : 0;
  const bool pl = rq.p_losses();
  const index_t E = pl && rq.probs.cols > 0 ? rq.probs.cols : 0;
  const index_t nb1 = pl ? colsum_blocks(T_) : 0;
  const bool lb = rq.lb != nullptr, imp = rq.imp != nullptr, var = rq.var != nullptr;
  w.colsum = c.take<Acc>(nb1 * E);
  w.counts = c.take<int>(lb ? nb1 * E : 0);
  w.tv = c.take<long long>(nb1);
  w.err = c.take<int>(nb1);
  w.colsum_total = c.take<Acc>(E);
  w.count_total = c.take<long long>(lb ? E : 0);
  w.coeff = c.take<Acc>(lb || imp ? E : 0);
  w.lb_terms = c.take<Acc>(lb ? E : 0);
  w.imp = c.take<Acc>(imp ? E : 0);
  w.imp_tmp = c.take<Acc>(imp ? E : 0);
  w.sbar = c.take<Acc>(var ? E : 0);
  w.sc = c.take<scalars<Acc>>(1);
  w.row_partials = c.take<Acc>(row_blocks(T_) * 3);
  return w;
}

template <class T>
std::size_t required_bytes(const request<T>& rq) {
  workspace_carver c(nullptr);
  (void)carve<accumulator_t<T>>(c, rq);
  return c.required();
}

/// Block-wide sums over rows [r0, r1) of P. With `count`: checks every top-k slot (flags
/// through *s_flags) and counts the usable slots of valid tokens into counts_out[0..E) (the
/// block's own row: zeroed here, integer atomics). With `colsums`: masked column sums into
/// colsum_out[0..E), lane l of 8 summing rows r0 + l, r0 + l + 8, ... in order and the lanes
/// added in order. Always: the valid-token count into *s_tv. Called by every thread; ends
/// with a barrier.
template <class T, class Acc>
__device__ void block_rows(const routing_view<T>& P, const topk_view& I, const mask_view& mask, bool count,
                           bool colsums, index_t r0, index_t r1, Acc* colsum_out, int* counts_out,
                           unsigned long long* s_tv, int* s_flags, Acc* scratch) {
  constexpr int lanes = cuda_tuning::threads / 32;
  const int tid = static_cast<int>(threadIdx.x), col = tid % 32, lane = tid / 32;
  const index_t E = P.cols;
  if (count)
    for (index_t e = tid; e < E; e += cuda_tuning::threads) counts_out[e] = 0;
  if (tid == 0) *s_tv = 0, *s_flags = 0;
  __syncthreads();

  if (count) {
    const index_t k = I.k;
    int flags = 0;
    const index_t pairs = (r1 - r0) * k;
    for (index_t i = tid; i < pairs; i += cuda_tuning::threads) {
      const index_t t = r0 + i / k, s = i % k;
      bool usable = false;
      flags |= topk_slot_flags(I, t, s, E, usable);
      if (usable && mask(t)) atomicAdd(&counts_out[I(t, s)], 1);
    }
    if (flags != 0) atomicOr(s_flags, flags);
  }
  unsigned long long tv = 0;
  for (index_t t = r0 + tid; t < r1; t += cuda_tuning::threads) tv += mask(t) ? 1u : 0u;
  if (tv != 0) atomicAdd(s_tv, tv);

  if (colsums)
    for (index_t e0 = 0; e0 < E; e0 += 32) {
      const index_t e = e0 + col;
      Acc s = Acc(0);
      if (e < E)
        for (index_t t = r0 + lane; t < r1; t += lanes)
          if (mask(t)) s += dload(&P(t, e));
      scratch[tid] = s;
      __syncthreads();
      if (lane == 0 && e < E) {
        Acc sum = scratch[col];
        for (int l = 1; l < lanes; ++l) sum += scratch[l * 32 + col];
        colsum_out[e] = sum;
      }
      __syncthreads();
    }
  __syncthreads();
}

template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads) colsum_kernel(plan<T, Acc> p, workspace<Acc> w) {
  __shared__ Acc scratch[cuda_tuning::threads];
  __shared__ unsigned long long s_tv;
  __shared__ int s_flags;
  const index_t b = blockIdx.x;
  const index_t r0 = b * cuda_tuning::rows_per_block;
  const index_t r1 = r0 + cuda_tuning::rows_per_block < p.rows ? r0 + cuda_tuning::rows_per_block : p.rows;
  block_rows(p.P, p.I, p.mask, p.need_counts, p.need_colsum, r0, r1, w.colsum + b * p.E,
             p.need_counts ? w.counts + b * p.E : nullptr, &s_tv, &s_flags, scratch);
  if (threadIdx.x == 0) {
    w.tv[b] = static_cast<long long>(s_tv);
    w.err[b] = s_flags;
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads) finish1_kernel(plan<T, Acc> p, workspace<Acc> w, index_t nb1) {
  __shared__ Acc scratch[cuda_tuning::threads];
  __shared__ long long lscratch[cuda_tuning::threads];
  __shared__ int word;
  __shared__ Acc shared_acc[2];
  const int tid = static_cast<int>(threadIdx.x);
  const index_t E = p.E;
  const double nan = static_cast<double>(NAN);

  // Valid tokens of this call and the top-k flags.
  long long tv_local = 0;
  int topk_flags = 0;
  if (p.need_colsum || p.need_counts) {
    topk_flags = block_or(w.err, nb1, &word);
    tv_local = block_sum_strided(w.tv, nb1, 1, lscratch);
  } else {
    long long n = 0;
    if (p.mask.data == nullptr)
      n = tid == 0 ? static_cast<long long>(p.rows) : 0;
    else
      for (index_t t = tid; t < p.rows; t += cuda_tuning::threads) n += p.mask(t) ? 1 : 0;
    tv_local = block_sum(n, lscratch);
  }
  if (p.need_counts) block_column_sums(w.counts, nb1, E, w.count_total, lscratch);
  if (p.need_colsum) block_column_sums(w.colsum, nb1, E, w.colsum_total, scratch);
  scalars<Acc> sc{};

  if (p.lb) {
    int f = topk_flags;
    if (p.red[slot_lb] != nullptr) f |= block_check_stats(p.red[slot_lb], 1 + E, 1 + E, &word);
    if (p.stats_mode) {
      if (p.stats[slot_lb] != nullptr) {
        for (index_t e = tid; e < E; e += cuda_tuning::threads)
          p.stats[slot_lb][e + 1] = static_cast<double>(w.count_total[e]);
        if (tid == 0) p.stats[slot_lb][0] = f != 0 ? nan : static_cast<double>(tv_local);
      }
    } else {
      const double tv_f = p.red[slot_lb] != nullptr ? p.red[slot_lb][0] : static_cast<double>(tv_local);
      const double tv_p = p.lb_global ? static_cast<double>(tv_local) : tv_f;
      for (index_t e = tid; e < E; e += cuda_tuning::threads) {
        const double cnt = p.red[slot_lb] != nullptr ? p.red[slot_lb][e + 1] : static_cast<double>(w.count_total[e]);
        const auto r = lb_expert(cnt, tv_f, tv_p, w.colsum_total[e], p.lb_k, p.lb_alpha_e, p.lb_gs);
        w.lb_terms[e] = r.term;
        w.coeff[e] = f != 0 ? acc_nan<Acc>() : r.coeff;
      }
      __syncthreads();
      if (tid == 0)
        publish(p.value[slot_lb], nullptr, static_cast<double>(p.lb_alpha_e * pairwise_sum(w.lb_terms, E)), f);
    }
    sc.flags_lb = f;
  }

  if (p.imp) {
    int f = 0;
    if (p.red[slot_imp] != nullptr) f |= block_check_stats(p.red[slot_imp], E, 0, &word);
    if (p.stats_mode) {
      if (p.stats[slot_imp] != nullptr)
        for (index_t e = tid; e < E; e += cuda_tuning::threads)
          p.stats[slot_imp][e] = static_cast<double>(w.colsum_total[e]);
    } else {
      for (index_t e = tid; e < E; e += cuda_tuning::threads)
        w.imp[e] = p.red[slot_imp] != nullptr ? static_cast<Acc>(p.red[slot_imp][e]) : w.colsum_total[e];
      __syncthreads();
      const bool any = p.red[slot_imp] != nullptr || tv_local > 0;
      const Acc Ea = static_cast<Acc>(E);
      if (tid == 0) shared_acc[0] = E > 0 ? pairwise_sum(w.imp, E) / Ea : Acc(0);
      __syncthreads();
      const Acc mu = shared_acc[0];
      const bool active = any && mu != Acc(0);
      if (active) {
        for (index_t e = tid; e < E; e += cuda_tuning::threads) {
          const Acc d = w.imp[e] - mu;
          w.imp_tmp[e] = d * d;
        }
        __syncthreads();
        if (tid == 0) shared_acc[1] = pairwise_sum(w.imp_tmp, E) / Ea;
        __syncthreads();
      }
      const Acc var = active ? shared_acc[1] : Acc(0);
      const Acc wc = static_cast<Acc>(p.imp_coef), gw = static_cast<Acc>(p.imp_gs * p.imp_coef);
      const Acc mu2 = mu * mu;
      for (index_t e = tid; e < E; e += cuda_tuning::threads) {
        Acc c = active ? importance_coeff(w.imp[e], mu, var, Ea, mu2, gw) : Acc(0);
        if (f != 0) c = acc_nan<Acc>();
        w.coeff[e] = p.lb ? w.coeff[e] + c : c;
      }
      if (tid == 0) publish(p.value[slot_imp], nullptr, active ? static_cast<double>(wc * var / mu2) : 0.0, f);
    }
    sc.flags_imp = f;
  }

  if (p.var) {
    int f = 0;
    if (p.red[slot_var] != nullptr) f |= block_check_stats(p.red[slot_var], p.var_tokens ? 1 + E : 1, 1, &word);
    if (p.stats_mode) {
      if (p.stats[slot_var] != nullptr) {
        if (p.var_tokens)
          for (index_t e = tid; e < E; e += cuda_tuning::threads)
            p.stats[slot_var][e + 1] = static_cast<double>(w.colsum_total[e]);
        if (tid == 0) p.stats[slot_var][0] = static_cast<double>(tv_local);
      }
    } else {
      double tv = 0;
      if (p.var_tokens) {
        if (p.red[slot_var] != nullptr) {
          tv = p.red[slot_var][0];
          for (index_t e = tid; e < E; e += cuda_tuning::threads)
            w.sbar[e] = tv > 0 ? static_cast<Acc>(p.red[slot_var][e + 1] / tv) : Acc(0);
        } else {
          tv = static_cast<double>(tv_local);
          const Acc inv = tv_local > 0 ? Acc(1) / static_cast<Acc>(tv_local) : Acc(0);
          for (index_t e = tid; e < E; e += cuda_tuning::threads) w.sbar[e] = w.colsum_total[e] * inv;
        }
      } else {
        tv = p.red[slot_var] != nullptr ? p.red[slot_var][0] : static_cast<double>(tv_local);
      }
      const bool active = tv > 0 && (p.var_tokens || E != 1);
      if (active) {
        const double norm = p.var_mean ? 1.0 / tv : 1.0;
        const double denom = p.var_tokens ? static_cast<double>(E) : static_cast<double>(E - 1);
        const auto k = variance_scale<Acc>(p.var_coef, p.var_gs, norm, denom);
        sc.var_vc = k.vc;
        sc.var_gc = k.gc;
      }
      sc.var_active = active ? 1 : 0;
      if (f != 0) sc.var_active = 1, sc.var_gc = acc_nan<Acc>();  // poison the gradient
    }
    sc.flags_var = f;
  }

  // A loss whose statistics are [T_v] (z-loss, entropy): its reduced T_v checked (flags
  // returned), written out in stats mode, else the T_v its constants are formed from.
  const auto tv_slot = [&](int slot, double& tv) {
    const int f = p.red[slot] != nullptr ? block_check_stats(p.red[slot], 1, 1, &word) : 0;
    if (p.stats_mode && p.stats[slot] != nullptr && tid == 0) p.stats[slot][0] = static_cast<double>(tv_local);
    tv = p.red[slot] != nullptr ? p.red[slot][0] : static_cast<double>(tv_local);
    return f;
  };

  if (p.z) {
    double tv = 0;
    const int f = tv_slot(slot_z, tv);
    if (!p.stats_mode) {
      sc.z_inv_tv = tv > 0 ? static_cast<Acc>(1.0 / tv) : Acc(0);
      sc.z_gcoef = f != 0 ? acc_nan<Acc>() : p.z_gs * p.z_beta * Acc(2) * sc.z_inv_tv;
    }
    sc.flags_z = f;
  }

  if (p.ent) {
    double tv = 0;
    const int f = tv_slot(slot_ent, tv);
    if (!p.stats_mode) {
      const bool any = tv > 0;
      sc.ent_any = any ? 1 : 0;
      sc.ent_inv_tv = any ? static_cast<Acc>(1.0 / tv) : Acc(0);
      sc.ent_gc = any ? static_cast<Acc>(p.ent_gs * p.ent_coef / tv) : Acc(0);
      if (f != 0) sc.ent_any = 1, sc.ent_gc = acc_nan<Acc>();  // poison the gradient
    }
    sc.flags_ent = f;
  }

  if (tid == 0) {
    *w.sc = sc;
    const int all = sc.flags_lb | sc.flags_z | sc.flags_ent | sc.flags_var | sc.flags_imp;
    if (p.status != nullptr && all != 0) atomicOr(p.status, all);
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads) rows_kernel(plan<T, Acc> p, workspace<Acc> w) {
  __shared__ Acc warp_part[cuda_tuning::warps][3];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const scalars<Acc> sc = *w.sc;
  const bool do_ent = p.ent && sc.ent_any != 0, do_var = p.var && sc.var_active != 0;
  const bool p_rows = p.want_gP || do_ent || do_var;
  const index_t E = p.E, EZ = p.Z.cols;
  const index_t r0 = static_cast<index_t>(blockIdx.x) * cuda_row_block + warp * cuda_tuning::rows_per_warp;
  Acc az = Acc(0), ae = Acc(0), av = Acc(0);
  for (index_t i = 0; i < cuda_tuning::rows_per_warp; ++i) {
    const index_t t = r0 + i;
    if (t >= p.rows) break;
    const bool valid = p.mask(t);
    if (p_rows) {
      if (!valid) {
        if (p.want_gP && !p.accumulate)
          for (index_t e = lane; e < E; e += 32) dput_grad(&p.gP(t, e), Acc(0), false);
      } else {
        Acc center = Acc(0);
        if (do_var && !p.var_tokens) {
          Acc s = Acc(0);
          for (index_t e = lane; e < E; e += 32) s += dload(&p.P(t, e));
          center = warp_sum(s) / static_cast<Acc>(E);
        }
        Acc le = Acc(0), lv = Acc(0);
        for (index_t e = lane; e < E; e += 32) {
          Acc c = p.coeff_any ? w.coeff[e] : Acc(0);
          if (do_ent || do_var) {
            const Acc x = dload(&p.P(t, e));
            if (do_ent) {
              const auto r = entropy_elem(x, p.ent_tiny, p.ent_log_tiny);
              le -= r.plogp;
              c += sc.ent_gc * r.dfactor;
            }
            if (do_var) {
              const Acc d = x - (p.var_tokens ? w.sbar[e] : center);
              lv += d * d;
              c += sc.var_gc * d;
            }
          }
          if (p.want_gP) dput_grad(&p.gP(t, e), c, p.accumulate);
        }
        if (do_ent) ae += warp_sum(le);
        if (do_var) av += warp_sum(lv);
      }
    }
    if (p.z) {
      if (!valid) {
        if (p.want_gZ && !p.accumulate)
          for (index_t e = lane; e < EZ; e += 32) dput_grad(&p.gZ(t, e), Acc(0), false);
        continue;
      }
      Acc mx = -acc_infinity<Acc>();
      for (index_t e = lane; e < EZ; e += 32) mx = acc_max(mx, dload(&p.Z(t, e)));
      const Acc shift = lse_shift(warp_max(mx));
      Acc s = Acc(0);
      for (index_t e = lane; e < EZ; e += 32) s += lse_term(dload(&p.Z(t, e)), shift);
      s = warp_sum(s);
      const Acc lse = lse_finish(shift, s);
      az += lse * lse;
      if (p.want_gZ) {
        const Acc c = z_row_grad_coeff(sc.z_gcoef, lse, s);
        for (index_t e = lane; e < EZ; e += 32)
          dput_grad(&p.gZ(t, e), c * lse_term(dload(&p.Z(t, e)), shift), p.accumulate);
      }
    }
  }
  const Acc sums[3] = {az, ae, av};
  block_warp_partials(sums, warp_part, w.row_partials + static_cast<index_t>(blockIdx.x) * 3);
}

template <class T, class Acc>
__global__ void __launch_bounds__(cuda_tuning::threads) finish2_kernel(plan<T, Acc> p, workspace<Acc> w, index_t nb3) {
  __shared__ Acc scratch[cuda_tuning::threads];
  __shared__ Acc sums[3];
  block_column_sums(w.row_partials, nb3, 3, sums, scratch);
  if (threadIdx.x != 0) return;
  const scalars<Acc> sc = *w.sc;
  if (p.z) publish(p.value[slot_z], nullptr, static_cast<double>(p.z_beta * sc.z_inv_tv * sums[0]), sc.flags_z);
  if (p.ent)
    publish(p.value[slot_ent], nullptr, static_cast<double>(p.ent_eta * sc.ent_inv_tv * sums[1]), sc.flags_ent);
  if (p.var)
    publish(p.value[slot_var], nullptr, sc.var_active != 0 ? static_cast<double>(sc.var_vc * sums[2]) : 0.0,
            sc.flags_var);
}

/// Enqueues the run. Shapes were validated by the caller (each loss's own checks).
template <class T>
void run(const request<T>& rq, const cuda& be, const char* who) {
  using Acc = accumulator_t<T>;
  workspace_carver carver(be.workspace);
  const auto w = carve<Acc>(carver, rq);
  cuda_check_workspace(who, be, carver.required());

  plan<T, Acc> p{};
  p.P = rq.probs;
  p.Z = rq.logits;
  p.I = rq.topk;
  p.mask = rq.mask;
  p.gP = rq.grad_probs;
  p.gZ = rq.grad_logits;
  p.rows = rq.rows();
  p.E = rq.p_losses() ? rq.probs.cols : 0;
  p.stats_mode = rq.stats_mode;
  p.want_gP = !rq.stats_mode && rq.want_grad_probs && rq.p_losses();
  p.want_gZ = !rq.stats_mode && rq.want_grad_logits && rq.z != nullptr;
  p.accumulate = rq.opts.accumulate;
  p.lb = rq.lb != nullptr;
  p.z = rq.z != nullptr;
  p.ent = rq.ent != nullptr;
  p.var = rq.var != nullptr;
  p.imp = rq.imp != nullptr;
  p.need_counts = p.lb;
  p.need_colsum =
      (p.lb && !rq.stats_mode) || (p.imp && (rq.stats_mode || rq.io[slot_imp].reduced.empty())) ||
      (p.var && rq.var->cfg.axis == variance_axis::tokens && (rq.stats_mode || rq.io[slot_var].reduced.empty()));
  p.coeff_any = p.lb || p.imp;
  const double gs = rq.opts.grad_scale;
  if (p.lb) {
    p.lb_global = rq.lb->cfg.scope == lb_scope::global;
    p.lb_k = static_cast<Acc>(rq.lb->cfg.k > 0 ? rq.lb->cfg.k : rq.topk.k);
    p.lb_alpha_e = static_cast<Acc>(rq.lb->cfg.coef) * static_cast<Acc>(rq.probs.cols);
    p.lb_gs = static_cast<Acc>(gs);
  }
  if (p.z) {
    p.z_beta = static_cast<Acc>(rq.z->cfg.coef);
    p.z_gs = static_cast<Acc>(gs);
  }
  if (p.ent) {
    p.ent_coef = rq.ent->cfg.coef;
    p.ent_gs = gs;
    p.ent_eta = static_cast<Acc>(rq.ent->cfg.coef);
    p.ent_tiny = static_cast<Acc>(rq.ent->cfg.tiny);
    using std::log;
    p.ent_log_tiny = log(p.ent_tiny);
  }
  if (p.var) {
    p.var_coef = rq.var->cfg.coef;
    p.var_gs = gs;
    p.var_tokens = rq.var->cfg.axis == variance_axis::tokens;
    p.var_mean = rq.var->cfg.reduction == variance_reduction::mean;
  }
  if (p.imp) {
    p.imp_coef = rq.imp->cfg.coef;
    p.imp_gs = gs;
  }
  for (int i = 0; i < router_slots; ++i) {
    p.red[i] = rq.io[i].reduced.data;
    p.value[i] = rq.io[i].value;
    p.stats[i] = rq.io[i].stats;
  }
  p.status = be.status;

  const index_t T_ = p.rows;
  const index_t nb1 = colsum_blocks(T_), nb3 = row_blocks(T_);
  require(nb1 <= static_cast<index_t>(std::numeric_limits<int>::max()) &&
              nb3 <= static_cast<index_t>(std::numeric_limits<int>::max()),
          who, ": too many rows for one grid");
  const dim3 block(cuda_tuning::threads);
  const bool k1 = (p.need_colsum || p.need_counts) && T_ > 0;
  if (k1) {
    colsum_kernel<T, Acc><<<static_cast<unsigned>(nb1), block, 0, be.stream>>>(p, w);
    cuda_check_launch(who, "column-sum kernel");
  }
  finish1_kernel<T, Acc><<<1, block, 0, be.stream>>>(p, w, k1 ? nb1 : 0);
  cuda_check_launch(who, "finish kernel");
  if (rq.stats_mode) return;
  const bool row_values = p.z || p.ent || p.var;
  if ((row_values || p.want_gP) && nb3 > 0) {
    rows_kernel<T, Acc><<<static_cast<unsigned>(nb3), block, 0, be.stream>>>(p, w);
    cuda_check_launch(who, "rows kernel");
  }
  if (row_values) {
    finish2_kernel<T, Acc><<<1, block, 0, be.stream>>>(p, w, nb3);
    cuda_check_launch(who, "value kernel");
  }
}

// ---------------------------------------------------------------------------------------
// One router loss alone: what the z-loss, entropy, variance, importance and (outside the
// sequence scope) load balancing need from the engine.
// ---------------------------------------------------------------------------------------

/// The engine's slot of each router loss.
template <class Loss>
constexpr int slot_of() {
  if constexpr (std::is_same<Loss, load_balancing_loss>::value)
    return slot_lb;
  else if constexpr (std::is_same<Loss, z_loss>::value)
    return slot_z;
  else if constexpr (std::is_same<Loss, entropy_loss>::value)
    return slot_ent;
  else if constexpr (std::is_same<Loss, variance_loss>::value)
    return slot_var;
  else {
    static_assert(std::is_same<Loss, importance_loss>::value, "not a router loss");
    return slot_imp;
  }
}

/// The name the CUDA errors of each router loss carry, by slot.
inline constexpr const char* slot_names[router_slots] = {"load_balancing (cuda)", "z_loss (cuda)", "entropy (cuda)",
                                                         "variance (cuda)", "importance (cuda)"};

/// Puts a loss and its inputs into a request: the loss's pointer and the matrices it reads.
template <class T, class Loss, class In>
void bind(request<T>& rq, const Loss& l, const In& in) {
  rq.mask = in.mask;
  if constexpr (std::is_same<Loss, load_balancing_loss>::value)
    rq.lb = &l, rq.probs = in.probs, rq.topk = in.topk;
  else if constexpr (std::is_same<Loss, z_loss>::value)
    rq.z = &l, rq.logits = in.logits;
  else if constexpr (std::is_same<Loss, entropy_loss>::value)
    rq.ent = &l, rq.probs = in.probs;
  else if constexpr (std::is_same<Loss, variance_loss>::value)
    rq.var = &l, rq.probs = in.scores;
  else
    rq.imp = &l, rq.probs = in.probs;
}

template <class M>
struct storage_of;
template <class T>
struct storage_of<matrix_view<T>> {
  using type = T;
};

/// The request of `loss` alone on `in`, without outputs (all the workspace query needs).
template <class Loss, class In>
request<typename storage_of<grad_view_t<In>>::type> single_request(const Loss& loss, const In& in) {
  request<typename storage_of<grad_view_t<In>>::type> rq;
  bind(rq, loss, in);
  return rq;
}

/// Runs `loss` alone (its arguments already validated): the value into *be.value and the
/// gradient, or with `stats_out` its local statistics.
template <class Loss, class In, class G>
void run_single(const cuda& be, const Loss& loss, const In& in, stats_view reduced, const G* grad, grad_options opts,
                double* stats_out) {
  auto rq = single_request(loss, in);
  rq.io[slot_of<Loss>()] = router_io{reduced, be.value, stats_out};
  rq.stats_mode = stats_out != nullptr;
  if (grad != nullptr) {
    if constexpr (std::is_same<Loss, z_loss>::value)
      rq.grad_logits = *grad, rq.want_grad_logits = true;
    else
      rq.grad_probs = *grad, rq.want_grad_probs = true;
  }
  rq.opts = opts;
  run(rq, be, slot_names[slot_of<Loss>()]);
}

}  // namespace cuda_router

/// The CUDA entries (backend/cuda/api.cuh) of the router losses that are one engine run: the
/// z-loss, entropy, variance and importance. (Load balancing has its own: the sequence scope.)
template <class Loss>
inline constexpr bool is_single_router_loss_v =
    std::is_same<Loss, z_loss>::value || std::is_same<Loss, entropy_loss>::value ||
    std::is_same<Loss, variance_loss>::value || std::is_same<Loss, importance_loss>::value;

template <class Loss, class In, class G, std::enable_if_t<is_single_router_loss_v<Loss>, int> = 0>
void cuda_run(const cuda& be, const Loss& loss, const In& in, stats_view reduced, const G* grad, grad_options opts,
              double* stats_out) {
  const char* who = cuda_router::slot_names[cuda_router::slot_of<Loss>()];
  cuda_validate(who, loss, in, reduced, grad, be);
  if (stats_out != nullptr) cuda_check_stats_out(who, stats_out, loss.stats_size(in), be);
  cuda_router::run_single(be, loss, in, reduced, grad, opts, stats_out);
}
template <class Loss, class In, std::enable_if_t<is_single_router_loss_v<Loss>, int> = 0>
std::size_t cuda_workspace_bytes(const Loss& loss, const In& in) {
  return cuda_router::required_bytes(cuda_router::single_request(loss, in));
}

}  // namespace detail
MOEREG_NAMESPACE_END
