// Routing and specialization metrics (LOSSES.md section 8). No gradient: these are the
// numbers a trainer logs to see what the losses do.
//
// Per layer (measure_layer), over valid tokens (m_t = 1) and valid slots (I[t,s] >= 0):
//   tokens_per_expert[e] = count_e = sum_t m_t sum_{s in A_t} [I[t,s] = e]
//   f[e]            = count_e / (k T_v)                   (k = configured width, as in section 1)
//   maxvio          = max_e count_e / mean_e count_e - 1  (mean over all E experts; 0 when no slot is routed)
//   cv              = std_e(count) / mean_e(count)        (population std, 1/E; 0 when no slot is routed)
//   mean_entropy    = (1/T_v) sum_t m_t (-sum_e P[t,e] log max(P[t,e], tiny))     tiny = 1e-30
//   mean_topk_mass  = (1/T_v) sum_t m_t sum_{s in A_t} P[t, I[t,s]]
// and, when activations are given (measure_overlap, or measure_layer with activations):
//   cos_{t,s,r}     = <h_{t,s}, h_{t,r}> / (max(||h_{t,s}||, eps) max(||h_{t,r}||, eps))   eps = 1e-8
//   mean_abs_cos, mean_cos2 = the mean of |cos| and cos^2 over every unordered pair {s, r} of
//                     valid slots of every valid token, all pairs of the call pooled (a token
//                     with three valid slots weighs three times a token with two); 0 without pairs.
//
// Per adjacent layer pair (measure_pathways), layer l with E_l experts and k_l slots, layer
// l+1 with E_n experts and k_n slots, over valid tokens and pairs of valid slots:
//   count[e][nu] = sum_t m_t sum_{s in A^l_t} sum_{r in A^{l+1}_t} [I^l[t,s] = e][I^{l+1}[t,r] = nu]
//   joint        = count / sum(count)      (E_l x E_n, row-major; zeros when there is no pair)
//   mutual_information = sum_{e,nu: joint > 0} joint log(joint / (row_e col_nu))   (nats)
//   pathway_concentration = sum_e sum_{nu in top_{k_n}(count[e,:])} count[e][nu] / sum(count):
//                   the share of routed token pairs that fall in the k_n most frequent successors
//                   of their expert (ties to the lower index). k_n, the width of the next layer,
//                   is the number of successors a token has, so a layer l+1 that is a function
//                   of the expert chosen at layer l scores 1; independent uniform routing scores
//                   about k_n / E_n.
// T_v = 0 gives every number 0 and vectors of zeros.
//
// Arithmetic: every metric accumulates in double whatever the storage type (they are
// diagnostics, read once per logging step). Sums run over fixed blocks of
// detail::cpu_block_rows tokens combined in block order, so the results are bitwise the same
// for any thread count. Passes over memory: P, topk and mask once; each activation vector once
// for its norm and once per pair it belongs to (|A_t| - 1 times, from cache).
#pragma once

#include "core/config.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "backend/cpu.hpp"
#include "core/error.hpp"
#include "core/layouts.hpp"
#include "core/types.hpp"
#include "core/views.hpp"
#include "losses/common.hpp"
#include "math/reduce.hpp"

MOEREG_NAMESPACE_BEGIN

/// Options of the routing metrics (LOSSES.md section 8).
struct metrics_config {
  index_t k = 0;        ///< configured top-k width in f_e; 0 = the number of topk columns
  double eps = 1e-8;    ///< norm floor of the cosines (LOSSES.md section 3 default)
  double tiny = 1e-30;  ///< probability floor inside the log of the entropy (section 7)
};

/// Co-selected activation overlap of one layer.
struct overlap_metrics {
  double mean_abs_cos = 0.0;  ///< mean |c_{t,s,r}| over the pairs
  double mean_cos2 = 0.0;     ///< mean c_{t,s,r}^2 over the pairs
  index_t pairs = 0;          ///< unordered valid slot pairs of valid tokens that were averaged
};

