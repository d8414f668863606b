// Distributed statistics with MPI: every rank holds an uneven shard of one batch, packs the
// local statistics of all its losses into one stats_bundle, sums it across the ranks with a
// single MPI_Allreduce, and finishes each loss on its own rows from its slice. The losses:
// load balancing (micro and global scope) and z-loss of one layer, variance (tokens axis) of
// its top-k scores, and the batch form of the coupling loss over three layers.
//
// Checked against one process: every rank can rebuild the whole batch from the seed, so it
// also runs each loss over the concatenated batch and compares
//   - its own gradient rows with the matching rows of the whole-batch gradient, and
//   - the values: summed over ranks (MPI_Reduce) against the whole-batch value where the loss
//     is a sum of per-row terms, or per rank where the loss is defined per shard (the
//     global-batch balance loss: f over the whole batch, pbar over the shard).
// Everything is float64; the tolerance is 1e-12 relative. Prints the worst relative errors
// and exits nonzero when one exceeds it.
//
//   mpirun -np 3 ./example_distributed_mpi [seed] [tokens]
//
// Adding a loss is one more entry in `terms` below: how it records itself in the bundle,
// how it runs on this rank's rows with the reduced statistics, and what one process gives.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/core/stats.hpp>
#include <moereg/dist/mpi.hpp>
#include <moereg/losses/coupling.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/variance.hpp>
#include <moereg/losses/z_loss.hpp>

namespace {

using moereg::index_t;

// One batch, generated from a seed: for each of `layers` MoE layers the router logits, the
// softmax probabilities, top-k routing with some slots dropped (capacity) and the top-k scores
// (the selected probabilities renormalised, zero elsewhere); about 10% padding tokens.
// Layer 0 feeds load balancing, z-loss and variance; all layers feed the coupling loss.
struct batch {
  index_t T = 0, E = 0, k = 0, layers = 0;
  std::vector<std::vector<double>> Z, P, S;
  std::vector<std::vector<std::int64_t>> topk;
  std::vector<std::uint8_t> mask;
};

batch make_batch(std::uint64_t seed, index_t T, index_t E, index_t k, index_t layers) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.5);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  batch b;
  b.T = T, b.E = E, b.k = k, b.layers = layers;
  const auto TE = static_cast<std::size_t>(T * E);
  b.Z.assign(static_cast<std::size_t>(layers), std::vector<double>(TE));
  b.P = b.S = b.Z;
  b.topk.assign(static_cast<std::size_t>(layers), std::vector<std::int64_t>(static_cast<std::size_t>(T * k)));
  b.mask.resize(static_cast<std::size_t>(T));
  std::vector<index_t> order(static_cast<std::size_t>(E));
  for (index_t t = 0; t < T; ++t) {
    for (std::size_t l = 0; l < static_cast<std::size_t>(layers); ++l) {
      double* z = b.Z[l].data() + t * E;
      double* p = b.P[l].data() + t * E;
      double* sc = b.S[l].data() + t * E;
      std::int64_t* sel = b.topk[l].data() + t * k;
      double mx = -1e300, sum = 0, mass = 0;
      for (index_t e = 0; e < E; ++e) mx = std::max(mx, z[e] = nd(gen));
      for (index_t e = 0; e < E; ++e) sum += (p[e] = std::exp(z[e] - mx));
      for (index_t e = 0; e < E; ++e) p[e] /= sum;
      std::iota(order.begin(), order.end(), index_t(0));
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](index_t a, index_t c) { return p[a] > p[c]; });
      for (index_t j = 0; j < k; ++j) {
        const index_t e = order[static_cast<std::size_t>(j)];
        sel[j] = ud(gen) < 0.1 ? -1 : static_cast<std::int64_t>(e);
        if (sel[j] >= 0) mass += p[e];
      }
      for (index_t j = 0; j < k; ++j)
        if (sel[j] >= 0) sc[sel[j]] = p[sel[j]] / mass;
    }
    b.mask[static_cast<std::size_t>(t)] = ud(gen) < 0.1 ? 0 : 1;
  }
  return b;
}

// Uneven shards: rank r gets a share proportional to r + 1 (the last rank takes the rest).
std::vector<index_t> shard_offsets(index_t T, int ranks) {
  const index_t w = static_cast<index_t>(ranks) * (ranks + 1) / 2;
  std::vector<index_t> cut(static_cast<std::size_t>(ranks) + 1, 0);
  for (int r = 0; r < ranks; ++r)
    cut[static_cast<std::size_t>(r) + 1] = cut[static_cast<std::size_t>(r)] + T * (r + 1) / w;
  cut.back() = T;
  return cut;
}

