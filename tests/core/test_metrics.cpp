// Metrics (LOSSES.md section 8): hand-computed cases, agreement with the naive reference,
// activation layouts, storage types, determinism, empty batches, bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include <moereg/metrics.hpp>

#include "reference/reference.hpp"
#include "support/random.hpp"

using moereg::index_t;
using namespace moereg_test;

namespace {

const std::int64_t* i64(const std::vector<long long>& v) {
  return reinterpret_cast<const std::int64_t*>(v.data());
}

}  // namespace

TEST_CASE("metrics: a hand-computed layer", "[metrics]") {
  // T = 4, E = 3, k = 2. Token 2 is padding; token 3 has its second slot dropped.
  const double P[12] = {0.5,  0.3,  0.2,   //
                        0.1,  0.6,  0.3,   //
                        0.9,  0.05, 0.05,  // padding
                        0.25, 0.25, 0.5};
  const std::int32_t I[8] = {0, 1, 1, 2, 0, 1, 2, -1};
  const std::uint8_t m[4] = {1, 1, 0, 1};
  // Activations [T, k, d = 2]: token 0 orthogonal pair, token 1 at 45 degrees (cos = 1/sqrt 2).
  const double H[16] = {1, 0, 0, 3,   //
                        2, 0, 1, 1,   //
                        5, 5, 5, 5,   // padding: ignored
                        1, 2, 9, 9};  // dropped second slot: ignored
  const moereg::topk_view tk(I, 4, 2);
  const auto acts = moereg::token_major_view(H, 4, 2, 2);
  const auto r = moereg::measure_layer(moereg::routing_view<double>(P, 4, 3), tk, moereg::mask_view(m, 4), acts);
  // The earlier order (activations before the mask) gives the same result.
  const auto r_old = moereg::measure_layer(moereg::routing_view<double>(P, 4, 3), tk, acts, moereg::mask_view(m, 4));
  CHECK(r_old.mean_cos2 == r.mean_cos2);
  CHECK(r_old.cos_pairs == r.cos_pairs);
  CHECK(r_old.tokens_per_expert == r.tokens_per_expert);

  // counts: expert 0 <- token 0; expert 1 <- tokens 0, 1; expert 2 <- tokens 1, 3. Slots = 5.
  CHECK(r.valid_tokens == 3);
  CHECK(r.tokens_per_expert == std::vector<double>{1, 2, 2});
  CHECK(r.f[0] == Approx(1.0 / 6));
  CHECK(r.f[1] == Approx(2.0 / 6));
  const double mean = 5.0 / 3;
  CHECK(r.maxvio == Approx(2.0 / mean - 1));
  const double var = ((1 - mean) * (1 - mean) + 2 * (2 - mean) * (2 - mean)) / 3;
  CHECK(r.cv == Approx(std::sqrt(var) / mean));
  auto H3 = [](double a, double b, double c) { return -(a * std::log(a) + b * std::log(b) + c * std::log(c)); };
  CHECK(r.mean_entropy == Approx((H3(0.5, 0.3, 0.2) + H3(0.1, 0.6, 0.3) + H3(0.25, 0.25, 0.5)) / 3));
  CHECK(r.mean_topk_mass == Approx((0.8 + 0.9 + 0.5) / 3));
  // Pairs: token 0 (cos 0) and token 1 (cos 1/sqrt 2).
  CHECK(r.cos_pairs == 2);
  CHECK(r.mean_abs_cos == Approx((0 + 1 / std::sqrt(2.0)) / 2));
  CHECK(r.mean_cos2 == Approx((0 + 0.5) / 2));

  // A configured k wider than the topk matrix lowers f (section 1 convention).
  moereg::metrics_config cfg;
  cfg.k = 3;
  CHECK(moereg::measure_layer(moereg::routing_view<double>(P, 4, 3), tk, moereg::mask_view(m, 4), cfg).f[1] ==
        Approx(2.0 / 9));
}

