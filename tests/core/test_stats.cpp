// stats_bundle and stats_accumulator (LOSSES.md section 9): packing several losses'
// statistics into one buffer, summing parts of a batch by a plain loop (what an
// all-reduce does across ranks), and the global-batch schedules of gradient accumulation.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/core/stats.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/z_loss.hpp>
#include <moereg/testing/gradcheck.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

namespace {

using moereg::index_t;

// One batch of routing data, row-major, double storage.
struct batch {
  index_t T = 0, E = 0, k = 0;
  std::vector<double> P, Z;
  std::vector<std::int64_t> I;
  std::vector<std::uint8_t> mask;
};

batch make_batch(std::uint64_t seed, index_t T, index_t E, index_t k) {
  moereg_test::rng r(seed);
  batch b;
  b.T = T, b.E = E, b.k = k;
  b.P = moereg_test::random_probs(r, T, E);
  b.Z = moereg_test::random_normal(r, static_cast<std::size_t>(T * E), 2.0);
  b.I = moereg_test::random_topk<std::int64_t>(r, T, E, k);
  b.mask = moereg_test::random_mask(r, T);
  return b;
}

// Rows [r0, r1) of a batch as loss inputs (views into the batch, no copy).
moereg::load_balancing_inputs<double> lb_rows(const batch& b, index_t r0, index_t r1) {
  return {moereg::routing_view<double>(b.P.data() + r0 * b.E, r1 - r0, b.E),
          moereg::topk_view(b.I.data() + r0 * b.k, r1 - r0, b.k), moereg::mask_view(b.mask.data() + r0, r1 - r0)};
}
moereg::z_loss_inputs<double> z_rows(const batch& b, index_t r0, index_t r1) {
  return {moereg::routing_view<double>(b.Z.data() + r0 * b.E, r1 - r0, b.E),
          moereg::mask_view(b.mask.data() + r0, r1 - r0)};
}

std::vector<double> rows_of(const std::vector<double>& g, index_t r0, index_t r1, index_t E) {
  return std::vector<double>(g.begin() + r0 * E, g.begin() + r1 * E);
}

std::vector<double> slice_values(moereg::stats_view v) {
  return std::vector<double>(v.data, v.data + v.size);
}

}  // namespace

