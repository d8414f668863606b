// Naive reference implementation of the moereg losses (LOSSES.md sections 1-8).
//
// Purpose: an independent, deliberately slow and plain implementation that the
// tests compare the optimised library against. Everything is double precision,
// every formula is a direct loop over the definition in LOSSES.md, and every
// gradient is the analytic derivative written out by hand (no finite differences).
// It uses only the standard library and must never include moereg headers.
//
// Data layout (all row-major):
//   P, Z, S          std::vector<double> [T, E]
//   I                std::vector<long long> [T, k]; I[t,s] < 0 = dropped slot
//   mask             std::vector<int> of length T, nonzero = valid token;
//                    an empty vector means "all tokens valid"
//   H (activations)  std::vector<double> [T, k, d] token-major: h_{t,s} starts at (t*k+s)*d
//
// Common rules (LOSSES.md, "Rules that hold for every loss"):
//   - I, mask and counts are constants (no gradient through them);
//   - T_v = 0 gives value 0 and an all-zero gradient;
//   - the coefficient (alpha, beta, lambda, ...) is included in the value;
//   - gradient scale is always 1 here (the library's grad_scale is a plain multiplier).
//
// Invalid shapes or out-of-range indices throw std::invalid_argument.
#ifndef MOEREG_TESTS_REFERENCE_REFERENCE_HPP
#define MOEREG_TESTS_REFERENCE_REFERENCE_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moereg_ref {

struct result {
  double value = 0.0;
  std::vector<double> grad;
};

namespace detail {

inline std::size_t uz(long long v) {
  return static_cast<std::size_t>(v);
}

inline void require(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument("moereg_ref: " + msg);
}

inline void check_mask(const std::vector<int>& mask, long long T) {
  require(mask.empty() || mask.size() == uz(T), "mask must be empty or have length T");
}

// m_t in {0, 1}
inline double m(const std::vector<int>& mask, long long t) {
  return (mask.empty() || mask[uz(t)] != 0) ? 1.0 : 0.0;
}

// T_v = sum_t m_t
inline double valid_tokens(const std::vector<int>& mask, long long T) {
  double tv = 0.0;
  for (long long t = 0; t < T; ++t) tv += m(mask, t);
  return tv;
}

// I has T*k entries, each either < 0 (dropped) or in [0, E), distinct within a row.
inline void check_topk(const std::vector<long long>& I, long long T, long long k, long long E) {
  require(k >= 1 && k <= E, "k must satisfy 1 <= k <= E");
  require(I.size() == uz(T * k), "top-k indices must have T*k entries");
  for (long long t = 0; t < T; ++t) {
    for (long long s = 0; s < k; ++s) {
      const long long e = I[uz(t * k + s)];
      require(e < E, "top-k index out of range [0, E)");
      if (e < 0) continue;
      for (long long r = 0; r < s; ++r) require(I[uz(t * k + r)] != e, "top-k indices must be distinct within a row");
    }
  }
}

// A_t: the valid slots of token t.
inline std::vector<long long> valid_slots(const std::vector<long long>& I, long long t, long long k) {
  std::vector<long long> a;
  for (long long s = 0; s < k; ++s)
    if (I[uz(t * k + s)] >= 0) a.push_back(s);
  return a;
}

inline double dot(const double* a, const double* b, long long d) {
  double acc = 0.0;
  for (long long i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

// Solves (A) x = rhs for a small symmetric positive definite n x n matrix A
// (row-major) with a hand-written Cholesky factorisation A = L L^T.
inline std::vector<double> cholesky_solve(const std::vector<double>& A, const std::vector<double>& rhs, std::size_t n) {
  std::vector<double> L(n * n, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = 0; j <= i; ++j) {
      double s = A[i * n + j];
      for (std::size_t p = 0; p < j; ++p) s -= L[i * n + p] * L[j * n + p];
      if (i == j) {
        if (!(s > 0.0)) throw std::runtime_error("moereg_ref: matrix not positive definite");
        L[i * n + i] = std::sqrt(s);
      } else {
        L[i * n + j] = s / L[j * n + j];
      }
    }
  }
  std::vector<double> y(n, 0.0), x(n, 0.0);
  for (std::size_t i = 0; i < n; ++i) {  // L y = rhs
    double s = rhs[i];
    for (std::size_t p = 0; p < i; ++p) s -= L[i * n + p] * y[p];
    y[i] = s / L[i * n + i];
  }
  for (std::size_t i = n; i-- > 0;) {  // L^T x = y
    double s = y[i];
    for (std::size_t p = i + 1; p < n; ++p) s -= L[p * n + i] * x[p];
    x[i] = s / L[i * n + i];
  }
  return x;
}

// -p log max(p, tiny) and its derivative (max(p, tiny) is constant where p <= tiny).
constexpr double entropy_tiny = 1e-30;
inline double neg_plogp(double p) {
  return -p * std::log(std::max(p, entropy_tiny));
}
inline double neg_plogp_grad(double p) {
  return p > entropy_tiny ? -(std::log(p) + 1.0) : -std::log(entropy_tiny);
}

// Indices of the n largest entries of row[0..E), ties to the lower index.
inline std::vector<long long> topn_lower_index(const double* row, long long E, long long n) {
  std::vector<char> taken(uz(E), 0);
  std::vector<long long> out;
  for (long long c = 0; c < n; ++c) {
    long long best = -1;
    for (long long e = 0; e < E; ++e) {
      if (taken[uz(e)]) continue;
      if (best < 0 || row[e] > row[best]) best = e;  // strict >: earlier index wins ties
    }
    taken[uz(best)] = 1;
    out.push_back(best);
  }
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------------------
// 1. Load balancing, micro-batch scope.
//   f_e    = (1 / (k T_v)) sum_t m_t sum_{s in A_t} [I[t,s] = e]   (k = configured k)
//   pbar_e = (1 / T_v) sum_t m_t P[t,e]
//   L      = alpha * E * sum_e f_e pbar_e
//   dL/dP[t,e] = alpha * E * f_e * m_t / T_v
// ---------------------------------------------------------------------------
inline result load_balancing(const std::vector<double>& P, const std::vector<long long>& I,
                             const std::vector<int>& mask, long long T, long long E, long long k, double alpha) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(P.size() == uz(T * E), "P must have T*E entries");
  check_topk(I, T, k, E);
  check_mask(mask, T);
  result r;
  r.grad.assign(P.size(), 0.0);
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0) return r;

  std::vector<double> f(uz(E), 0.0), pbar(uz(E), 0.0);
  for (long long t = 0; t < T; ++t) {
    for (long long s = 0; s < k; ++s) {
      const long long e = I[uz(t * k + s)];
      if (e >= 0) f[uz(e)] += m(mask, t);
    }
    for (long long e = 0; e < E; ++e) pbar[uz(e)] += m(mask, t) * P[uz(t * E + e)];
  }
  for (long long e = 0; e < E; ++e) {
    f[uz(e)] /= static_cast<double>(k) * tv;
    pbar[uz(e)] /= tv;
  }
  double sum = 0.0;
  for (long long e = 0; e < E; ++e) sum += f[uz(e)] * pbar[uz(e)];
  r.value = alpha * static_cast<double>(E) * sum;
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < E; ++e)
      r.grad[uz(t * E + e)] = alpha * static_cast<double>(E) * f[uz(e)] * m(mask, t) / tv;
  return r;
}