/// The section-8 metrics of one layer.
struct layer_metrics {
  index_t valid_tokens = 0;               ///< T_v
  std::vector<double> tokens_per_expert;  ///< count_e, length E
  std::vector<double> f;                  ///< count_e / (k T_v), length E
  double maxvio = 0.0;                    ///< MaxVio = max_e count_e / mean_e count_e - 1 (0 when nothing is routed)
  double cv = 0.0;                        ///< std_e(count) / mean_e(count), population std (0 when nothing is routed)
  double mean_entropy = 0.0;              ///< nats
  double mean_topk_mass = 0.0;            ///< (1/T_v) sum_t m_t sum_{s in A_t} P[t, I[t,s]]
  double mean_abs_cos = 0.0;              ///< 0 when no activations were given
  double mean_cos2 = 0.0;                 ///< 0 when no activations were given
  index_t cos_pairs = 0;                  ///< co-selected pairs behind the two cosine means
};

/// The section-8 metrics of one adjacent layer pair.
struct pathway_metrics {
  /// E_l and E_n, the experts of the two layers.
  ///@{
  index_t experts_from = 0, experts_to = 0;
  ///@}
  std::vector<double> counts;          ///< count[e][nu], E_l x E_n row-major
  std::vector<double> joint;           ///< counts / total
  double total = 0.0;                  ///< number of routed token pairs
  double mutual_information = 0.0;     ///< nats
  double pathway_concentration = 0.0;  ///< share of routed pairs in the k_n most frequent successors of each expert
};