// Rows [r0, r1) of a [T, E] row-major matrix as a view.
moereg::routing_view<double> rows(const std::vector<double>& m, index_t E, index_t r0, index_t r1) {
  return moereg::routing_view<double>(m.data() + r0 * E, r1 - r0, E);
}
moereg::topk_view topk_rows(const batch& b, std::size_t l, index_t r0, index_t r1) {
  return moereg::topk_view(b.topk[l].data() + r0 * b.k, r1 - r0, b.k);
}
moereg::mask_view mask_rows(const batch& b, index_t r0, index_t r1) {
  return moereg::mask_view(b.mask.data() + r0, r1 - r0);
}

// The coupling loss takes arrays of per-layer views; this keeps them alive with its inputs.
struct coupling_views {
  std::vector<moereg::routing_view<double>> probs;
  std::vector<moereg::topk_view> topk;
  moereg::coupling_inputs<double> in;
  coupling_views(const batch& b, index_t r0, index_t r1) {
    for (std::size_t l = 0; l < static_cast<std::size_t>(b.layers); ++l) {
      probs.push_back(rows(b.P[l], b.E, r0, r1));
      topk.push_back(topk_rows(b, l, r0, r1));
    }
    in = moereg::coupling_inputs<double>{probs.data(), topk.data(), b.layers, mask_rows(b, r0, r1)};
  }
  coupling_views(const coupling_views&) = delete;
  coupling_views& operator=(const coupling_views&) = delete;
};

// max |a - b| / max |b| (0 when both are zero).
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num == 0 ? 0.0 : num / std::max(den, 1e-300);
}
double rel_err(double a, double b) {
  return a == b ? 0.0 : std::abs(a - b) / std::max(std::abs(b), 1e-300);
}

// One loss of the step.
struct term {
  std::string name;
  /// Records the loss on this rank's rows in the bundle.
  std::function<moereg::stats_slice(moereg::stats_bundle&)> record;
  /// This rank's value and gradient rows with the reduced statistics.
  std::function<double(moereg::stats_view, std::vector<double>&)> run;
  /// One process: the expected gradient rows of this rank, and the expected value (of the
  /// whole batch when values_add_up, else of this rank's shard).
  std::function<double(std::vector<double>&)> expect;
  bool values_add_up = true;
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const std::uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 2024;
  const index_t T = argc > 2 ? std::strtoll(argv[2], nullptr, 10) : 1237;
  const index_t E = 16, k = 2, layers = 3;
  const double tol = 1e-12;

  const batch b = make_batch(seed, T, E, k, layers);  // the same on every rank
  const auto cut = shard_offsets(T, ranks);
  const index_t r0 = cut[static_cast<std::size_t>(rank)], r1 = cut[static_cast<std::size_t>(rank) + 1], n = r1 - r0;

  moereg::load_balancing_loss lb_micro{};
  moereg::load_balancing_loss lb_global{};
  lb_global.cfg.scope = moereg::lb_scope::global;
  const moereg::z_loss zl{};
  const moereg::variance_loss var{};  // tokens axis, mean reduction (LOSSES.md defaults)
  moereg::coupling_loss cp{};
  cp.cfg.form = moereg::coupling_form::batch;

  // This rank's inputs (rows [r0, r1)) and the whole batch's, as views.
  const moereg::load_balancing_inputs<double> mine_lb{rows(b.P[0], E, r0, r1), topk_rows(b, 0, r0, r1),
                                                      mask_rows(b, r0, r1)};
  const moereg::load_balancing_inputs<double> whole_lb{rows(b.P[0], E, 0, T), topk_rows(b, 0, 0, T),
                                                       mask_rows(b, 0, T)};
  const moereg::z_loss_inputs<double> mine_z{rows(b.Z[0], E, r0, r1), mask_rows(b, r0, r1)};
  const moereg::z_loss_inputs<double> whole_z{rows(b.Z[0], E, 0, T), mask_rows(b, 0, T)};
  const moereg::variance_inputs<double> mine_var{rows(b.S[0], E, r0, r1), mask_rows(b, r0, r1)};
  const moereg::variance_inputs<double> whole_var{rows(b.S[0], E, 0, T), mask_rows(b, 0, T)};
  const coupling_views mine_cp(b, r0, r1), whole_cp(b, 0, T);