// ---------------------------------------------------------------------------
// 1. Load balancing, sequence scope (DeepSeek seq_aux).
//   Sequence b = rows [cu[b], cu[b+1]); f_{b,e}, pbar_{b,e} as above with the
//   sequence's own valid-token count T_{v,b};
//   L = (1/B) sum_b alpha * E * sum_e f_{b,e} pbar_{b,e}
//   dL/dP[t,e] = (1/B) alpha * E * f_{b(t),e} * m_t / T_{v,b(t)}
//   A sequence with T_{v,b} = 0 contributes 0 but still counts in B.
//   A fixed sequence length S is the offsets 0, S, 2S, ..., T.
// ---------------------------------------------------------------------------
inline result load_balancing_seq(const std::vector<double>& P, const std::vector<long long>& I,
                                 const std::vector<int>& mask, long long T, long long E, long long k, double alpha,
                                 const std::vector<long long>& cu_seqlens) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(P.size() == uz(T * E), "P must have T*E entries");
  check_topk(I, T, k, E);
  check_mask(mask, T);
  require(!cu_seqlens.empty() && cu_seqlens.front() == 0 && cu_seqlens.back() == T,
          "cu_seqlens must start at 0 and end at T");
  for (std::size_t b = 0; b + 1 < cu_seqlens.size(); ++b)
    require(cu_seqlens[b] <= cu_seqlens[b + 1], "cu_seqlens must be non-decreasing");

  result r;
  r.grad.assign(P.size(), 0.0);
  const long long B = static_cast<long long>(cu_seqlens.size()) - 1;
  if (B == 0 || valid_tokens(mask, T) == 0.0) return r;

  for (long long b = 0; b < B; ++b) {
    const long long t0 = cu_seqlens[uz(b)], t1 = cu_seqlens[uz(b + 1)];
    double tv = 0.0;
    for (long long t = t0; t < t1; ++t) tv += m(mask, t);
    if (tv == 0.0) continue;
    std::vector<double> f(uz(E), 0.0), pbar(uz(E), 0.0);
    for (long long t = t0; t < t1; ++t) {
      for (long long s = 0; s < k; ++s) {
        const long long e = I[uz(t * k + s)];
        if (e >= 0) f[uz(e)] += m(mask, t);
      }
      for (long long e = 0; e < E; ++e) pbar[uz(e)] += m(mask, t) * P[uz(t * E + e)];
    }
    double sum = 0.0;
    for (long long e = 0; e < E; ++e) {
      f[uz(e)] /= static_cast<double>(k) * tv;
      pbar[uz(e)] /= tv;
      sum += f[uz(e)] * pbar[uz(e)];
    }
    r.value += alpha * static_cast<double>(E) * sum / static_cast<double>(B);
    for (long long t = t0; t < t1; ++t)
      for (long long e = 0; e < E; ++e)
        r.grad[uz(t * E + e)] = alpha * static_cast<double>(E) * f[uz(e)] * m(mask, t) / tv / static_cast<double>(B);
  }
  return r;
}