TEST_CASE("metrics: balance over all E experts, including unused ones", "[metrics]") {
  // E = 4, two tokens each choosing experts 0 and 1: counts (2, 2, 0, 0), mean 1.
  const double P[8] = {0.4, 0.4, 0.1, 0.1, 0.4, 0.4, 0.1, 0.1};
  const std::int64_t I[4] = {0, 1, 1, 0};
  const double H[12] = {1, 2, 3, -2, -4, -6,  // anti-parallel: cos = -1
                        0, 0, 0, 1,  1,  1};  // zero vector: norm clamped to eps, cos = 0
  const auto r = moereg::measure_layer(moereg::routing_view<double>(P, 2, 4), moereg::topk_view(I, 2, 2),
                                       moereg::token_major_view(H, 2, 2, 3));
  CHECK(r.maxvio == Approx(1.0));
  CHECK(r.cv == Approx(1.0));  // std of (2, 2, 0, 0) is 1
  CHECK(r.mean_topk_mass == Approx(0.8));
  CHECK(r.mean_abs_cos == Approx(0.5));
  CHECK(r.mean_cos2 == Approx(0.5));

  // Every expert used equally: no violation.
  const std::int64_t J[4] = {0, 1, 2, 3};
  const auto b = moereg::measure_layer(moereg::routing_view<double>(P, 2, 4), moereg::topk_view(J, 2, 2));
  CHECK(b.maxvio == 0.0);
  CHECK(b.cv == 0.0);
  CHECK(b.cos_pairs == 0);
}

TEST_CASE("metrics: pathways of a deterministic and of an independent routing", "[metrics]") {
  // E = 4, k = 1 at both layers. Each expert e at layer l sends every token to (e + 1) % 4.
  const long long T = 40, E = 4;
  std::vector<long long> a(T), b(T);
  for (long long t = 0; t < T; ++t) a[t] = t % E, b[t] = (t + 1) % E;
  const auto det = moereg::measure_pathways(moereg::topk_view(i64(a), T, 1), E, moereg::topk_view(i64(b), T, 1), E);
  CHECK(det.total == Approx(40));
  CHECK(det.pathway_concentration == Approx(1.0));
  CHECK(det.mutual_information == Approx(std::log(4.0)));
  CHECK(det.joint[0 * 4 + 1] == Approx(0.25));
  CHECK(det.joint[0 * 4 + 0] == 0.0);

  // Independent and uniform: every (e, nu) once per 16 tokens. MI = 0; the top-1 successor of
  // each expert holds a quarter of its pairs.
  std::vector<long long> c(64), d(64);
  for (long long t = 0; t < 64; ++t) c[t] = t % 4, d[t] = (t / 4) % 4;
  const auto ind = moereg::measure_pathways(moereg::topk_view(i64(c), 64, 1), E, moereg::topk_view(i64(d), 64, 1), E);
  CHECK(ind.mutual_information == Approx(0.0).margin(1e-15));
  CHECK(ind.pathway_concentration == Approx(0.25));

  // Top-2 at the next layer: token pairs (e, nu) multiply; the 2 most frequent successors.
  // Token 0: {0} -> {1, 2}; token 1: {0} -> {1, 3}; token 2: {1} -> {0, 2} (second slot dropped: {0}).
  const std::int32_t from[3] = {0, 0, 1};
  const std::int32_t to[6] = {1, 2, 1, 3, 0, -1};
  const auto k2 = moereg::measure_pathways(moereg::topk_view(from, 3, 1), 2, moereg::topk_view(to, 3, 2), 4);
  // counts row 0: (0, 2, 1, 1), row 1: (1, 0, 0, 0); total 5; top-2 of row 0: nu = 1 (2) and nu = 2 (1, tie
  // with 3 goes to the lower index).
  CHECK(k2.total == 5.0);
  CHECK(k2.counts == std::vector<double>{0, 2, 1, 1, 1, 0, 0, 0});
  CHECK(k2.pathway_concentration == Approx((2.0 + 1.0 + 1.0) / 5.0));
  double mi = 0;
  const double row[2] = {4.0 / 5, 1.0 / 5}, col[4] = {1.0 / 5, 2.0 / 5, 1.0 / 5, 1.0 / 5};
  for (int e = 0; e < 2; ++e)
    for (int nu = 0; nu < 4; ++nu) {
      const double j = k2.counts[static_cast<std::size_t>(e * 4 + nu)] / 5.0;
      if (j > 0) mi += j * std::log(j / (row[e] * col[nu]));
    }
  CHECK(k2.mutual_information == Approx(mi));
}