  auto grad_view = [](std::vector<double>& g, index_t rows_, index_t cols) {
    g.assign(static_cast<std::size_t>(rows_ * cols), 0.0);
    return moereg::matrix_view<double>(g.data(), rows_, cols);
  };
  // The whole-batch gradient rows that belong to this rank.
  auto my_rows = [&](const std::vector<double>& g) {
    return std::vector<double>(g.begin() + r0 * E, g.begin() + r1 * E);
  };
  // Losses with one gradient [T, E]: the whole batch's value, and this rank's rows of its
  // gradient, from one call of f(gradient view of the whole batch).
  auto whole_call = [&](std::vector<double>& g, auto&& f) {
    std::vector<double> whole;
    const double v = f(grad_view(whole, T, E));
    g = my_rows(whole);
    return v;
  };
  // The coupling loss has one gradient per layer: kept as [layer][row][E], concatenated.
  auto coupling_call = [&](const moereg::coupling_inputs<double>& in, index_t nrows, moereg::stats_view red,
                           std::vector<double>& g) {
    std::vector<std::vector<double>> gl(static_cast<std::size_t>(layers));
    std::vector<moereg::matrix_view<double>> gv;
    for (auto& x : gl) gv.push_back(grad_view(x, nrows, E));
    const double v = cp.value_and_grad(in, gv.data(), {}, red);
    g.clear();
    for (const auto& x : gl) g.insert(g.end(), x.begin(), x.end());
    return v;
  };

  std::vector<term> terms;
  const std::size_t lb_micro_term = 0, lb_global_term = 1;  // positions used by the identity check below
  terms.push_back(term{"load_balancing (micro)", [&](moereg::stats_bundle& s) { return s.add(lb_micro, mine_lb); },
                       [&](moereg::stats_view red, std::vector<double>& g) {
                         return lb_micro.value_and_grad(mine_lb, grad_view(g, n, E), {}, red);
                       },
                       [&](std::vector<double>& g) {
                         return whole_call(
                             g, [&](moereg::matrix_view<double> gv) { return lb_micro.value_and_grad(whole_lb, gv); });
                       },
                       true});
  terms.push_back(term{
      "load_balancing (global)", [&](moereg::stats_bundle& s) { return s.add(lb_global, mine_lb); },
      [&](moereg::stats_view red, std::vector<double>& g) {
        return lb_global.value_and_grad(mine_lb, grad_view(g, n, E), {}, red);
      },
      [&](std::vector<double>& g) {
        // Without the global scope's own finish step: for a valid token the whole batch's
        // micro-scope gradient is alpha E f_e / T_v with f over the whole batch; the global
        // scope divides by this shard's T_v,r instead. The loss is linear in P, so its value
        // is <P_shard, gradient>.
        whole_call(g, [&](moereg::matrix_view<double> gv) { return lb_micro.value_and_grad(whole_lb, gv); });
        const auto tv_r = static_cast<double>(std::count(b.mask.begin() + r0, b.mask.begin() + r1, std::uint8_t(1)));
        const auto tv = static_cast<double>(std::count(b.mask.begin(), b.mask.end(), std::uint8_t(1)));
        double v = 0;
        for (std::size_t i = 0; i < g.size(); ++i) {
          g[i] = tv_r > 0 ? g[i] * (tv / tv_r) : 0.0;
          v += b.P[0][static_cast<std::size_t>(r0 * E) + i] * g[i];
        }
        return v;
      },
      false});
  terms.push_back(term{"z_loss", [&](moereg::stats_bundle& s) { return s.add(zl, mine_z); },
                       [&](moereg::stats_view red, std::vector<double>& g) {
                         return zl.value_and_grad(mine_z, grad_view(g, n, E), {}, red);
                       },
                       [&](std::vector<double>& g) {
                         return whole_call(
                             g, [&](moereg::matrix_view<double> gv) { return zl.value_and_grad(whole_z, gv); });
                       },
                       true});
  terms.push_back(term{"variance (tokens)", [&](moereg::stats_bundle& s) { return s.add(var, mine_var); },
                       [&](moereg::stats_view red, std::vector<double>& g) {
                         return var.value_and_grad(mine_var, grad_view(g, n, E), {}, red);
                       },
                       [&](std::vector<double>& g) {
                         return whole_call(
                             g, [&](moereg::matrix_view<double> gv) { return var.value_and_grad(whole_var, gv); });
                       },
                       true});
  terms.push_back(
      term{"coupling (batch)", [&](moereg::stats_bundle& s) { return s.add(cp, mine_cp.in); },
           [&](moereg::stats_view red, std::vector<double>& g) { return coupling_call(mine_cp.in, n, red, g); },
           [&](std::vector<double>& g) {
             std::vector<double> whole;
             const double v = coupling_call(whole_cp.in, T, moereg::stats_view{}, whole);
             g.clear();
             for (index_t l = 0; l < layers; ++l)
               g.insert(g.end(), whole.begin() + (l * T + r0) * E, whole.begin() + (l * T + r1) * E);
             return v;
           },
           true});