// ---------------------------------------------------------------------------
// 2. Router z-loss.
//   lse_t = log sum_e exp(Z[t,e])  (computed as max + log sum exp(Z - max))
//   L = beta * (1/T_v) sum_t m_t lse_t^2
//   dL/dZ[t,e] = beta * (2/T_v) m_t lse_t softmax(Z_t)_e
// ---------------------------------------------------------------------------
inline result z_loss(const std::vector<double>& Z, const std::vector<int>& mask, long long T, long long E,
                     double beta) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(Z.size() == uz(T * E), "Z must have T*E entries");
  check_mask(mask, T);
  result r;
  r.grad.assign(Z.size(), 0.0);
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0) return r;
  for (long long t = 0; t < T; ++t) {
    if (m(mask, t) == 0.0) continue;
    double mx = Z[uz(t * E)];
    for (long long e = 1; e < E; ++e) mx = std::max(mx, Z[uz(t * E + e)]);
    double se = 0.0;
    for (long long e = 0; e < E; ++e) se += std::exp(Z[uz(t * E + e)] - mx);
    const double lse = mx + std::log(se);
    r.value += beta * lse * lse / tv;
    for (long long e = 0; e < E; ++e) {
      const double sm = std::exp(Z[uz(t * E + e)] - mx) / se;
      r.grad[uz(t * E + e)] = beta * 2.0 / tv * lse * sm;
    }
  }
  return r;
}

// ---------------------------------------------------------------------------
// 3. Intra-layer specialization loss (Hu et al., R_sp).
//   n_{t,s}   = max(||h_{t,s}||, eps)            (the constant eps where ||h|| < eps)
//   c_{t,s,r} = <h_{t,s}, h_{t,r}> / (n_{t,s} n_{t,r})
//   L = lambda * (1/T_v) sum_t m_t w_t sum_{s != r in A_t} c_{t,s,r}^2   (ordered pairs)
//   w_t = 1 (pairs = sum) or 1 / (|A_t| (|A_t| - 1)) (pairs = mean; 0 if |A_t| < 2).
// Gradient, per ordered pair (s, r), with a = <h_s, h_r>:
//   dc/dh_s = h_r / (n_s n_r) - c h_s / n_s^2   (second term only where ||h_s|| >= eps)
//   d(c^2)/dh_s = 2 c dc/dh_s, and symmetrically for h_r.
// Dropped slots get gradient 0.
// ---------------------------------------------------------------------------
inline result specialization(const std::vector<double>& H, const std::vector<long long>& I,
                             const std::vector<int>& mask, long long T, long long k, long long d, double lambda,
                             bool pairs_mean, double eps) {
  using namespace detail;
  require(T >= 0 && k >= 1 && d >= 1, "T >= 0, k >= 1, d >= 1 required");
  require(I.size() == uz(T * k), "top-k indices must have T*k entries");
  require(H.size() == uz(T * k * d), "H must have T*k*d entries");
  check_mask(mask, T);
  result r;
  r.grad.assign(H.size(), 0.0);
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0) return r;

  for (long long t = 0; t < T; ++t) {
    if (m(mask, t) == 0.0) continue;
    const std::vector<long long> A = valid_slots(I, t, k);
    const long long na = static_cast<long long>(A.size());
    if (na < 2) continue;
    const double w = pairs_mean ? 1.0 / static_cast<double>(na * (na - 1)) : 1.0;
    const double scale = lambda * w / tv;

    std::vector<double> nrm(uz(na)), n(uz(na));
    std::vector<char> active(uz(na));
    for (long long i = 0; i < na; ++i) {
      const double* h = &H[uz((t * k + A[uz(i)]) * d)];
      nrm[uz(i)] = std::sqrt(dot(h, h, d));
      active[uz(i)] = nrm[uz(i)] >= eps ? 1 : 0;
      n[uz(i)] = active[uz(i)] ? nrm[uz(i)] : eps;
    }
    for (long long i = 0; i < na; ++i) {
      for (long long j = 0; j < na; ++j) {
        if (i == j) continue;
        const std::size_t os = uz((t * k + A[uz(i)]) * d), orr = uz((t * k + A[uz(j)]) * d);
        const double* hs = &H[os];
        const double* hr = &H[orr];
        const double ns = n[uz(i)], nr = n[uz(j)];
        const double c = dot(hs, hr, d) / (ns * nr);
        r.value += scale * c * c;
        for (long long q = 0; q < d; ++q) {
          double dcs = hr[q] / (ns * nr);
          if (active[uz(i)]) dcs -= c * hs[q] / (ns * ns);
          double dcr = hs[q] / (ns * nr);
          if (active[uz(j)]) dcr -= c * hr[q] / (nr * nr);
          r.grad[os + uz(q)] += scale * 2.0 * c * dcs;
          r.grad[orr + uz(q)] += scale * 2.0 * c * dcr;
        }
      }
    }
  }
  return r;
}