TEST_CASE("stats_bundle packs several losses end to end and unpacks each slice", "[stats]") {
  const batch b = make_batch(11, 37, 6, 2);
  const moereg::load_balancing_loss lb{};
  const moereg::z_loss zl{};
  moereg::load_balancing_loss lb_seq{};
  lb_seq.cfg.scope = moereg::lb_scope::sequence;
  lb_seq.cfg.seq_len = 4;
  const auto in_lb = lb_rows(b, 0, 37);
  const auto in_z = z_rows(b, 0, 37);
  const auto in_seq = lb_rows(b, 5, 25);  // 20 rows = 5 sequences of 4

  // A float copy of the probabilities: the bundle is generic over the storage type too.
  const std::vector<float> Pf = moereg_test::cast<float>(b.P);
  const moereg::load_balancing_inputs<float> in_lbf{moereg::routing_view<float>(Pf.data(), 37, 6),
                                                    moereg::topk_view(b.I.data(), 37, 2),
                                                    moereg::mask_view(b.mask.data(), 37)};

  moereg::stats_bundle bundle;
  const auto h1 = bundle.add(lb, in_lb);
  const auto h2 = bundle.add(zl, in_z, moereg::cpu{1});
  const auto h3 = bundle.add(lb_seq, in_seq);
  const auto h4 = bundle.add_custom(3, [](double* out) {
    out[0] = 1.5;
    out[1] = -2.0;
    out[2] = 4.0;
  });
  const auto h5 = bundle.add(lb, in_lbf);

  CHECK(bundle.entries() == 5);
  CHECK(h1.offset == 0);
  CHECK(h1.size == 7);  // [T_v, count_0..count_5]
  CHECK(h2.offset == 7);
  CHECK(h2.size == 1);
  CHECK(h3.offset == 8);
  CHECK(h3.size == 1);
  CHECK(h4.offset == 9);
  CHECK(h4.size == 3);
  CHECK(h5.offset == 12);
  CHECK(h5.size == 7);
  CHECK(bundle.size() == 19);
  CHECK(bundle.slice(3).offset == h4.offset);

  bundle.compute_local();
  CHECK(slice_values(bundle.view(h1)) == lb.local_stats(in_lb));
  CHECK(slice_values(bundle.view(h2)) == zl.local_stats(in_z));
  CHECK(slice_values(bundle.view(h3)) == std::vector<double>{5.0});
  CHECK(slice_values(bundle.view(h4)) == std::vector<double>{1.5, -2.0, 4.0});
  CHECK(slice_values(bundle.view(h5)) == lb.local_stats(in_lbf));
  CHECK(bundle.view(h2).data == bundle.data() + 7);

  // The local statistics are what they say: T_v and the expert counts, by hand.
  double tv = 0;
  std::vector<double> counts(6, 0.0);
  for (index_t t = 0; t < 37; ++t) {
    if (!b.mask[static_cast<std::size_t>(t)]) continue;
    tv += 1;
    for (index_t s = 0; s < 2; ++s)
      if (b.I[static_cast<std::size_t>(t * 2 + s)] >= 0)
        counts[static_cast<std::size_t>(b.I[static_cast<std::size_t>(t * 2 + s)])] += 1;
  }
  CHECK(bundle.data()[0] == tv);
  CHECK(bundle.data()[7] == tv);
  for (std::size_t e = 0; e < 6; ++e) CHECK(bundle.data()[1 + e] == counts[e]);

  // The same into a caller buffer, and a view of the same slice in it.
  std::vector<double> out(19, -7.0);
  bundle.compute_local(out.data());
  CHECK(out == bundle.values());
  CHECK(bundle.view(h4, out.data()).data == out.data() + 9);

  // Each loss finishes from its slice exactly as from its own statistics.
  std::vector<double> g1(37 * 6), g2(37 * 6);
  const double v1 = moereg_test::checked_matrix_into(g1, lb, in_lb, 37, 6, {}, bundle.view(h1));
  const double v2 = moereg_test::checked_matrix_into(g2, lb, in_lb, 37, 6);
  CHECK(v1 == v2);
  CHECK(g1 == g2);

  // Slices outside the bundle are rejected.
  CHECK_THROWS_AS(bundle.view(moereg::stats_slice{18, 2}), moereg::error);
  CHECK_THROWS_AS(bundle.view(moereg::stats_slice{-1, 1}), moereg::error);
  CHECK_THROWS_AS(bundle.slice(5), moereg::error);
  CHECK_THROWS_AS(bundle.add_custom(-1, [](double*) {}), moereg::error);
  CHECK_THROWS_AS(bundle.add_custom(1, nullptr), moereg::error);

  bundle.clear();
  CHECK(bundle.size() == 0);
  CHECK(bundle.entries() == 0);
  bundle.compute_local();  // empty: nothing to do
}

TEST_CASE("stats_bundle leaves its buffer untouched when a loss rejects its inputs", "[stats]") {
  batch b = make_batch(12, 20, 5, 2);
  const moereg::z_loss zl{};
  const moereg::load_balancing_loss lb{};
  moereg::stats_bundle bundle;
  const auto hz = bundle.add(zl, z_rows(b, 0, 20));
  bundle.add(lb, lb_rows(b, 0, 20));
  bundle.compute_local();
  const std::vector<double> before = bundle.values();
  b.I[7] = 9;  // out of range [0, 5): the views see it, the load-balancing check throws
  CHECK_THROWS_AS(bundle.compute_local(), moereg::error);
  CHECK(bundle.values() == before);
  std::vector<double> out(static_cast<std::size_t>(bundle.size()), -3.0);
  CHECK_THROWS_WITH(bundle.compute_local(out.data()), Catch::Contains("out of range"));
  CHECK(out == std::vector<double>(out.size(), -3.0));
  CHECK(bundle.view(hz).data[0] == before[0]);
}