  // The distributed step: one bundle, one all-reduce, each loss from its slice.
  moereg::stats_bundle bundle;
  std::vector<moereg::stats_slice> slices;
  for (auto& t : terms) slices.push_back(t.record(bundle));
  bundle.compute_local();
  moereg::dist::allreduce(bundle, MPI_COMM_WORLD);

  const int nterms = static_cast<int>(terms.size());
  std::vector<double> values(static_cast<std::size_t>(nterms)), expected(values.size()), grad_err(values.size()),
      shard_value_err(values.size(), 0.0);
  for (int i = 0; i < nterms; ++i) {
    const auto u = static_cast<std::size_t>(i);
    std::vector<double> g, g_ref;
    values[u] = terms[u].run(bundle.view(slices[u]), g);
    expected[u] = terms[u].expect(g_ref);
    grad_err[u] = rel_err(g, g_ref);
    if (!terms[u].values_add_up) shard_value_err[u] = rel_err(values[u], expected[u]);
  }

  // Worst errors over the ranks, and the values summed over the ranks.
  std::vector<double> worst_grad(values.size()), worst_shard(values.size()), value_sum(values.size());
  MPI_Reduce(grad_err.data(), worst_grad.data(), nterms, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  MPI_Reduce(shard_value_err.data(), worst_shard.data(), nterms, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  MPI_Reduce(values.data(), value_sum.data(), nterms, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);

  // Shard sizes and valid tokens, for the report.
  const index_t tv_mine = static_cast<index_t>(std::count(b.mask.begin() + r0, b.mask.begin() + r1, std::uint8_t(1)));
  const index_t tv_all = static_cast<index_t>(std::count(b.mask.begin(), b.mask.end(), std::uint8_t(1)));

  // An identity that ties the two scopes together without the library's finish step:
  // sum_r T_v,r * L_global,r = alpha E sum_e f_e sum_r colsum_r,e = T_v * L_micro(whole batch).
  const double weighted_mine = static_cast<double>(tv_mine) * values[lb_global_term];
  double weighted_sum = 0;
  MPI_Reduce(&weighted_mine, &weighted_sum, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  std::vector<long long> sizes(static_cast<std::size_t>(ranks) * 2);
  const long long mine[2] = {static_cast<long long>(n), static_cast<long long>(tv_mine)};
  MPI_Gather(mine, 2, MPI_LONG_LONG, sizes.data(), 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);

  int fail = 0;
  if (rank == 0) {
    std::printf("moereg distributed statistics: %d ranks, T = %lld tokens, E = %lld, top-%lld, seed %llu\n", ranks,
                static_cast<long long>(T), static_cast<long long>(E), static_cast<long long>(k),
                static_cast<unsigned long long>(seed));
    std::printf("  shards (rows/valid):");
    for (int r = 0; r < ranks; ++r)
      std::printf(" %lld/%lld", sizes[static_cast<std::size_t>(2 * r)], sizes[static_cast<std::size_t>(2 * r + 1)]);
    std::printf("\n  one all-reduce of %lld doubles for %d losses\n", static_cast<long long>(bundle.size()), nterms);
    double worst = 0;
    for (int i = 0; i < nterms; ++i) {
      const auto u = static_cast<std::size_t>(i);
      const double verr = terms[u].values_add_up ? rel_err(value_sum[u], expected[u]) : worst_shard[u];
      worst = std::max({worst, worst_grad[u], verr});
      if (terms[u].values_add_up)
        std::printf("  %-24s sum of values %.17g vs one process %.17g: rel err %.3g; gradient rows: rel err %.3g\n",
                    terms[u].name.c_str(), value_sum[u], expected[u], verr, worst_grad[u]);
      else
        std::printf("  %-24s per-shard values: worst rel err %.3g; gradient rows: rel err %.3g\n",
                    terms[u].name.c_str(), verr, worst_grad[u]);
    }
    const double identity_err = rel_err(weighted_sum, static_cast<double>(tv_all) * expected[lb_micro_term]);
    worst = std::max(worst, identity_err);
    std::printf("  %-24s sum_r T_v,r L_global,r vs T_v L_micro(whole): rel err %.3g\n", "scopes identity",
                identity_err);
    fail = !(worst <= tol);
    std::printf("worst relative error %.3g (tolerance %.0e): %s\n", worst, tol, fail ? "FAIL" : "ok");
  }
  MPI_Bcast(&fail, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return fail;
}