// ---------------------------------------------------------------------------
// 4. Cross-layer coupling loss (Hu et al., R_cp), L layers, grads one per layer.
//   M^l_t = sum_{s in A^l_t} P^l[t, I^l[t,s]]
//   token: L = -lambda (1/T_v) sum_t m_t sum_{l=1}^{L-1} M^l_t M^{l+1}_t
//          dL/dP^l[t,e] = -lambda m_t/T_v [e sel. at l] (M^{l-1}_t + M^{l+1}_t)
//   log:   L = -lambda (1/T_v) sum_t m_t sum_l log(M^l_t M^{l+1}_t + eps)
//          dL/dP^l[t,e] = -lambda m_t/T_v [e sel. at l] *
//                         (M^{l+1}/(M^l M^{l+1} + eps) + M^{l-1}/(M^{l-1} M^l + eps))
//   batch: J^l = (1/T_v) sum_t m_t P^l[t,:]^T P^{l+1}[t,:]  (E x E)
//          L = -lambda sum_l sum_e sum_{nu in top_{k_l}(J^l[e,:])} J^l[e,nu]
//          (selection constant, ties to the lower expert index; k_l is the width of
//           the SOURCE layer l, as LOSSES.md says; the selected I is not used)
//          dL/dP^l[t,e]   += -lambda m_t/T_v sum_{nu in sel_l(e)} P^{l+1}[t,nu]
//          dL/dP^{l+1}[t,nu] += -lambda m_t/T_v sum_{e: nu in sel_l(e)} P^l[t,e]
// Fewer than 2 layers: value 0 and zero gradients (the sum over l is empty).
// ---------------------------------------------------------------------------
inline std::pair<double, std::vector<std::vector<double>>> coupling(const std::vector<std::vector<double>>& P,
                                                                    const std::vector<std::vector<long long>>& I,
                                                                    const std::vector<long long>& k,
                                                                    const std::vector<int>& mask, long long T,
                                                                    long long E, double lambda, const std::string& form,
                                                                    double eps) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(form == "token" || form == "log" || form == "batch", "form must be token, log or batch");
  const std::size_t L = P.size();
  require(I.size() == L && k.size() == L, "P, I and k must have one entry per layer");
  for (std::size_t l = 0; l < L; ++l) {
    require(P[l].size() == uz(T * E), "each P^l must have T*E entries");
    check_topk(I[l], T, k[l], E);
  }
  check_mask(mask, T);

  std::pair<double, std::vector<std::vector<double>>> out;
  out.first = 0.0;
  out.second.assign(L, std::vector<double>(uz(T * E), 0.0));
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0 || L < 2) return out;

  if (form == "batch") {
    for (std::size_t l = 0; l + 1 < L; ++l) {
      std::vector<double> J(uz(E * E), 0.0);
      for (long long t = 0; t < T; ++t)
        for (long long e = 0; e < E; ++e)
          for (long long nu = 0; nu < E; ++nu)
            J[uz(e * E + nu)] += m(mask, t) * P[l][uz(t * E + e)] * P[l + 1][uz(t * E + nu)] / tv;
      for (long long e = 0; e < E; ++e) {
        const std::vector<long long> sel = topn_lower_index(&J[uz(e * E)], E, k[l]);
        for (long long nu : sel) {
          out.first += -lambda * J[uz(e * E + nu)];
          for (long long t = 0; t < T; ++t) {
            const double g = -lambda * m(mask, t) / tv;
            out.second[l][uz(t * E + e)] += g * P[l + 1][uz(t * E + nu)];
            out.second[l + 1][uz(t * E + nu)] += g * P[l][uz(t * E + e)];
          }
        }
      }
    }
    return out;
  }

  // token and log forms: top-k masses M^l_t
  std::vector<std::vector<double>> M(L, std::vector<double>(uz(T), 0.0));
  for (std::size_t l = 0; l < L; ++l)
    for (long long t = 0; t < T; ++t)
      for (long long s = 0; s < k[l]; ++s) {
        const long long e = I[l][uz(t * k[l] + s)];
        if (e >= 0) M[l][uz(t)] += P[l][uz(t * E + e)];
      }
  const bool is_log = form == "log";
  for (long long t = 0; t < T; ++t) {
    const double mt = m(mask, t);
    if (mt == 0.0) continue;
    const double c = -lambda * mt / tv;
    for (std::size_t l = 0; l + 1 < L; ++l) {
      const double a = M[l][uz(t)], b = M[l + 1][uz(t)];
      out.first += c * (is_log ? std::log(a * b + eps) : a * b);
    }
    for (std::size_t l = 0; l < L; ++l) {
      // dL/dM^l_t
      double dM = 0.0;
      if (l + 1 < L) {
        const double nb = M[l + 1][uz(t)];
        dM += is_log ? nb / (M[l][uz(t)] * nb + eps) : nb;
      }
      if (l > 0) {
        const double pb = M[l - 1][uz(t)];
        dM += is_log ? pb / (pb * M[l][uz(t)] + eps) : pb;
      }
      for (long long s = 0; s < k[l]; ++s) {
        const long long e = I[l][uz(t * k[l] + s)];
        if (e >= 0) out.second[l][uz(t * E + e)] += c * dM;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// 5. Orthogonality loss (Guo et al., L_o).
// pairwise: for valid j != s of token t, a = <h_j, h_s>, q = ||h_s||^2, D = q + eps:
//   term_{t,j,s} = a^2 q / D^2
//   L = beta * (1/T_v or 1 if reduction_sum) sum_t m_t sum_{j != s in A_t} term_{t,j,s}
//   d term/dh_j = 2 a q / D^2 h_s
//   d term/dh_s = 2 a q / D^2 h_j + 2 a^2 (eps - q) / D^3 h_s
// subspace: X_j = [other valid h_{t,s}] (d x n), G = X^T X, A = G + eps I,
//   b = A^{-1} X^T h_j, p = X b, term_{t,j} = ||p||^2,
//   L = beta * (1/T_v or 1) sum_t m_t (1/k) sum_{j in A_t} term_{t,j}   (|A_t| < 2 gives 0)
//   Exact gradient: dA = dX^T X + X^T dX, db = A^{-1}(dX^T h + X^T dh - dA b),
//   d term = 2 p.(dX b + X db). With c = A^{-1} X^T p (A symmetric):
//     d term/dh_j = 2 X c
//     d term/dX   = 2 (p - X c) b^T + 2 (h_j - p) c^T
//   i.e. column i of X (the vector h_{s_i}) gets 2 (p - X c) b_i + 2 (h_j - p) c_i.
//   The solves use a hand-written Cholesky factorisation of A.
// reduction_sum drops the 1/T_v for both variants.
// ---------------------------------------------------------------------------
inline result orthogonality(const std::vector<double>& H, const std::vector<long long>& I, const std::vector<int>& mask,
                            long long T, long long k, long long d, double beta, bool reduction_sum,
                            const std::string& variant, double eps) {
  using namespace detail;
  require(T >= 0 && k >= 1 && d >= 1, "T >= 0, k >= 1, d >= 1 required");
  require(I.size() == uz(T * k), "top-k indices must have T*k entries");
  require(H.size() == uz(T * k * d), "H must have T*k*d entries");
  require(variant == "pairwise" || variant == "subspace", "variant must be pairwise or subspace");
  check_mask(mask, T);
  result r;
  r.grad.assign(H.size(), 0.0);
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0) return r;
  const double norm = reduction_sum ? 1.0 : 1.0 / tv;

  for (long long t = 0; t < T; ++t) {
    if (m(mask, t) == 0.0) continue;
    const std::vector<long long> A = valid_slots(I, t, k);
    const std::size_t na = A.size();
    if (na < 2) continue;
    auto off = [&](std::size_t i) { return uz((t * k + A[i]) * d); };

    if (variant == "pairwise") {
      const double scale = beta * norm;
      for (std::size_t j = 0; j < na; ++j) {
        for (std::size_t s = 0; s < na; ++s) {
          if (j == s) continue;
          const double* hj = &H[off(j)];
          const double* hs = &H[off(s)];
          const double a = dot(hj, hs, d);
          const double q = dot(hs, hs, d);
          const double D = q + eps;
          r.value += scale * a * a * q / (D * D);
          for (long long i = 0; i < d; ++i) {
            r.grad[off(j) + uz(i)] += scale * 2.0 * a * q / (D * D) * hs[i];
            r.grad[off(s) + uz(i)] +=
                scale * (2.0 * a * q / (D * D) * hj[i] + 2.0 * a * a * (eps - q) / (D * D * D) * hs[i]);
          }
        }
      }
      continue;
    }

    // subspace
    const double scale = beta * norm / static_cast<double>(k);
    for (std::size_t j = 0; j < na; ++j) {
      std::vector<std::size_t> cols;  // offsets of the columns of X_j
      for (std::size_t s = 0; s < na; ++s)
        if (s != j) cols.push_back(off(s));
      const std::size_t n = cols.size();
      const double* h = &H[off(j)];
      std::vector<double> Amat(n * n, 0.0), xth(n, 0.0);
      for (std::size_t a = 0; a < n; ++a) {
        for (std::size_t b = 0; b < n; ++b) Amat[a * n + b] = dot(&H[cols[a]], &H[cols[b]], d);
        Amat[a * n + a] += eps;
        xth[a] = dot(&H[cols[a]], h, d);
      }
      const std::vector<double> bvec = cholesky_solve(Amat, xth, n);
      std::vector<double> p(uz(d), 0.0);
      for (std::size_t a = 0; a < n; ++a)
        for (long long i = 0; i < d; ++i) p[uz(i)] += H[cols[a] + uz(i)] * bvec[a];
      r.value += scale * dot(p.data(), p.data(), d);

      std::vector<double> xtp(n, 0.0);
      for (std::size_t a = 0; a < n; ++a) xtp[a] = dot(&H[cols[a]], p.data(), d);
      const std::vector<double> cvec = cholesky_solve(Amat, xtp, n);
      std::vector<double> xc(uz(d), 0.0);
      for (std::size_t a = 0; a < n; ++a)
        for (long long i = 0; i < d; ++i) xc[uz(i)] += H[cols[a] + uz(i)] * cvec[a];

      for (long long i = 0; i < d; ++i) r.grad[off(j) + uz(i)] += scale * 2.0 * xc[uz(i)];
      for (std::size_t a = 0; a < n; ++a)
        for (long long i = 0; i < d; ++i)
          r.grad[cols[a] + uz(i)] +=
              scale * (2.0 * (p[uz(i)] - xc[uz(i)]) * bvec[a] + 2.0 * (h[i] - p[uz(i)]) * cvec[a]);
    }
  }
  return r;
}

// ---------------------------------------------------------------------------
// 6. Variance loss (Guo et al., L_v).
//   sbar_e = (1/T_v) sum_t m_t S[t,e]   (always divided by T_v)
//   tokens:  L = -gamma (1/E) (1/T_v or 1) sum_t m_t sum_e (S[t,e] - sbar_e)^2
//            dL/dS[t,e] = -gamma 2 m_t (S[t,e] - sbar_e) / E * (1/T_v or 1)
//            (the sbar term of the derivative vanishes: sum_t m_t (S - sbar) = 0)
//   experts: L = -gamma (1/T_v or 1) sum_t m_t var_unbiased_e(S[t,:])
//            var_unbiased = 1/(E-1) sum_e (S[t,e] - mean_t)^2 ; E = 1 gives 0
//            dL/dS[t,e] = -gamma (1/T_v or 1) m_t 2 (S[t,e] - mean_t) / (E-1)
//   reduction_sum drops the 1/T_v on both axes (LOSSES.md names it for the tokens axis;
//   the reference applies the same option to the experts axis).
// ---------------------------------------------------------------------------
inline result variance(const std::vector<double>& S, const std::vector<int>& mask, long long T, long long E,
                       double gamma, const std::string& axis, bool reduction_sum) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(S.size() == uz(T * E), "S must have T*E entries");
  require(axis == "tokens" || axis == "experts", "axis must be tokens or experts");
  check_mask(mask, T);
  result r;
  r.grad.assign(S.size(), 0.0);
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0) return r;
  const double norm = reduction_sum ? 1.0 : 1.0 / tv;
  const double Ed = static_cast<double>(E);

  if (axis == "tokens") {
    std::vector<double> sbar(uz(E), 0.0);
    for (long long t = 0; t < T; ++t)
      for (long long e = 0; e < E; ++e) sbar[uz(e)] += m(mask, t) * S[uz(t * E + e)] / tv;
    for (long long t = 0; t < T; ++t) {
      for (long long e = 0; e < E; ++e) {
        const double dv = S[uz(t * E + e)] - sbar[uz(e)];
        r.value += -gamma / Ed * norm * m(mask, t) * dv * dv;
        r.grad[uz(t * E + e)] = -gamma * 2.0 * m(mask, t) * dv / Ed * norm;
      }
    }
    return r;
  }

  if (E == 1) return r;
  for (long long t = 0; t < T; ++t) {
    if (m(mask, t) == 0.0) continue;
    double mean = 0.0;
    for (long long e = 0; e < E; ++e) mean += S[uz(t * E + e)] / Ed;
    double var = 0.0;
    for (long long e = 0; e < E; ++e) {
      const double dv = S[uz(t * E + e)] - mean;
      var += dv * dv / (Ed - 1.0);
    }
    r.value += -gamma * norm * var;
    for (long long e = 0; e < E; ++e)
      r.grad[uz(t * E + e)] = -gamma * norm * 2.0 * (S[uz(t * E + e)] - mean) / (Ed - 1.0);
  }
  return r;
}

