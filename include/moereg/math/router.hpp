// Per-row and per-expert arithmetic of the router losses (load balancing, z-loss, entropy,
// importance, variance), written once as MOEREG_HOST_DEVICE functions. The CUDA kernels call
// them; the CPU load-balancing and z-loss executors call them too, and the entropy, importance
// and variance functions are the CPU executors' expressions, term for term, so the formulas
// the CPU tests check are the formulas the GPU evaluates. What differs between the backends is
// only the order of the sums that feed them (each backend's order is fixed; see
// backend/cpu.hpp and backend/cuda/core.cuh).
//
// Nothing here reads memory through a view: the callers load the elements (a CPU `load`, or
// a CUDA load that converts 16-bit storage through its raw bits) and pass numbers in.
#pragma once

#include <cmath>

#include "../core/config.hpp"
#include "../core/types.hpp"

MOEREG_NAMESPACE_BEGIN
namespace detail {

/// +infinity of an accumulator type, usable in device code (numeric_limits is constexpr
/// host-only without --expt-relaxed-constexpr).
template <class Acc>
MOEREG_HOST_DEVICE inline Acc acc_infinity() {
  return static_cast<Acc>(HUGE_VALF);
}

/// A quiet NaN of an accumulator type, usable in device code.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc acc_nan() {
  return static_cast<Acc>(NAN);
}

/// max(a, b) with std::max's convention: returns a unless a < b.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc acc_max(Acc a, Acc b) {
  return a < b ? b : a;
}

// ---------------------------------------------------------------------------------------
// Log-sum-exp of one row (z-loss, LOSSES.md section 2)
// ---------------------------------------------------------------------------------------

/// The shift of a stable log-sum-exp given the row maximum: the maximum itself, or 0 when
/// every entry is -inf (or NaN), which avoids inf - inf.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc lse_shift(Acc row_max) {
  return row_max > -acc_infinity<Acc>() ? row_max : Acc(0);
}

/// log sum_e exp(z_e) from the shift and sum_e exp(z_e - shift).
template <class Acc>
MOEREG_HOST_DEVICE inline Acc lse_finish(Acc shift, Acc expsum) {
  using std::log;
  return shift + log(expsum);
}

/// exp(z - shift), one term of the row sum and, divided by the sum, one softmax entry.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc lse_term(Acc z, Acc shift) {
  using std::exp;
  return exp(z - shift);
}

/// Stable log-sum-exp of z(0), ..., z(n - 1), summed sequentially: `buf` receives
/// exp(z - shift) and `expsum` their sum, so that softmax(z)_e = buf[e] / expsum.
/// `z(e)` returns the element as Acc.
template <class Acc, class Load>
MOEREG_HOST_DEVICE inline Acc logsumexp_row(const Load& z, index_t n, Acc* buf, Acc& expsum) {
  Acc mx = -acc_infinity<Acc>();
  for (index_t e = 0; e < n; ++e) mx = acc_max(mx, z(e));
  const Acc shift = lse_shift(mx);
  Acc s = Acc(0);
  for (index_t e = 0; e < n; ++e) {
    buf[e] = lse_term(z(e), shift);
    s += buf[e];
  }
  expsum = s;
  return lse_finish(shift, s);
}

/// The z-loss gradient of a valid row is c * exp(z_e - shift) with this c:
/// gcoef * lse / expsum, where gcoef = grad_scale * beta * 2 / T_v.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc z_row_grad_coeff(Acc gcoef, Acc lse, Acc expsum) {
  return gcoef * lse / expsum;
}

// ---------------------------------------------------------------------------------------
// Load balancing, per expert (LOSSES.md section 1)
// ---------------------------------------------------------------------------------------

/// One expert's share of the load-balancing loss: `term` = f_e * pbar_e (the value is
/// alpha * E * sum_e term_e) and `coeff` = the gradient dL/dP[t,e] of a valid row.
template <class Acc>
struct lb_expert_result {
  Acc term;
  Acc coeff;
};

/// Micro and global scopes. count = count_e, tv_f = the valid-token count behind f (local or
/// reduced), tv_p = the one behind pbar and the gradient (local for the global scope),
/// colsum = sum_t m_t P[t,e], k = configured top-k width, alpha_e = alpha * E,
/// gs = grad_scale.
template <class Acc>
MOEREG_HOST_DEVICE inline lb_expert_result<Acc> lb_expert(double count, double tv_f, double tv_p, Acc colsum, Acc k,
                                                          Acc alpha_e, Acc gs) {
  const Acc f = tv_f > 0 ? static_cast<Acc>(count / tv_f) / k : Acc(0);
  const Acc inv_tvp = tv_p > 0 ? static_cast<Acc>(1.0 / tv_p) : Acc(0);
  return {f * colsum * inv_tvp, gs * alpha_e * f * inv_tvp};
}

/// Sequence scope, one sequence: count = count_{b,e}, inv_tv = 1 / T_{v,b} (0 for an empty
/// sequence), inv_b = 1 / B; the gradient carries the 1/B of the mean over sequences.
template <class Acc>
MOEREG_HOST_DEVICE inline lb_expert_result<Acc> lb_seq_expert(Acc count, Acc inv_tv, Acc colsum, Acc k, Acc alpha_e,
                                                              Acc gs, Acc inv_b) {
  const Acc f = count * inv_tv / k;
  return {f * colsum * inv_tv, gs * alpha_e * inv_b * f * inv_tv};
}

