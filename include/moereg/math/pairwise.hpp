// Per-token k x k math of the Gram-based activation losses (LOSSES.md sections 3 and 5).
//
// Both the intra-layer specialization loss and the orthogonality loss depend on the n valid
// slot vectors h_0 .. h_{n-1} of one token only through their Gram matrix
//
//   G = H^T H,   G[a][b] = <h_a, h_b>   (n x n, n = |A_t| <= max_slots)
//
// A token's loss is F(G). Taking the entries of G as independent variables, D = dF/dG, and
//
//   dF/dh_s = sum_r W[s][r] h_r,   W = D + D^T   (symmetric)
//
// so the gradient of every slot vector is a linear combination of the token's own vectors.
// The functions below return F and fill W; a backend forms G in one pass over the vectors and
// writes the gradient in a second pass over the same (cache-resident) vectors.
//
// Conventions: G and W are row-major n x n with leading dimension n (G with both triangles
// filled). W may be null: then only F is computed. Everything is plain arrays sized by the
// compile-time limit max_slots and a run-time n; no allocation, no exceptions, no Eigen, so a
// CUDA kernel calls the very same functions (MOEREG_HOST_DEVICE).
#pragma once

#include <cmath>

#include "../core/config.hpp"

MOEREG_NAMESPACE_BEGIN
/// The per-token arithmetic of the activation (Gram-based) losses, shared by the CPU loops
/// and the CUDA kernels (MOEREG_HOST_DEVICE): Gram matrices, cos^2 and projection terms and
/// their derivatives for the k slots of one token.
namespace math {

/// The largest number of slots per token (the top-k width) the Gram-based losses accept.
/// Every per-token array is sized by it; the losses reject a wider topk with moereg::error.
inline constexpr int max_slots = 16;

/// Keeps a parameter out of template argument deduction: Real is deduced from G alone, so
/// eps may be a double literal and W may be nullptr.
template <class T>
struct nondeduced {
  using type = T;  ///< T itself
};
/// nondeduced<T>::type.
template <class T>
using nondeduced_t = typename nondeduced<T>::type;

/// Intra-layer specialization (Hu et al., R_sp) of one token:
///
///   n_s = max(||h_s||, eps),  c_sr = G[s][r] / (n_s n_r)
///   F   = w * sum_{s != r} c_sr^2        (ordered pairs; w = 1, or 1 / (n (n - 1)) when pairs_mean)
///
///   W[s][r] = 4 w c_sr / (n_s n_r)                          (s != r)
///   W[s][s] = -4 w (sum_{r != s} c_sr^2) / n_s^2            (0 where ||h_s|| < eps: the norm is the constant eps)
///
/// n < 2 gives F = 0 and W = 0.
template <class Real>
MOEREG_HOST_DEVICE Real specialization_token(int n, const Real* G, nondeduced_t<Real> eps, bool pairs_mean,
                                             nondeduced_t<Real>* W) {
  using std::sqrt;
  if (W)
    for (int i = 0; i < n * n; ++i) W[i] = Real(0);
  if (n < 2) return Real(0);
  Real inv_norm[max_slots];
  bool active[max_slots];
  for (int s = 0; s < n; ++s) {
    const Real q = G[s * n + s];
    const Real nrm = sqrt(q > Real(0) ? q : Real(0));
    active[s] = nrm >= eps;
    inv_norm[s] = Real(1) / (active[s] ? nrm : eps);
  }
  const Real w = pairs_mean ? Real(1) / static_cast<Real>(n * (n - 1)) : Real(1);
  Real rowsum[max_slots];
  for (int s = 0; s < n; ++s) rowsum[s] = Real(0);
  Real total = Real(0);
  for (int s = 0; s < n; ++s)
    for (int r = s + 1; r < n; ++r) {
      const Real inr = inv_norm[s] * inv_norm[r];
      const Real c = G[s * n + r] * inr;
      const Real c2 = c * c;
      total += c2;
      rowsum[s] += c2;
      rowsum[r] += c2;
      if (W) W[s * n + r] = W[r * n + s] = Real(4) * w * c * inr;
    }
  MOEREG_KEEP_STORES(W);  // the symmetric fill above (core/config.hpp)
  if (W)
    for (int s = 0; s < n; ++s)
      W[s * n + s] = active[s] ? Real(-4) * w * rowsum[s] * inv_norm[s] * inv_norm[s] : Real(0);
  return Real(2) * w * total;  // each unordered pair counts twice
}

/// Orthogonality (Guo et al., L_o), pairwise form, of one token:
///
///   phi(q) = q / (q + eps)^2,  phi'(q) = (eps - q) / (q + eps)^3,  q_s = G[s][s]
///   F      = sum_{j != s} G[j][s]^2 phi(q_s)
///
///   W[j][s] = 2 G[j][s] (phi(q_s) + phi(q_j))              (j != s)
///   W[s][s] = 2 phi'(q_s) sum_{j != s} G[j][s]^2
template <class Real>
MOEREG_HOST_DEVICE Real orthogonality_pairwise_token(int n, const Real* G, nondeduced_t<Real> eps,
                                                     nondeduced_t<Real>* W) {
  if (W)
    for (int i = 0; i < n * n; ++i) W[i] = Real(0);
  if (n < 2) return Real(0);
  Real phi[max_slots], dphi[max_slots], colsum[max_slots];
  for (int s = 0; s < n; ++s) {
    const Real q = G[s * n + s];
    const Real den = Real(1) / (q + eps);
    phi[s] = q * den * den;
    dphi[s] = (eps - q) * den * den * den;
    colsum[s] = Real(0);
  }
  Real total = Real(0);
  for (int j = 0; j < n; ++j)
    for (int s = j + 1; s < n; ++s) {
      const Real a = G[j * n + s];
      const Real a2 = a * a;
      total += a2 * (phi[s] + phi[j]);
      colsum[s] += a2;
      colsum[j] += a2;
      if (W) W[j * n + s] = W[s * n + j] = Real(2) * a * (phi[s] + phi[j]);
    }
  MOEREG_KEEP_STORES(W);  // the symmetric fill above (core/config.hpp)
  if (W)
    for (int s = 0; s < n; ++s) W[s * n + s] = Real(2) * dphi[s] * colsum[s];
  return total;
}

namespace subspace_detail {

// The n sub-problems of orthogonality_subspace_token side by side: sub-problem j lives in
// lane j of every array ([row][lane], lanes innermost), so every loop below runs the same
// arithmetic on all lanes at once. The compiler vectorises across lanes, and the dependency
// chains of the small factorisations and solves overlap instead of running one after the
// other. Lanes >= n hold the identity system with a zero right-hand side, so they produce
// zeros and are harmless to include in sums.
constexpr int lanes = max_slots;
constexpr int mm = max_slots - 1;
/// Start of row a of a packed lower triangle.
MOEREG_HOST_DEVICE constexpr int tri(int a) {
  return a * (a + 1) / 2;
}

/// In-place L D L^T factorisation of every lane's packed symmetric m x m matrix: the strict
/// lower triangle receives the unit lower factor L, the diagonal the reciprocal pivots 1 / D.
/// (No square roots, so the lane loops vectorise.) Every pivot is clamped to at least
/// pivot_floor: for A = S + eps I with S a Gram matrix every exact pivot (a Schur
/// complement) is >= the smallest eigenvalue >= eps, so the clamp changes nothing in exact
/// arithmetic and only keeps rounding in a nearly singular S from giving a zero or negative
/// pivot.
template <class Real>
MOEREG_HOST_DEVICE void ldlt_factor_lanes(int m, Real (*A)[lanes], Real pivot_floor) {
  Real piv[mm][lanes];  // D
  Real v[mm][lanes];    // L[c][p] D[p] of the current column c
  for (int c = 0; c < m; ++c) {
    Real dc[lanes];
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) dc[j] = A[tri(c) + c][j];
    for (int p = 0; p < c; ++p) {
      MOEREG_ROLLED
      for (int j = 0; j < lanes; ++j) {
        v[p][j] = A[tri(c) + p][j] * piv[p][j];
        dc[j] -= A[tri(c) + p][j] * v[p][j];
      }
    }
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) {
      piv[c][j] = dc[j] > pivot_floor ? dc[j] : pivot_floor;
      A[tri(c) + c][j] = Real(1) / piv[c][j];
    }
    for (int i = c + 1; i < m; ++i) {
      Real t[lanes];
      MOEREG_ROLLED
      for (int j = 0; j < lanes; ++j) t[j] = A[tri(i) + c][j];
      for (int p = 0; p < c; ++p) {
        MOEREG_ROLLED
        for (int j = 0; j < lanes; ++j) t[j] -= A[tri(i) + p][j] * v[p][j];
      }
      MOEREG_ROLLED
      for (int j = 0; j < lanes; ++j) A[tri(i) + c][j] = t[j] * A[tri(c) + c][j];
    }
  }
}