// ---------------------------------------------------------------------------
// 7. Router entropy.
//   L = eta (1/T_v) sum_t m_t (-sum_e P[t,e] log max(P[t,e], tiny)),  tiny = 1e-30
//   dL/dP[t,e] = eta m_t / T_v * ( -(log P + 1) if P > tiny, else -log(tiny) )
// ---------------------------------------------------------------------------
inline result entropy(const std::vector<double>& P, const std::vector<int>& mask, long long T, long long E,
                      double eta) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(P.size() == uz(T * E), "P must have T*E entries");
  check_mask(mask, T);
  result r;
  r.grad.assign(P.size(), 0.0);
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0) return r;
  for (long long t = 0; t < T; ++t) {
    if (m(mask, t) == 0.0) continue;
    for (long long e = 0; e < E; ++e) {
      const double p = P[uz(t * E + e)];
      r.value += eta / tv * neg_plogp(p);
      r.grad[uz(t * E + e)] = eta / tv * neg_plogp_grad(p);
    }
  }
  return r;
}

// ---------------------------------------------------------------------------
// 7. Importance loss (Shazeer et al. 2017).
//   imp_e = sum_t m_t P[t,e],  mu = mean_e imp,  var = (1/E) sum_e (imp_e - mu)^2
//   L = w var / mu^2   (mu = 0 or T_v = 0: value 0, grad 0)
//   dL/dimp_e = w [ 2 (imp_e - mu) / (E mu^2) - 2 var / (E mu^3) ]
//   dL/dP[t,e] = m_t dL/dimp_e
// ---------------------------------------------------------------------------
inline result importance(const std::vector<double>& P, const std::vector<int>& mask, long long T, long long E,
                         double w) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(P.size() == uz(T * E), "P must have T*E entries");
  check_mask(mask, T);
  result r;
  r.grad.assign(P.size(), 0.0);
  if (valid_tokens(mask, T) == 0.0) return r;
  const double Ed = static_cast<double>(E);
  std::vector<double> imp(uz(E), 0.0);
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < E; ++e) imp[uz(e)] += m(mask, t) * P[uz(t * E + e)];
  double mu = 0.0;
  for (long long e = 0; e < E; ++e) mu += imp[uz(e)] / Ed;
  if (mu == 0.0) return r;
  double var = 0.0;
  for (long long e = 0; e < E; ++e) var += (imp[uz(e)] - mu) * (imp[uz(e)] - mu) / Ed;
  r.value = w * var / (mu * mu);
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < E; ++e)
      r.grad[uz(t * E + e)] =
          m(mask, t) * w * (2.0 * (imp[uz(e)] - mu) / (Ed * mu * mu) - 2.0 * var / (Ed * mu * mu * mu));
  return r;
}