TEST_CASE("summing the bundles of three uneven parts reproduces the whole batch", "[stats]") {
  // Parts of 1, 44 and 262 rows: a single padded row, and a part longer than one CPU block.
  const index_t E = 7, k = 3;
  batch b = make_batch(21, 307, E, k);
  b.mask[0] = 0;
  const std::vector<index_t> cut{0, 1, 45, 307};
  const moereg::load_balancing_loss lb{{0.03}};
  const moereg::z_loss zl{{0.002}};

  // Whole batch in one call, and the naive reference.
  std::vector<double> g_lb(static_cast<std::size_t>(b.T * E)), g_z(g_lb.size());
  const double v_lb = moereg_test::checked_matrix_into(g_lb, lb, lb_rows(b, 0, b.T), b.T, E);
  const double v_z = moereg_test::checked_matrix_into(g_z, zl, z_rows(b, 0, b.T), b.T, E);
  const auto I_ll = moereg_test::cast<long long>(b.I);
  const auto m_int = moereg_test::to_int_mask(b.mask);
  const auto ref_lb = moereg_ref::load_balancing(b.P, I_ll, m_int, b.T, E, k, 0.03);
  const auto ref_z = moereg_ref::z_loss(b.Z, m_int, b.T, E, 0.002);
  REQUIRE(moereg_test::rel_diff(g_lb, ref_lb.grad) < 1e-13);
  REQUIRE(moereg_test::rel_diff(g_z, ref_z.grad) < 1e-13);

  // Every part packs both losses into one bundle; a plain loop sums the bundles.
  std::vector<moereg::stats_bundle> parts(3);
  std::vector<moereg::stats_slice> h_lb(3), h_z(3);
  for (std::size_t p = 0; p < 3; ++p) {
    h_lb[p] = parts[p].add(lb, lb_rows(b, cut[p], cut[p + 1]));
    h_z[p] = parts[p].add(zl, z_rows(b, cut[p], cut[p + 1]));
    parts[p].compute_local();
  }
  std::vector<double> reduced(static_cast<std::size_t>(parts[0].size()), 0.0);
  for (const auto& part : parts)
    for (std::size_t i = 0; i < reduced.size(); ++i) reduced[i] += part.data()[i];
  for (auto& part : parts) std::copy(reduced.begin(), reduced.end(), part.data());  // what an all-reduce leaves

  double sum_lb = 0, sum_z = 0;
  for (std::size_t p = 0; p < 3; ++p) {
    const index_t r0 = cut[p], r1 = cut[p + 1], n = r1 - r0;
    std::vector<double> gl(static_cast<std::size_t>(n * E), 99.0), gz(gl.size(), 99.0);
    sum_lb += moereg_test::checked_matrix_into(gl, lb, lb_rows(b, r0, r1), n, E, {}, parts[p].view(h_lb[p]));
    sum_z += moereg_test::checked_matrix_into(gz, zl, z_rows(b, r0, r1), n, E, {}, parts[p].view(h_z[p]));
    CHECK(moereg_test::rel_diff(gl, rows_of(g_lb, r0, r1, E)) <= 1e-12);
    CHECK(moereg_test::rel_diff(gz, rows_of(g_z, r0, r1, E)) <= 1e-12);
    CHECK(moereg_test::rel_diff(gl, rows_of(ref_lb.grad, r0, r1, E)) <= 1e-12);
    CHECK(moereg_test::rel_diff(gz, rows_of(ref_z.grad, r0, r1, E)) <= 1e-12);
  }
  CHECK(sum_lb == Approx(v_lb).epsilon(1e-12));
  CHECK(sum_z == Approx(v_z).epsilon(1e-12));
  CHECK(sum_lb == Approx(ref_lb.value).epsilon(1e-12));
  CHECK(sum_z == Approx(ref_z.value).epsilon(1e-12));
  CHECK(v_lb > 0);
  CHECK(v_z > 0);
}