/// Solves L D L^T x = rhs in every lane with the factor from ldlt_factor_lanes. x may alias rhs.
template <class Real>
MOEREG_HOST_DEVICE void ldlt_solve_lanes(int m, const Real (*L)[lanes], const Real (*rhs)[lanes], Real (*x)[lanes]) {
  Real y[mm][lanes];
  for (int i = 0; i < m; ++i) {
    Real s[lanes];
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) s[j] = rhs[i][j];
    for (int p = 0; p < i; ++p) {
      MOEREG_ROLLED
      for (int j = 0; j < lanes; ++j) s[j] -= L[tri(i) + p][j] * y[p][j];
    }
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) y[i][j] = s[j];
  }
  for (int i = m - 1; i >= 0; --i) {
    Real s[lanes];
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) s[j] = y[i][j] * L[tri(i) + i][j];
    for (int p = i + 1; p < m; ++p) {
      MOEREG_ROLLED
      for (int j = 0; j < lanes; ++j) s[j] -= L[tri(p) + i][j] * x[p][j];
    }
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) x[i][j] = s[j];
  }
}

}  // namespace subspace_detail

/// Orthogonality, subspace form, of one token: each h_j is projected onto the span of the
/// token's other valid vectors X_j (the n - 1 columns s != j), with S_j = X_j^T X_j the
/// sub-Gram (G without row and column j), A_j = S_j + eps I and g_j = X_j^T h_j (column j of
/// G without entry j):
///
///   b_j = A_j^{-1} g_j,   term_j = || X_j b_j ||^2 = b_j^T S_j b_j,   F = sum_j term_j
///
/// The derivative flows through the basis X_j as well as through h_j. With
/// c_j = A_j^{-1} S_j b_j (A_j symmetric):
///
///   d term_j = 2 c_j^T dg_j + sum_{a,l} (b_a b_l - 2 c_a b_l) dS_j[a][l]
///
/// Writing B_j and C_j for b_j and c_j spread back to the n slots (entry j zero):
///
///   W = sum_j 2 (B_j B_j^T - B_j C_j^T - C_j B_j^T + C_j e_j^T + e_j C_j^T)
///
/// Each A_j, of size n - 1, is factored (L D L^T, pivots clamped at eps: see
/// subspace_detail::ldlt_factor_lanes); eps must be positive. S_j b_j is formed as
/// g_j - eps b_j (equal, as A_j b_j = g_j). The n systems are solved side by side, one per
/// lane. n < 2 gives F = 0 and W = 0. The caller applies the 1/k of LOSSES.md.
template <class Real>
MOEREG_HOST_DEVICE Real orthogonality_subspace_token(int n, const Real* G, nondeduced_t<Real> eps,
                                                     nondeduced_t<Real>* W) {
  using namespace subspace_detail;
  if (W)
    for (int i = 0; i < n * n; ++i) W[i] = Real(0);
  if (n < 2) return Real(0);
  const int m = n - 1;
  Real A[tri(mm)][lanes];  // A_j, then its factor
  Real b[mm][lanes], sb[mm][lanes];
  // Lane j's a-th other slot is o_j(a) = a + (a >= j). For l <= a that makes A_j[a][l] one of
  // three entries of G, and g_j[a] = G[o_j(a)][j] one of two rows of G.
  for (int a = 0; a < m; ++a) {
    for (int l = 0; l <= a; ++l) {
      const Real lo = G[(a + 1) * n + l + 1], mid = G[(a + 1) * n + l], hi = G[a * n + l];
      const Real diag = a == l ? Real(eps) : Real(0), dead = a == l ? Real(1) : Real(0);
      MOEREG_ROLLED
      for (int j = 0; j < lanes; ++j) A[tri(a) + l][j] = j >= n ? dead : (j > a ? hi : (j > l ? mid : lo)) + diag;
    }
    const Real* ga = G + a * n;  // rows a and a + 1 of G, read only at j < n
    for (int j = 0; j < n; ++j) b[a][j] = j > a ? ga[j] : ga[n + j];
    for (int j = n; j < lanes; ++j) b[a][j] = Real(0);
  }
  for (int a = 0; a < m; ++a) {
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) sb[a][j] = b[a][j];  // g_j, kept for S_j b_j
  }
  ldlt_factor_lanes(m, A, Real(eps));
  ldlt_solve_lanes(m, A, b, b);
  Real term[lanes];
  for (int j = 0; j < lanes; ++j) term[j] = Real(0);
  for (int a = 0; a < m; ++a) {
    MOEREG_ROLLED
    for (int j = 0; j < lanes; ++j) {
      sb[a][j] -= eps * b[a][j];
      term[j] += b[a][j] * sb[a][j];
    }
  }
  Real total = Real(0);
  for (int j = 0; j < lanes; ++j) total += term[j];
  if (!W) return total;
  Real(*c)[lanes] = sb;  // c_j = A_j^{-1} S_j b_j, in place
  ldlt_solve_lanes(m, A, sb, c);
  // Bt[j][x], Ct[j][x]: b_j and c_j spread back to the slots x (0 at x = j and for x >= n).
  Real Bt[lanes][max_slots], Ct[lanes][max_slots];
  for (int j = 0; j < n; ++j) {
    for (int x = 0; x < j; ++x) Bt[j][x] = b[x][j], Ct[j][x] = c[x][j];
    Bt[j][j] = Ct[j][j] = Real(0);
    for (int x = j + 1; x < n; ++x) Bt[j][x] = b[x - 1][j], Ct[j][x] = c[x - 1][j];
    for (int x = n; x < max_slots; ++x) Bt[j][x] = Ct[j][x] = Real(0);
  }
  // acc[x][.] = sum_j B_j[x] B_j - B_j[x] C_j - C_j[x] B_j, a row at a time (vectorised over
  // the row, the sum over j in order).
  Real acc[max_slots][max_slots];
  for (int x = 0; x < n; ++x) {
    MOEREG_ROLLED
    for (int y = 0; y < max_slots; ++y) acc[x][y] = Real(0);
  }
  for (int j = 0; j < n; ++j)
    for (int x = 0; x < n; ++x) {
      const Real bx = Bt[j][x], cx = Ct[j][x];
      MOEREG_ROLLED
      for (int y = 0; y < max_slots; ++y) acc[x][y] += bx * Bt[j][y] - bx * Ct[j][y] - cx * Bt[j][y];
    }
  for (int x = 0; x < n; ++x)
    for (int y = 0; y <= x; ++y) {  // one triangle, mirrored: W is exactly symmetric
      const Real v = Real(2) * (acc[x][y] + Ct[y][x] + Ct[x][y]);
      W[x * n + y] = v;
      W[y * n + x] = v;
    }
  MOEREG_KEEP_STORES(W);  // the symmetric fill above (core/config.hpp)
  return total;
}

}  // namespace math
MOEREG_NAMESPACE_END