// ---------------------------------------------------------------------------
// 7. Auxiliary-loss-free bias update (DeepSeek-V3).
//   b_e <- b_e + u * sign(mean(c) - c_e)   (sign(0) = 0)
//   center: then subtract mean(b) from every entry.
// ---------------------------------------------------------------------------
inline std::vector<double> bias_update(const std::vector<double>& b, const std::vector<double>& counts, double u,
                                       bool center) {
  detail::require(b.size() == counts.size(), "bias and counts must have the same length");
  std::vector<double> out = b;
  if (b.empty()) return out;
  const double n = static_cast<double>(b.size());
  // Sum first, divide once: integer counts that tie with their mean compare exactly.
  double mc = 0.0;
  for (double c : counts) mc += c;
  mc /= n;
  for (std::size_t e = 0; e < b.size(); ++e) {
    const double diff = mc - counts[e];
    const double sg = diff > 0.0 ? 1.0 : (diff < 0.0 ? -1.0 : 0.0);
    out[e] += u * sg;
  }
  if (center) {
    double mb = 0.0;
    for (double v : out) mb += v / n;
    for (double& v : out) v -= mb;
  }
  return out;
}

// ---------------------------------------------------------------------------
// 7. Chain helpers.
// softmax_backward: P = softmax(Z) row-wise; dZ[t,e] = P[t,e] (dP[t,e] - sum_j P[t,j] dP[t,j])
// ---------------------------------------------------------------------------
inline std::vector<double> softmax_backward(const std::vector<double>& P, const std::vector<double>& dP, long long T,
                                            long long E) {
  using namespace detail;
  require(P.size() == uz(T * E) && dP.size() == uz(T * E), "P and dP must have T*E entries");
  std::vector<double> dZ(P.size(), 0.0);
  for (long long t = 0; t < T; ++t) {
    double rs = 0.0;
    for (long long e = 0; e < E; ++e) rs += P[uz(t * E + e)] * dP[uz(t * E + e)];
    for (long long e = 0; e < E; ++e) dZ[uz(t * E + e)] = P[uz(t * E + e)] * (dP[uz(t * E + e)] - rs);
  }
  return dZ;
}