namespace detail {

template <class Acc>
Acc metrics_sum(const std::vector<Acc>& partial) {
  return partial.empty() ? Acc(0) : pairwise_sum(partial.data(), static_cast<index_t>(partial.size()));
}

// Indices of the n largest entries of row[0..cols), ties to the lower index.
inline std::vector<index_t> top_entries(const double* row, index_t cols, index_t n) {
  std::vector<index_t> idx(static_cast<std::size_t>(cols));
  for (index_t i = 0; i < cols; ++i) idx[static_cast<std::size_t>(i)] = i;
  const auto m = static_cast<std::ptrdiff_t>(std::min(n, cols));
  std::partial_sort(idx.begin(), idx.begin() + m, idx.end(),
                    [row](index_t a, index_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
  idx.resize(static_cast<std::size_t>(m));
  return idx;
}

}  // namespace detail

/// Expert overlap: mean |cos| and mean cos^2 between the co-selected activations of each
/// valid token. `acts` may use any layout policy (token_major, expert_grouped,
/// capacity_padded or the caller's own) and any storage type.
template <class A, class Layout>
overlap_metrics measure_overlap(const topk_view& topk, const activation_view<A, Layout>& acts, mask_view mask = {},
                                const metrics_config& cfg = {}, const cpu& be = {}) {
  const char* who = "measure_overlap";
  detail::require(topk.rows >= 0 && topk.k >= 0, who, ": topk has a negative size [", topk.rows, ", ", topk.k, "]");
  detail::require(topk.data != nullptr || topk.rows * topk.k == 0, who, ": topk is null but has size [", topk.rows,
                  ", ", topk.k, "]");
  for (index_t t = 0; t < topk.rows; ++t)
    for (index_t s = 0; s < topk.k; ++s)
      for (index_t r = 0; r < s; ++r)
        detail::require(topk(t, s) < 0 || topk(t, r) != topk(t, s), who, ": topk row ", t, " selects expert ",
                        topk(t, s), " twice (slots ", r, " and ", s, ")");
  detail::check_mask(who, mask, topk.rows);
  detail::check_activations(who, "activations", acts, topk);
  detail::require(cfg.eps > 0.0, who, ": eps = ", cfg.eps, " must be positive");

  const index_t T = topk.rows, k = topk.k, d = acts.layout.dim(), es = acts.layout.stride();
  const index_t nb = detail::num_blocks(T, detail::cpu_block_rows);
  std::vector<double> pabs(static_cast<std::size_t>(nb)), psq(static_cast<std::size_t>(nb));
  std::vector<index_t> pn(static_cast<std::size_t>(nb));
  detail::parallel_blocks(be, T, detail::cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    std::vector<double> norms(static_cast<std::size_t>(k));
    double sabs = 0.0, ssq = 0.0;
    index_t n = 0;
    for (index_t t = r0; t < r1; ++t) {
      if (!mask(t)) continue;
      for (index_t s = 0; s < k; ++s) {
        if (topk(t, s) < 0) continue;
        const A* h = acts.vector(t, s);
        double q = 0.0;
        for (index_t i = 0; i < d; ++i) {
          const double v = static_cast<double>(load(h[i * es]));
          q += v * v;
        }
        norms[static_cast<std::size_t>(s)] = std::max(std::sqrt(q), cfg.eps);
      }
      for (index_t s = 0; s < k; ++s) {
        if (topk(t, s) < 0) continue;
        const A* hs = acts.vector(t, s);
        for (index_t r = s + 1; r < k; ++r) {
          if (topk(t, r) < 0) continue;
          const A* hr = acts.vector(t, r);
          double dot = 0.0;
          for (index_t i = 0; i < d; ++i)
            dot += static_cast<double>(load(hs[i * es])) * static_cast<double>(load(hr[i * es]));
          const double c = dot / (norms[static_cast<std::size_t>(s)] * norms[static_cast<std::size_t>(r)]);
          sabs += std::abs(c);
          ssq += c * c;
          ++n;
        }
      }
    }
    pabs[static_cast<std::size_t>(b)] = sabs;
    psq[static_cast<std::size_t>(b)] = ssq;
    pn[static_cast<std::size_t>(b)] = n;
  });
  overlap_metrics out;
  for (index_t n : pn) out.pairs += n;
  if (out.pairs > 0) {
    out.mean_abs_cos = detail::metrics_sum(pabs) / static_cast<double>(out.pairs);
    out.mean_cos2 = detail::metrics_sum(psq) / static_cast<double>(out.pairs);
  }
  return out;
}

/// Balance, entropy and top-k mass of one layer from its probabilities (softmax, or the
/// normalised scores of a sigmoid router), its selection and its mask.
template <class T>
layer_metrics measure_layer(routing_view<T> probs, const topk_view& topk, mask_view mask = {},
                            const metrics_config& cfg = {}, const cpu& be = {}) {
  const char* who = "measure_layer";
  detail::check_matrix(who, "probs", probs);
  detail::check_topk(who, "topk", topk, probs.rows, probs.cols);
  detail::check_mask(who, mask, probs.rows);
  detail::require(cfg.k >= 0 && cfg.k <= probs.cols, who, ": config k = ", cfg.k, " is outside [0, E = ", probs.cols,
                  "]");

  const index_t rows = probs.rows, E = probs.cols, k = topk.k;
  const index_t nb = detail::num_blocks(rows, detail::cpu_block_rows);
  std::vector<double> pent(static_cast<std::size_t>(nb)), pmass(static_cast<std::size_t>(nb));
  std::vector<index_t> pcnt(static_cast<std::size_t>(nb * E)), ptv(static_cast<std::size_t>(nb));
  detail::parallel_blocks(be, rows, detail::cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    index_t* cnt = pcnt.data() + b * E;
    double ent = 0.0, mass = 0.0;
    index_t tv = 0;
    for (index_t t = r0; t < r1; ++t) {
      if (!mask(t)) continue;
      ++tv;
      double h = 0.0;
      for (index_t e = 0; e < E; ++e) {
        const double p = static_cast<double>(load(probs(t, e)));
        h -= p * std::log(std::max(p, cfg.tiny));
      }
      ent += h;
      double m = 0.0;
      for (index_t s = 0; s < k; ++s) {
        const index_t e = topk(t, s);
        if (e < 0) continue;
        ++cnt[e];
        m += static_cast<double>(load(probs(t, e)));
      }
      mass += m;
    }
    pent[static_cast<std::size_t>(b)] = ent;
    pmass[static_cast<std::size_t>(b)] = mass;
    ptv[static_cast<std::size_t>(b)] = tv;
  });