TEST_CASE("metrics agree with the naive reference on random routing", "[metrics]") {
  struct shape {
    long long T, E, k, d;
  };
  for (const shape sh :
       {shape{1, 1, 1, 1}, shape{7, 5, 2, 3}, shape{33, 8, 4, 5}, shape{600, 13, 3, 7}, shape{9, 3, 3, 1}}) {
    rng r(static_cast<std::uint64_t>(sh.T * 1009 + sh.E * 17 + sh.k));
    const auto P = random_probs(r, sh.T, sh.E);
    const auto I = random_topk(r, sh.T, sh.E, sh.k, 0.2);
    const auto m = random_mask(r, sh.T, 0.25);
    const auto H = random_normal(r, static_cast<std::size_t>(sh.T * sh.k * sh.d));
    const auto mi = to_int_mask(m);
    const moereg::topk_view tk(i64(I), sh.T, sh.k);
    const moereg::mask_view mv(m.data(), sh.T);

    const auto got = moereg::measure_layer(moereg::routing_view<double>(P.data(), sh.T, sh.E), tk,
                                           moereg::token_major_view(H.data(), sh.T, sh.k, sh.d), mv);
    const auto ref = moereg_ref::metrics(P, I, mi, sh.T, sh.E, sh.k, &H, sh.d);
    CHECK(got.tokens_per_expert == ref.tokens_per_expert);
    CHECK(rel_diff(got.f, ref.f) < 1e-14);
    CHECK(got.maxvio == Approx(ref.maxvio).epsilon(1e-12).margin(1e-14));
    CHECK(got.cv == Approx(ref.cv).epsilon(1e-12).margin(1e-14));
    CHECK(got.mean_entropy == Approx(ref.mean_entropy).epsilon(1e-12).margin(1e-14));
    CHECK(got.mean_topk_mass == Approx(ref.mean_topk_mass).epsilon(1e-12).margin(1e-14));
    CHECK(got.mean_abs_cos == Approx(ref.mean_abs_cos).epsilon(1e-12).margin(1e-14));
    CHECK(got.mean_cos2 == Approx(ref.mean_cos2).epsilon(1e-12).margin(1e-14));

    // The next layer: a fresh selection with its own width, correlated with this one for half
    // the tokens so that the mutual information is not trivially small.
    const long long kn = std::max(1LL, sh.k - 1);
    auto In = random_topk(r, sh.T, sh.E, kn, 0.2);
    for (long long t = 0; t < sh.T; t += 2)
      if (I[t * sh.k] >= 0) {
        const long long want = (I[t * sh.k] * 3 + 1) % sh.E;
        for (long long s = 0; s < kn; ++s)
          if (In[t * kn + s] == want) In[t * kn + s] = In[t * kn];
        In[t * kn] = want;
      }
    const auto pg = moereg::measure_pathways(tk, sh.E, moereg::topk_view(i64(In), sh.T, kn), sh.E, mv);
    const auto pr = moereg_ref::pair_metrics(I, In, mi, sh.T, sh.E, sh.k, kn);
    CHECK(rel_diff(pg.joint, pr.joint) < 1e-14);
    CHECK(pg.mutual_information == Approx(pr.mutual_information).epsilon(1e-11).margin(1e-13));
    CHECK(pg.pathway_concentration == Approx(pr.pathway_concentration).epsilon(1e-13));

    // The stack overload gives the same pair.
    const auto stack = moereg::measure_pathways({tk, moereg::topk_view(i64(In), sh.T, kn)}, sh.E, mv);
    REQUIRE(stack.size() == 1);
    CHECK(stack[0].counts == pg.counts);
  }
}