// sigmoid_norm_backward. Definition implemented: normalisation over ALL E experts of
// the row (not only over the selected top-k):
//   sigma_e = 1 / (1 + exp(-z_e)),  Sigma = sum_{j=1..E} sigma_j,  S_e = sigma_e / Sigma
//   dS_e/dz_j = sigma_j (1 - sigma_j) / Sigma * ([e = j] - S_e)
//   dz_j = sum_e dS_e dS_e/dz_j = S_j (1 - sigma_j) (dS_j - sum_e S_e dS_e)
inline std::vector<double> sigmoid_norm_backward(const std::vector<double>& logits, const std::vector<double>& dS,
                                                 long long T, long long E) {
  using namespace detail;
  require(logits.size() == uz(T * E) && dS.size() == uz(T * E), "logits and dS must have T*E entries");
  std::vector<double> dz(logits.size(), 0.0);
  std::vector<double> sig(uz(E)), S(uz(E));
  for (long long t = 0; t < T; ++t) {
    double total = 0.0;
    for (long long e = 0; e < E; ++e) {
      sig[uz(e)] = 1.0 / (1.0 + std::exp(-logits[uz(t * E + e)]));
      total += sig[uz(e)];
    }
    double rs = 0.0;
    for (long long e = 0; e < E; ++e) {
      S[uz(e)] = sig[uz(e)] / total;
      rs += S[uz(e)] * dS[uz(t * E + e)];
    }
    for (long long e = 0; e < E; ++e) dz[uz(t * E + e)] = S[uz(e)] * (1.0 - sig[uz(e)]) * (dS[uz(t * E + e)] - rs);
  }
  return dz;
}

// ---------------------------------------------------------------------------
// 8. Metrics (no gradient).
// Per layer, over valid tokens and valid slots:
//   tokens_per_expert[e] = count_e = sum_t m_t sum_{s in A_t} [I[t,s] = e]
//   f[e]        = count_e / (k T_v)                       (as in section 1)
//   maxvio      = max_e count_e / mean_e count_e - 1       (0 if mean is 0)
//   cv          = std_e(count) / mean_e(count), POPULATION std (1/E); 0 if mean is 0
//   mean_entropy   = (1/T_v) sum_t m_t (-sum_e P log max(P, 1e-30))
//   mean_topk_mass = (1/T_v) sum_t m_t sum_{s in A_t} P[t, I[t,s]]
//   mean_abs_cos, mean_cos2: cos between co-selected activations of a token,
//     cos = <h_s, h_r> / (max(||h_s||, eps) max(||h_r||, eps)), eps = 1e-8 (section 3
//     default); averaged over ALL (valid token, unordered valid slot pair) pairs of the
//     call pooled together (not a mean of per-token means). 0 when H is null or there
//     is no pair. H layout [T, k, d].
// T_v = 0: every number 0 (vectors of zeros).
// ---------------------------------------------------------------------------
struct layer_metrics {
  std::vector<double> tokens_per_expert, f;
  double maxvio = 0.0, cv = 0.0, mean_entropy = 0.0, mean_topk_mass = 0.0, mean_abs_cos = 0.0, mean_cos2 = 0.0;
};