TEST_CASE("stats_accumulator sums one global batch and resets for the next", "[stats]") {
  moereg::stats_accumulator acc(3);
  CHECK(acc.steps() == 3);
  CHECK(acc.size() == 0);
  CHECK(acc.previous().empty());
  acc.add(std::vector<double>{1, 2, 3});
  acc.add(std::vector<double>{10, 20, 30});
  CHECK_FALSE(acc.complete());
  acc.add(std::vector<double>{100, 200, 300});
  CHECK(acc.complete());
  CHECK(acc.count() == 3);
  CHECK(slice_values(acc.view()) == std::vector<double>{111, 222, 333});
  CHECK(slice_values(acc.view(moereg::stats_slice{1, 2})) == std::vector<double>{222, 333});
  CHECK_THROWS_AS(acc.view(moereg::stats_slice{2, 2}), moereg::error);

  // The next add starts the next global batch: the sums restart from it alone.
  acc.add(std::vector<double>{5, 6, 7});
  CHECK(acc.count() == 1);
  CHECK(slice_values(acc.view()) == std::vector<double>{5, 6, 7});
  REQUIRE(acc.has_previous());
  CHECK(slice_values(acc.previous()) == std::vector<double>{111, 222, 333});
  CHECK(slice_values(acc.previous(moereg::stats_slice{0, 1})) == std::vector<double>{111});

  // Within a global batch the size is fixed.
  CHECK_THROWS_AS(acc.add(std::vector<double>{1, 2}), moereg::error);
  CHECK(acc.count() == 1);

  // reset() by hand; the size of the next global batch is free again.
  acc.reset();
  CHECK(acc.count() == 0);
  CHECK(slice_values(acc.view()) == std::vector<double>{0, 0, 0});
  CHECK(slice_values(acc.previous()) == std::vector<double>{5, 6, 7});
  acc.add(std::vector<double>{4, 4});
  CHECK(slice_values(acc.view()) == std::vector<double>{4, 4});
  acc.reset();
  acc.reset();  // an empty global batch does not replace previous()
  CHECK(slice_values(acc.previous()) == std::vector<double>{4, 4});

  // steps = 0: only reset() ends a global batch.
  moereg::stats_accumulator manual;
  for (int i = 0; i < 10; ++i) manual.add(std::vector<double>{1.0});
  CHECK_FALSE(manual.complete());
  CHECK(manual.view().data[0] == 10.0);
  CHECK_THROWS_AS(moereg::stats_accumulator(-1), moereg::error);
  CHECK_THROWS_AS(manual.add(nullptr, 1), moereg::error);
}