// ---------------------------------------------------------------------------------------
// Router entropy, per element (LOSSES.md section 7)
// ---------------------------------------------------------------------------------------

/// One entry p of a valid row: `plogp` = p log max(p, tiny) (the row's entropy is minus the
/// sum of these) and `dfactor` = d(-p log max(p, tiny))/dp, which is -(log p + 1) above tiny
/// and -log(tiny) below it (max(p, tiny) is constant there). log_tiny = log(tiny) in Acc.
template <class Acc>
struct entropy_elem_result {
  Acc plogp;
  Acc dfactor;
};

template <class Acc>
MOEREG_HOST_DEVICE inline entropy_elem_result<Acc> entropy_elem(Acc p, Acc tiny, Acc log_tiny) {
  using std::log;
  const bool above = p > tiny;
  const Acc lp = above ? log(p) : log_tiny;
  return {p * lp, above ? -(lp + Acc(1)) : -log_tiny};
}

// ---------------------------------------------------------------------------------------
// Importance, per expert (LOSSES.md section 7)
// ---------------------------------------------------------------------------------------

/// dL/dP[t,e] of a valid row for L = w var(imp) / mu^2 (population variance over E experts):
/// gw * (2 (imp_e - mu) / (E mu^2) - 2 var / (E mu^3)), gw = grad_scale * w, mu2 = mu * mu.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc importance_coeff(Acc imp_e, Acc mu, Acc var, Acc num_experts, Acc mu2, Acc gw) {
  return gw * (Acc(2) * (imp_e - mu) / (num_experts * mu2) - Acc(2) * var / (num_experts * mu2 * mu));
}

// ---------------------------------------------------------------------------------------
// Variance, per call (LOSSES.md section 6)
// ---------------------------------------------------------------------------------------

/// The two constants of the variance loss once T_v is known: value = vc * sum_t m_t q_t with
/// q_t = sum_e d_{t,e}^2, gradient = gc * d_{t,e}, d = S - center (sbar_e on the tokens axis,
/// the row mean on the experts axis). denom = E (tokens) or E - 1 (experts); norm = 1 / T_v
/// (mean) or 1 (sum).
template <class Acc>
struct variance_constants {
  Acc vc;
  Acc gc;
};

template <class Acc>
MOEREG_HOST_DEVICE inline variance_constants<Acc> variance_scale(double coef, double grad_scale, double norm,
                                                                 double denom) {
  return {static_cast<Acc>(-coef * norm / denom), static_cast<Acc>(-grad_scale * coef * 2.0 * norm / denom)};
}

// ---------------------------------------------------------------------------------------
// Auxiliary-loss-free bias update (LOSSES.md section 7)
// ---------------------------------------------------------------------------------------

/// One expert's updated bias before centring: b + u * sign(mean_c - c), sign(0) = 0.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc bias_step(Acc b, Acc u, double mean_c, double c) {
  const double d = mean_c - c;
  return b + u * (d > 0 ? Acc(1) : (d < 0 ? Acc(-1) : Acc(0)));
}

// ---------------------------------------------------------------------------------------
// Cross-layer coupling, token and log forms: one adjacent pair (LOSSES.md section 4)
// ---------------------------------------------------------------------------------------

/// The term of the adjacent pair (l, l+1) of one token, from the top-k masses a = M^l_t and
/// c = M^{l+1}_t: a c (token form) or log(a c + eps) (log form). `w` receives the term's
/// derivative with respect to the product a c (1, or 1 / (a c + eps)), so that
/// dM^l += w c and dM^{l+1} += w a.
template <class Acc>
MOEREG_HOST_DEVICE inline Acc coupling_pair(Acc a, Acc c, bool is_log, Acc eps, Acc& w) {
  if (is_log) {
    using std::log;
    const Acc q = a * c + eps;
    w = Acc(1) / q;
    return log(q);
  }
  w = Acc(1);
  return a * c;
}

// ---------------------------------------------------------------------------------------
// Cross-layer coupling, batch form: the pair selection (LOSSES.md section 4)
// ---------------------------------------------------------------------------------------

/// Marks with 1 in sel[0..E) the k largest entries of row[0..E), ties to the lower index:
/// k rounds, each taking the first unselected entry that no later unselected entry strictly
/// exceeds (a NaN never wins). Both backends select with it.
template <class Src, class Acc>
MOEREG_HOST_DEVICE inline void coupling_select_row(const Src* row, index_t E, index_t k, Acc* sel) {
  for (index_t e = 0; e < E; ++e) sel[e] = Acc(0);
  for (index_t c = 0; c < k; ++c) {
    index_t best = -1;
    for (index_t e = 0; e < E; ++e) {
      if (sel[e] != Acc(0)) continue;
      if (best < 0 || row[e] > row[best]) best = e;
    }
    sel[best] = Acc(1);
  }
}

}  // namespace detail
MOEREG_NAMESPACE_END