inline layer_metrics metrics(const std::vector<double>& P, const std::vector<long long>& I,
                             const std::vector<int>& mask, long long T, long long E, long long k,
                             const std::vector<double>* H, long long d) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  require(P.size() == uz(T * E), "P must have T*E entries");
  check_topk(I, T, k, E);
  check_mask(mask, T);
  if (H != nullptr) require(d >= 1 && H->size() == uz(T * k * d), "H must have T*k*d entries");
  layer_metrics out;
  out.tokens_per_expert.assign(uz(E), 0.0);
  out.f.assign(uz(E), 0.0);
  const double tv = valid_tokens(mask, T);
  if (tv == 0.0) return out;
  const double Ed = static_cast<double>(E);

  for (long long t = 0; t < T; ++t) {
    if (m(mask, t) == 0.0) continue;
    for (long long s = 0; s < k; ++s) {
      const long long e = I[uz(t * k + s)];
      if (e < 0) continue;
      out.tokens_per_expert[uz(e)] += 1.0;
      out.mean_topk_mass += P[uz(t * E + e)] / tv;
    }
    for (long long e = 0; e < E; ++e) out.mean_entropy += neg_plogp(P[uz(t * E + e)]) / tv;
  }
  double mean = 0.0, mx = 0.0;
  for (long long e = 0; e < E; ++e) {
    const double c = out.tokens_per_expert[uz(e)];
    out.f[uz(e)] = c / (static_cast<double>(k) * tv);
    mean += c / Ed;
    mx = std::max(mx, c);
  }
  if (mean > 0.0) {
    out.maxvio = mx / mean - 1.0;
    double var = 0.0;
    for (long long e = 0; e < E; ++e) {
      const double dv = out.tokens_per_expert[uz(e)] - mean;
      var += dv * dv / Ed;
    }
    out.cv = std::sqrt(var) / mean;
  }

  if (H != nullptr) {
    const double eps = 1e-8;
    double npairs = 0.0, sabs = 0.0, s2 = 0.0;
    for (long long t = 0; t < T; ++t) {
      if (m(mask, t) == 0.0) continue;
      const std::vector<long long> A = valid_slots(I, t, k);
      for (std::size_t i = 0; i < A.size(); ++i) {
        for (std::size_t j = i + 1; j < A.size(); ++j) {
          const double* hi = &(*H)[uz((t * k + A[i]) * d)];
          const double* hj = &(*H)[uz((t * k + A[j]) * d)];
          const double ni = std::max(std::sqrt(dot(hi, hi, d)), eps);
          const double nj = std::max(std::sqrt(dot(hj, hj, d)), eps);
          const double c = dot(hi, hj, d) / (ni * nj);
          sabs += std::fabs(c);
          s2 += c * c;
          npairs += 1.0;
        }
      }
    }
    if (npairs > 0.0) {
      out.mean_abs_cos = sabs / npairs;
      out.mean_cos2 = s2 / npairs;
    }
  }
  return out;
}

// Per adjacent layer pair (l, l+1), over valid tokens and valid slot pairs:
//   count[e][nu] = sum_t m_t sum_{s in A^l_t} sum_{r in A^{l+1}_t} [I^l[t,s] = e][I^{l+1}[t,r] = nu]
//   joint = count / sum(count)  (E x E row-major; all zeros if there is no pair)
//   mutual_information = sum_{e,nu: joint>0} joint log(joint / (row_e col_nu))   (nats)
//   pathway_concentration = (sum_e sum_{nu in top_{k_next}(count[e,:])} count[e][nu]) / sum(count)
//     top_{k_next}: the k_next most frequent successors of e, ties to the lower index
//     (k_next = width of layer l+1); 0 if there is no pair.
// The struct and the function share the name (as asked); the alias pair_metrics_result
// names the struct where the function hides it.
struct pair_metrics {
  std::vector<double> joint;
  double mutual_information = 0.0;
  double pathway_concentration = 0.0;
};
using pair_metrics_result = pair_metrics;

// The function deliberately hides the struct's name; -Wshadow (g++) would flag that.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wshadow"
#endif
inline pair_metrics_result pair_metrics(const std::vector<long long>& I_l, const std::vector<long long>& I_next,
                                        const std::vector<int>& mask, long long T, long long E, long long k_l,
                                        long long k_next) {
  using namespace detail;
  require(T >= 0 && E >= 1, "T >= 0 and E >= 1 required");
  check_topk(I_l, T, k_l, E);
  check_topk(I_next, T, k_next, E);
  check_mask(mask, T);
  pair_metrics_result out;
  std::vector<double> count(uz(E * E), 0.0);
  double total = 0.0;
  for (long long t = 0; t < T; ++t) {
    if (m(mask, t) == 0.0) continue;
    for (long long s = 0; s < k_l; ++s) {
      const long long e = I_l[uz(t * k_l + s)];
      if (e < 0) continue;
      for (long long r = 0; r < k_next; ++r) {
        const long long nu = I_next[uz(t * k_next + r)];
        if (nu < 0) continue;
        count[uz(e * E + nu)] += 1.0;
        total += 1.0;
      }
    }
  }
  out.joint.assign(uz(E * E), 0.0);
  if (total == 0.0) return out;
  for (std::size_t i = 0; i < count.size(); ++i) out.joint[i] = count[i] / total;

  std::vector<double> row(uz(E), 0.0), col(uz(E), 0.0);
  for (long long e = 0; e < E; ++e)
    for (long long nu = 0; nu < E; ++nu) {
      row[uz(e)] += out.joint[uz(e * E + nu)];
      col[uz(nu)] += out.joint[uz(e * E + nu)];
    }
  for (long long e = 0; e < E; ++e)
    for (long long nu = 0; nu < E; ++nu) {
      const double j = out.joint[uz(e * E + nu)];
      if (j > 0.0) out.mutual_information += j * std::log(j / (row[uz(e)] * col[uz(nu)]));
    }

  double inside = 0.0;
  for (long long e = 0; e < E; ++e)
    for (long long nu : topn_lower_index(&count[uz(e * E)], E, k_next)) inside += count[uz(e * E + nu)];
  out.pathway_concentration = inside / total;
  return out;
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

}  // namespace moereg_ref

#endif  // MOEREG_TESTS_REFERENCE_REFERENCE_HPP