  layer_metrics out;
  out.tokens_per_expert.assign(static_cast<std::size_t>(E), 0.0);
  out.f.assign(static_cast<std::size_t>(E), 0.0);
  for (index_t b = 0; b < nb; ++b) {
    out.valid_tokens += ptv[static_cast<std::size_t>(b)];
    for (index_t e = 0; e < E; ++e)
      out.tokens_per_expert[static_cast<std::size_t>(e)] +=
          static_cast<double>(pcnt[static_cast<std::size_t>(b * E + e)]);
  }
  if (out.valid_tokens == 0) return out;
  const double tv = static_cast<double>(out.valid_tokens);
  const double kk = static_cast<double>(cfg.k > 0 ? cfg.k : k);
  out.mean_entropy = detail::metrics_sum(pent) / tv;
  out.mean_topk_mass = detail::metrics_sum(pmass) / tv;
  double total = 0.0, mx = 0.0;
  for (index_t e = 0; e < E; ++e) {
    const double c = out.tokens_per_expert[static_cast<std::size_t>(e)];
    out.f[static_cast<std::size_t>(e)] = c / (kk * tv);
    total += c;  // whole numbers: exact in any order
    mx = std::max(mx, c);
  }
  const double mean = E > 0 ? total / static_cast<double>(E) : 0.0;
  if (mean > 0.0) {
    out.maxvio = mx / mean - 1.0;
    double var = 0.0;
    for (index_t e = 0; e < E; ++e) {
      const double dv = out.tokens_per_expert[static_cast<std::size_t>(e)] - mean;
      var += dv * dv;
    }
    out.cv = std::sqrt(var / static_cast<double>(E)) / mean;
  }
  return out;
}

/// measure_layer plus the expert overlap of the layer's co-selected activations. The mask
/// follows topk here as in measure_layer(probs, topk, mask, cfg, be); the activations come after it.
template <class T, class A, class Layout>
layer_metrics measure_layer(routing_view<T> probs, const topk_view& topk, mask_view mask,
                            const activation_view<A, Layout>& acts, const metrics_config& cfg = {},
                            const cpu& be = {}) {
  layer_metrics out = measure_layer(probs, topk, mask, cfg, be);
  const overlap_metrics o = measure_overlap(topk, acts, mask, cfg, be);
  out.mean_abs_cos = o.mean_abs_cos;
  out.mean_cos2 = o.mean_cos2;
  out.cos_pairs = o.pairs;
  return out;
}
/// The earlier argument order of the form above (activations before the mask), kept so that
/// existing calls still compile; the same result.
template <class T, class A, class Layout>
layer_metrics measure_layer(routing_view<T> probs, const topk_view& topk, const activation_view<A, Layout>& acts,
                            mask_view mask = {}, const metrics_config& cfg = {}, const cpu& be = {}) {
  return measure_layer(probs, topk, mask, acts, cfg, be);
}