namespace {

// Hand computation of the global-batch balance loss of rows [r0, r1): f from the counts and
// T_v of rows `frows` (a list of row ranges), pbar and the gradient's 1/T_v from [r0, r1).
struct hand_result {
  double value = 0;
  std::vector<double> grad;
};
hand_result hand_global(const batch& b, const std::vector<std::pair<index_t, index_t>>& frows, index_t r0, index_t r1,
                        double alpha) {
  const index_t E = b.E, k = b.k;
  std::vector<double> f(static_cast<std::size_t>(E), 0.0), pbar(static_cast<std::size_t>(E), 0.0);
  double tv_all = 0, tv_loc = 0;
  for (const auto& rr : frows)
    for (index_t t = rr.first; t < rr.second; ++t) {
      if (!b.mask[static_cast<std::size_t>(t)]) continue;
      tv_all += 1;
      for (index_t s = 0; s < k; ++s) {
        const auto e = b.I[static_cast<std::size_t>(t * k + s)];
        if (e >= 0) f[static_cast<std::size_t>(e)] += 1;
      }
    }
  for (index_t t = r0; t < r1; ++t) {
    if (!b.mask[static_cast<std::size_t>(t)]) continue;
    tv_loc += 1;
    for (index_t e = 0; e < E; ++e) pbar[static_cast<std::size_t>(e)] += b.P[static_cast<std::size_t>(t * E + e)];
  }
  hand_result h;
  h.grad.assign(static_cast<std::size_t>((r1 - r0) * E), 0.0);
  if (tv_all == 0 || tv_loc == 0) return h;
  for (index_t e = 0; e < E; ++e) {
    const double fe = f[static_cast<std::size_t>(e)] / (static_cast<double>(k) * tv_all);
    h.value += alpha * static_cast<double>(E) * fe * pbar[static_cast<std::size_t>(e)] / tv_loc;
    for (index_t t = r0; t < r1; ++t)
      if (b.mask[static_cast<std::size_t>(t)])
        h.grad[static_cast<std::size_t>((t - r0) * E + e)] = alpha * static_cast<double>(E) * fe / tv_loc;
  }
  return h;
}

}  // namespace

TEST_CASE("global scope: f from the accumulated global batch, pbar local (two phases)", "[stats]") {
  // A global batch of 3 micro-batches on 2 ranks: 6 parts of uneven size. Part 4 is all
  // padding: its value and gradient are zero, and its (zero) counts still add nothing.
  const index_t E = 5, k = 2;
  batch b = make_batch(31, 170, E, k);
  const std::vector<index_t> cut{0, 13, 50, 51, 90, 97, 170};
  for (index_t t = 90; t < 97; ++t) b.mask[static_cast<std::size_t>(t)] = 0;
  moereg::load_balancing_loss lb{};
  lb.cfg.coef = 0.05;
  lb.cfg.scope = moereg::lb_scope::global;
  const moereg::z_loss zl{};

  // Phase one: each micro-batch's local statistics (lb global and z-loss in one bundle) go
  // into the accumulator; the sum over the parts is what an all-reduce over ranks of the
  // per-rank sums over micro-batches gives.
  moereg::stats_accumulator acc(6);
  std::vector<moereg::stats_bundle> bundles(6);
  moereg::stats_slice h_lb, h_z;
  for (std::size_t p = 0; p < 6; ++p) {
    h_lb = bundles[p].add(lb, lb_rows(b, cut[p], cut[p + 1]));
    h_z = bundles[p].add(zl, z_rows(b, cut[p], cut[p + 1]));
    bundles[p].compute_local();
    acc.add(bundles[p]);
  }
  REQUIRE(acc.complete());

  // Phase two: every part's gradient with the accumulated sums.
  std::vector<double> gz_whole(static_cast<std::size_t>(b.T * E));
  const double vz_whole = moereg_test::checked_matrix_into(gz_whole, zl, z_rows(b, 0, b.T), b.T, E);
  double vz_sum = 0;
  for (std::size_t p = 0; p < 6; ++p) {
    const index_t r0 = cut[p], r1 = cut[p + 1], n = r1 - r0;
    std::vector<double> g(static_cast<std::size_t>(n * E), -1.0), gz(g.size());
    const double v = moereg_test::checked_matrix_into(g, lb, lb_rows(b, r0, r1), n, E, {}, acc.view(h_lb));
    const auto hand = hand_global(b, {{0, b.T}}, r0, r1, 0.05);
    INFO("part " << p);
    CHECK(v == Approx(hand.value).epsilon(1e-12));
    CHECK(moereg_test::rel_diff(g, hand.grad, 1e-300) <= 1e-12);
    if (p == 4) {
      CHECK(v == 0.0);
      CHECK(moereg_test::max_abs(g) == 0.0);
    } else {
      CHECK(v > 0.0);
    }
    // z-loss fed accumulated sums normalises by the global batch's T_v.
    vz_sum += moereg_test::checked_matrix_into(gz, zl, z_rows(b, r0, r1), n, E, {}, acc.view(h_z));
    CHECK(moereg_test::rel_diff(gz, rows_of(gz_whole, r0, r1, E)) <= 1e-12);
  }
  CHECK(vz_sum == Approx(vz_whole).epsilon(1e-12));

  // With f fixed (the reduced counts are constants), the gradient is the derivative of the
  // value with respect to this part's probabilities.
  const index_t r0 = cut[1], r1 = cut[2], n = r1 - r0;
  std::vector<double> g(static_cast<std::size_t>(n * E));
  lb.backward(lb_rows(b, r0, r1), moereg::matrix_view<double>(g.data(), n, E), {}, acc.view(h_lb));
  const std::vector<double> x0(b.P.begin() + r0 * E, b.P.begin() + r1 * E);
  const moereg::stats_view red = acc.view(h_lb);
  auto f = [&](const double* x) {
    const moereg::load_balancing_inputs<double> in{moereg::routing_view<double>(x, n, E),
                                                   moereg::topk_view(b.I.data() + r0 * k, n, k),
                                                   moereg::mask_view(b.mask.data() + r0, n)};
    return lb.value(in, red);
  };
  const auto report = moereg::testing::gradcheck(f, x0, g);
  INFO(report.summary());
  CHECK(report.ok);
}