TEST_CASE("metrics: overlap is the same in every activation layout and close in every storage type", "[metrics]") {
  const long long T = 301, E = 6, k = 3, d = 4;
  rng r(77);
  const auto P = random_probs(r, T, E);
  const auto I = random_topk(r, T, E, k, 0.2);
  const auto m = random_mask(r, T, 0.2);
  const auto H = random_normal(r, static_cast<std::size_t>(T * k * d));
  const moereg::topk_view tk(i64(I), T, k);
  const moereg::mask_view mv(m.data(), T);
  const auto base = moereg::measure_overlap(tk, moereg::token_major_view(H.data(), T, k, d), mv);
  const auto ref = moereg_ref::metrics(P, I, to_int_mask(m), T, E, k, &H, d);
  CHECK(base.mean_abs_cos == Approx(ref.mean_abs_cos).epsilon(1e-12));

  // Strided token-major: slots padded to 6 elements, elements every second one.
  std::vector<double> Hs(static_cast<std::size_t>(T * k * 12), 1e9);
  for (long long t = 0; t < T; ++t)
    for (long long s = 0; s < k; ++s)
      for (long long i = 0; i < d; ++i) Hs[static_cast<std::size_t>((t * k + s) * 12 + 2 * i)] = H[(t * k + s) * d + i];
  const moereg::activation_view<const double, moereg::token_major> strided{Hs.data(),
                                                                           moereg::token_major(T, k, d, k * 12, 12, 2)};
  const auto o1 = moereg::measure_overlap(tk, strided, mv);
  CHECK(o1.mean_abs_cos == base.mean_abs_cos);
  CHECK(o1.mean_cos2 == base.mean_cos2);

  // Expert-grouped rows: rows sorted by expert; dropped slots have no row.
  std::vector<long long> row_of(static_cast<std::size_t>(T * k), -1);
  std::vector<double> G;
  long long rows = 0;
  for (long long e = 0; e < E; ++e)
    for (long long t = 0; t < T; ++t)
      for (long long s = 0; s < k; ++s)
        if (I[t * k + s] == e) {
          row_of[static_cast<std::size_t>(t * k + s)] = rows++;
          for (long long i = 0; i < d; ++i) G.push_back(H[(t * k + s) * d + i]);
        }
  const moereg::activation_view<const double, moereg::expert_grouped> grouped{
      G.data(), moereg::expert_grouped(moereg::topk_view(i64(row_of), T, k), rows, d)};
  const auto o2 = moereg::measure_overlap(tk, grouped, mv);
  CHECK(o2.pairs == base.pairs);
  CHECK(o2.mean_abs_cos == base.mean_abs_cos);

  // Capacity-padded [E, C, d].
  const long long C = T;
  std::vector<long long> pos(static_cast<std::size_t>(T * k), -1), fill(static_cast<std::size_t>(E), 0);
  std::vector<double> Cp(static_cast<std::size_t>(E * C * d), 0.0);
  for (long long t = 0; t < T; ++t)
    for (long long s = 0; s < k; ++s) {
      const long long e = I[t * k + s];
      if (e < 0) continue;
      const long long p = fill[static_cast<std::size_t>(e)]++;
      pos[static_cast<std::size_t>(t * k + s)] = p;
      for (long long i = 0; i < d; ++i) Cp[static_cast<std::size_t>((e * C + p) * d + i)] = H[(t * k + s) * d + i];
    }
  const moereg::activation_view<const double, moereg::capacity_padded> padded{
      Cp.data(), moereg::capacity_padded(tk, moereg::topk_view(i64(pos), T, k), E, C, d)};
  const auto o3 = moereg::measure_overlap(tk, padded, mv);
  CHECK(o3.mean_cos2 == base.mean_cos2);

  // float and bfloat16 storage: the same metric up to the rounding of the stored values.
  const auto Hf = cast<float>(H);
  const auto Hb = cast<moereg::bfloat16>(H);
  const auto of = moereg::measure_overlap(tk, moereg::token_major_view(Hf.data(), T, k, d), mv);
  const auto ob = moereg::measure_overlap(tk, moereg::token_major_view(Hb.data(), T, k, d), mv);
  CHECK(of.mean_abs_cos == Approx(base.mean_abs_cos).epsilon(1e-6));
  CHECK(ob.mean_abs_cos == Approx(base.mean_abs_cos).epsilon(2e-2));
  const auto Pf = cast<float>(P);
  const auto lf = moereg::measure_layer(moereg::routing_view<float>(Pf.data(), T, E), tk, mv);
  CHECK(lf.mean_entropy == Approx(ref.mean_entropy).epsilon(1e-6));
  CHECK(lf.tokens_per_expert == ref.tokens_per_expert);
}

TEST_CASE("metrics are bitwise identical for 1 and 2 threads", "[metrics]") {
  const long long T = 1000, E = 7, k = 2, d = 6;
  rng r(5);
  const auto P = random_probs(r, T, E);
  const auto I = random_topk(r, T, E, k, 0.1);
  const auto I2 = random_topk(r, T, E, k, 0.1);
  const auto m = random_mask(r, T, 0.1);
  const auto H = random_normal(r, static_cast<std::size_t>(T * k * d));
  const moereg::topk_view tk(i64(I), T, k);
  const moereg::mask_view mv(m.data(), T);
  auto run = [&](int threads) {
    return moereg::measure_layer(moereg::routing_view<double>(P.data(), T, E), tk,
                                 moereg::token_major_view(H.data(), T, k, d), mv, {}, moereg::cpu{threads});
  };
  const auto a = run(1), b = run(2);
  CHECK(a.mean_entropy == b.mean_entropy);
  CHECK(a.mean_topk_mass == b.mean_topk_mass);
  CHECK(a.mean_abs_cos == b.mean_abs_cos);
  CHECK(a.mean_cos2 == b.mean_cos2);
  const auto pa = moereg::measure_pathways(tk, E, moereg::topk_view(i64(I2), T, k), E, mv, moereg::cpu{1});
  const auto pb = moereg::measure_pathways(tk, E, moereg::topk_view(i64(I2), T, k), E, mv, moereg::cpu{2});
  CHECK(pa.mutual_information == pb.mutual_information);
  CHECK(pa.counts == pb.counts);
}