/// Joint of the experts selected at two adjacent layers over the same tokens, its mutual
/// information and the pathway concentration. `experts_from` / `experts_to` are E of the
/// two layers (they may differ).
inline pathway_metrics measure_pathways(const topk_view& topk_from, index_t experts_from, const topk_view& topk_to,
                                        index_t experts_to, mask_view mask = {}, const cpu& be = {}) {
  const char* who = "measure_pathways";
  detail::require(experts_from >= 1 && experts_to >= 1, who, ": expert counts must be at least 1 (got ", experts_from,
                  " and ", experts_to, ")");
  detail::check_topk(who, "topk_from", topk_from, topk_from.rows, experts_from);
  detail::check_topk(who, "topk_to", topk_to, topk_from.rows, experts_to);
  detail::check_mask(who, mask, topk_from.rows);

  const index_t T = topk_from.rows, E1 = experts_from, E2 = experts_to, W = E1 * E2;
  const index_t nb = detail::num_blocks(T, detail::cpu_block_rows);
  std::vector<index_t> part(static_cast<std::size_t>(nb * W), 0);
  detail::parallel_blocks(be, T, detail::cpu_block_rows, [&](index_t b, index_t r0, index_t r1) {
    index_t* c = part.data() + b * W;
    for (index_t t = r0; t < r1; ++t) {
      if (!mask(t)) continue;
      for (index_t s = 0; s < topk_from.k; ++s) {
        const index_t e = topk_from(t, s);
        if (e < 0) continue;
        for (index_t r = 0; r < topk_to.k; ++r) {
          const index_t nu = topk_to(t, r);
          if (nu >= 0) ++c[e * E2 + nu];
        }
      }
    }
  });

  pathway_metrics out;
  out.experts_from = E1;
  out.experts_to = E2;
  out.counts.assign(static_cast<std::size_t>(W), 0.0);
  out.joint.assign(static_cast<std::size_t>(W), 0.0);
  index_t total = 0;
  for (index_t b = 0; b < nb; ++b)
    for (index_t i = 0; i < W; ++i) {
      const index_t c = part[static_cast<std::size_t>(b * W + i)];
      out.counts[static_cast<std::size_t>(i)] += static_cast<double>(c);
      total += c;
    }
  out.total = static_cast<double>(total);
  if (total == 0) return out;
  std::vector<double> row(static_cast<std::size_t>(E1), 0.0), col(static_cast<std::size_t>(E2), 0.0);
  for (index_t e = 0; e < E1; ++e)
    for (index_t nu = 0; nu < E2; ++nu) {
      const double j = out.counts[static_cast<std::size_t>(e * E2 + nu)] / out.total;
      out.joint[static_cast<std::size_t>(e * E2 + nu)] = j;
      row[static_cast<std::size_t>(e)] += out.counts[static_cast<std::size_t>(e * E2 + nu)];
      col[static_cast<std::size_t>(nu)] += out.counts[static_cast<std::size_t>(e * E2 + nu)];
    }
  double mi = 0.0, inside = 0.0;
  for (index_t e = 0; e < E1; ++e) {
    for (index_t nu = 0; nu < E2; ++nu) {
      const double c = out.counts[static_cast<std::size_t>(e * E2 + nu)];
      // joint / (row col) with the marginals as counts: c * total / (row_count * col_count)
      if (c > 0.0)
        mi += (c / out.total) *
              std::log(c * out.total / (row[static_cast<std::size_t>(e)] * col[static_cast<std::size_t>(nu)]));
    }
    for (index_t nu : detail::top_entries(out.counts.data() + e * E2, E2, topk_to.k))
      inside += out.counts[static_cast<std::size_t>(e * E2 + nu)];
  }
  out.mutual_information = mi;
  out.pathway_concentration = inside / out.total;
  return out;
}

/// measure_pathways for every adjacent pair of a stack of layers with the same E.
inline std::vector<pathway_metrics> measure_pathways(const std::vector<topk_view>& layers, index_t experts,
                                                     mask_view mask = {}, const cpu& be = {}) {
  std::vector<pathway_metrics> out;
  for (std::size_t l = 0; l + 1 < layers.size(); ++l)
    out.push_back(measure_pathways(layers[l], experts, layers[l + 1], experts, mask, be));
  return out;
}

MOEREG_NAMESPACE_END