TEST_CASE("global scope: running sums and previous-step sums (one-pass schedules)", "[stats]") {
  const index_t E = 6, k = 2;
  const batch b = make_batch(41, 200, E, k);
  // Two global batches of 3 micro-batches each (one rank).
  const std::vector<index_t> cut{0, 30, 71, 100, 131, 160, 200};
  moereg::load_balancing_loss lb{};
  lb.cfg.scope = moereg::lb_scope::global;

  moereg::stats_accumulator running(3), whole(3);
  for (std::size_t i = 0; i < 6; ++i) {
    const index_t r0 = cut[i], r1 = cut[i + 1], n = r1 - r0;
    const index_t g0 = i < 3 ? 0 : 100;  // first row of this global batch
    const auto in = lb_rows(b, r0, r1);
    moereg::stats_bundle bundle;
    const auto h = bundle.add(lb, in);
    bundle.compute_local();
    // Running: (reduce, then) add, and use at once: micro-batch i sees rows g0..r1.
    running.add(bundle);
    std::vector<double> g(static_cast<std::size_t>(n * E));
    const double v = moereg_test::checked_matrix_into(g, lb, in, n, E, {}, running.view(h));
    const auto hand = hand_global(b, {{g0, r1}}, r0, r1, lb.cfg.coef);
    INFO("micro-batch " << i);
    CHECK(v == Approx(hand.value).epsilon(1e-12));
    CHECK(moereg_test::rel_diff(g, hand.grad) <= 1e-12);

    // Previous step: the second global batch uses the first one's sums, the first one has
    // none (the loss then falls back to its own counts: f and pbar of the micro-batch).
    whole.add(bundle);
    const moereg::stats_view prev = whole.previous(h);
    std::vector<double> gp(static_cast<std::size_t>(n * E));
    const double vp = moereg_test::checked_matrix_into(gp, lb, in, n, E, {}, prev);
    const auto hand_prev =
        i < 3 ? hand_global(b, {{r0, r1}}, r0, r1, lb.cfg.coef) : hand_global(b, {{0, 100}}, r0, r1, lb.cfg.coef);
    CHECK(prev.empty() == (i < 3));
    CHECK(vp == Approx(hand_prev.value).epsilon(1e-12));
    CHECK(moereg_test::rel_diff(gp, hand_prev.grad) <= 1e-12);
  }
  // The last micro-batch of a global batch sees the whole global batch under both schedules.
  CHECK(slice_values(running.view()) == slice_values(whole.view()));
}