TEST_CASE("metrics: a fully padded or empty batch gives zeros", "[metrics]") {
  const double P[6] = {0.2, 0.3, 0.5, 0.1, 0.1, 0.8};
  const std::int32_t I[4] = {2, 1, 2, 0};
  const std::uint8_t none[2] = {0, 0};
  const double H[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  const auto r = moereg::measure_layer(moereg::routing_view<double>(P, 2, 3), moereg::topk_view(I, 2, 2),
                                       moereg::token_major_view(H, 2, 2, 2), moereg::mask_view(none, 2));
  CHECK(r.valid_tokens == 0);
  CHECK(r.tokens_per_expert == std::vector<double>{0, 0, 0});
  CHECK(r.f == std::vector<double>{0, 0, 0});
  CHECK(r.maxvio == 0.0);
  CHECK(r.cv == 0.0);
  CHECK(r.mean_entropy == 0.0);
  CHECK(r.mean_abs_cos == 0.0);
  CHECK(r.cos_pairs == 0);
  const auto p = moereg::measure_pathways(moereg::topk_view(I, 2, 2), 3, moereg::topk_view(I, 2, 2), 3,
                                          moereg::mask_view(none, 2));
  CHECK(p.total == 0.0);
  CHECK(p.mutual_information == 0.0);
  CHECK(p.pathway_concentration == 0.0);
  CHECK(p.joint == std::vector<double>(9, 0.0));
  const auto e = moereg::measure_layer(moereg::routing_view<double>(nullptr, 0, 3), moereg::topk_view(I, 0, 2));
  CHECK(e.valid_tokens == 0);
}

TEST_CASE("metrics reject bad input with a message naming it", "[metrics]") {
  const double P[6] = {0.2, 0.3, 0.5, 0.1, 0.1, 0.8};
  const std::int32_t I[4] = {2, 1, 2, 0};
  const std::int32_t bad[4] = {2, 2, 0, 1};
  const std::int32_t out_of_range[4] = {3, 1, 0, 1};
  const std::uint8_t m[3] = {1, 1, 1};
  const moereg::routing_view<double> pv(P, 2, 3);
  CHECK_THROWS_WITH(moereg::measure_layer(pv, moereg::topk_view(bad, 2, 2)), Catch::Contains("twice"));
  CHECK_THROWS_WITH(moereg::measure_layer(pv, moereg::topk_view(out_of_range, 2, 2)), Catch::Contains("out of range"));
  CHECK_THROWS_WITH(moereg::measure_layer(pv, moereg::topk_view(I, 1, 2)), Catch::Contains("rows"));
  CHECK_THROWS_WITH(moereg::measure_layer(pv, moereg::topk_view(I, 2, 2), moereg::mask_view(m, 3)),
                    Catch::Contains("mask"));
  const double H[8] = {};
  CHECK_THROWS_WITH(moereg::measure_overlap(moereg::topk_view(I, 2, 2), moereg::token_major_view(H, 2, 1, 4)),
                    Catch::Contains("layout"));
  CHECK_THROWS_WITH(moereg::measure_overlap(moereg::topk_view(bad, 2, 2), moereg::token_major_view(H, 2, 2, 2)),
                    Catch::Contains("twice"));
  CHECK_THROWS_WITH(moereg::measure_pathways(moereg::topk_view(I, 2, 2), 3, moereg::topk_view(I, 1, 2), 3),
                    Catch::Contains("topk_to"));
  CHECK_THROWS_WITH(moereg::measure_pathways(moereg::topk_view(I, 2, 2), 3, moereg::topk_view(I, 2, 2), 2),
                    Catch::Contains("out of range"));
  CHECK_THROWS_WITH(moereg::measure_pathways(moereg::topk_view(I, 2, 2), 0, moereg::topk_view(I, 2, 2), 3),
                    Catch::Contains("at least 1"));
}
