// Load balancing, sequence scope (LOSSES.md section 1): every shape of cu_seqlens and of the
// fixed sequence length against the float64 reference, with every gradient buffer
// NaN-filled before an overwrite call and random before an accumulate call
// (support/grad_buffers.hpp), so that a row the loss forgets to write is caught even where
// the right answer is 0.
//
// The shapes: a valid (unmasked) last row, empty sequences at the start, in the middle and
// at the end, a single sequence of length T, one sequence per token, sequences longer than
// a CPU block (256 rows), int32 and int64 offsets, and parts cut at sequence boundaries with
// summed statistics.
#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/load_balancing.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

namespace {

using moereg::index_t;
using namespace moereg_test;

struct seq_problem {
  long long T = 0, E = 0, k = 0;
  std::vector<double> P;
  std::vector<long long> I;
  std::vector<std::uint8_t> m;
};

seq_problem make(std::uint64_t seed, long long T, long long E, long long k, double pad = 0.25) {
  rng r(seed);
  seq_problem p;
  p.T = T, p.E = E, p.k = k;
  p.P = random_probs(r, T, E);
  p.I = random_topk(r, T, E, k, 0.15);
  p.m = random_mask(r, T, pad);
  return p;
}

std::string show(const std::vector<long long>& cu) {
  std::string s = "{";
  for (std::size_t i = 0; i < cu.size(); ++i) s += (i ? ", " : "") + std::to_string(cu[i]);
  return s + "}";
}

/// The library's sequence-scope loss on p with offsets cu (int32 or int64) or, with
/// seq_len > 0, the fixed length; the gradient through checked_grad().
double run_seq(const seq_problem& p, const std::vector<long long>& cu, bool i32, long long seq_len, double coef,
               std::vector<double>& g, moereg::grad_options o = {}, const std::vector<double>* reduced = nullptr,
               long long cfg_k = 0) {
  const std::vector<std::int32_t> cu32 = cast<std::int32_t>(cu);
  const std::vector<std::int64_t> cu64 = cast<std::int64_t>(cu);
  const std::vector<std::int64_t> I64 = cast<std::int64_t>(p.I);
  moereg::load_balancing_loss loss{{coef, moereg::lb_scope::sequence, seq_len, cfg_k}};
  moereg::load_balancing_inputs<double> in{{p.P.data(), p.T, p.E}, {I64.data(), p.T, p.k}, {p.m.data(), p.T}};
  if (seq_len == 0)
    in.cu_seqlens = i32 ? moereg::offsets_view(cu32.data(), static_cast<index_t>(cu.size()))
                        : moereg::offsets_view(cu64.data(), static_cast<index_t>(cu.size()));
  moereg::stats_view st{};
  if (reduced) st = {reduced->data(), static_cast<index_t>(reduced->size())};
  const double v = checked_grad_into(
      g, static_cast<std::size_t>(p.T * p.E),
      [&](double* buf, moereg::grad_options go) {
        return loss.value_and_grad(in, moereg::matrix_view<double>(buf, p.T, p.E), go, st);
      },
      o);
  CHECK(loss.value(in, st) == v);
  return v;
}

void check_against_reference(const seq_problem& p, const std::vector<long long>& cu, double coef) {
  CAPTURE(show(cu), p.T, p.E, p.k);
  const auto ref = moereg_ref::load_balancing_seq(p.P, p.I, to_int_mask(p.m), p.T, p.E, p.k, coef, cu);
  for (bool i32 : {false, true}) {
    CAPTURE(i32);
    std::vector<double> g;
    const double v = run_seq(p, cu, i32, 0, coef, g);
    CHECK(v == Approx(ref.value).epsilon(1e-12).margin(1e-300));
    CHECK(rel_diff(g, ref.grad, 1e-300) < 1e-12);
    // grad_scale and accumulate go through the same rows (checked_grad checks accumulate).
    std::vector<double> gs;
    run_seq(p, cu, i32, 0, coef, gs, {-1.75, false});
    std::vector<double> want(ref.grad);
    for (auto& x : want) x *= -1.75;
    CHECK(rel_diff(gs, want, 1e-300) < 1e-12);
  }
}

}  // namespace

TEST_CASE("lb sequence scope: packed sequences whose last row is a valid token", "[load_balancing][cu_seqlens]") {
  // Uneven lengths; the last row of the batch and the last row of every sequence are valid.
  seq_problem p = make(101, 40, 7, 2);
  const std::vector<long long> cu = {0, 9, 10, 23, 40};
  for (long long b = 1; b < static_cast<long long>(cu.size()); ++b) p.m[static_cast<std::size_t>(cu[b] - 1)] = 1;
  check_against_reference(p, cu, 0.3);
  // And with every token valid (no mask entry can hide a row).
  std::fill(p.m.begin(), p.m.end(), 1);
  check_against_reference(p, cu, 0.3);
}

TEST_CASE("lb sequence scope: empty sequences at the start, in the middle and at the end",
          "[load_balancing][cu_seqlens]") {
  seq_problem p = make(102, 31, 6, 3);
  p.m[30] = 1;
  p.m[0] = 1;
  for (const auto& cu : std::vector<std::vector<long long>>{
           {0, 0, 12, 31}, {0, 12, 12, 12, 31}, {0, 12, 31, 31}, {0, 0, 0, 5, 5, 31, 31, 31}, {0, 31, 31}}) {
    check_against_reference(p, cu, 0.05);
  }
  // An empty sequence counts in B: the loss of {0, 0, 31} is half that of {0, 31}.
  std::vector<double> g1, g2;
  const double v1 = run_seq(p, {0, 31}, false, 0, 1.0, g1);
  const double v2 = run_seq(p, {0, 0, 31}, false, 0, 1.0, g2);
  CHECK(v2 == Approx(v1 / 2).epsilon(1e-13));
  for (std::size_t i = 0; i < g1.size(); ++i) CHECK(g2[i] == Approx(g1[i] / 2).epsilon(1e-13).margin(1e-300));
}

TEST_CASE("lb sequence scope: one sequence of length T is the micro-batch loss", "[load_balancing][cu_seqlens]") {
  for (long long T : {1LL, 2LL, 37LL, 300LL}) {
    seq_problem p = make(static_cast<std::uint64_t>(103 + T), T, 5, 2);
    p.m[static_cast<std::size_t>(T - 1)] = 1;
    const std::vector<long long> cu = {0, T};
    check_against_reference(p, cu, 0.4);
    std::vector<double> gs, gf, gm;
    const double vs = run_seq(p, cu, false, 0, 0.4, gs);
    const double vf = run_seq(p, cu, false, T, 0.4, gf);  // fixed length S = T
    const auto I64 = cast<std::int64_t>(p.I);
    const moereg::load_balancing_loss micro{{0.4}};
    const moereg::load_balancing_inputs<double> in{{p.P.data(), T, p.E}, {I64.data(), T, p.k}, {p.m.data(), T}};
    const double vm = checked_grad_into(gm, static_cast<std::size_t>(T * p.E), [&](double* b, moereg::grad_options o) {
      return micro.value_and_grad(in, moereg::matrix_view<double>(b, T, p.E), o);
    });
    CHECK(vs == Approx(vm).epsilon(1e-13));
    CHECK(vf == Approx(vm).epsilon(1e-13));
    CHECK(rel_diff(gs, gm, 1e-300) < 1e-13);
    CHECK(rel_diff(gf, gm, 1e-300) < 1e-13);
  }
}

TEST_CASE("lb sequence scope: sequences longer than a CPU block and one token per sequence",
          "[load_balancing][cu_seqlens]") {
  seq_problem p = make(104, 700, 9, 3);
  p.m[699] = 1;
  check_against_reference(p, {0, 3, 300, 300, 689, 700}, 0.2);  // 297 and 389 rows: two blocks each
  check_against_reference(p, {0, 700}, 0.2);
  seq_problem q = make(105, 13, 4, 2);
  std::vector<long long> every;
  for (long long t = 0; t <= q.T; ++t) every.push_back(t);
  check_against_reference(q, every, 0.7);
}

TEST_CASE("lb sequence scope: fixed sequence lengths, the last sequence ending in a valid row",
          "[load_balancing][seq_len]") {
  seq_problem p = make(106, 60, 6, 2);
  p.m[59] = 1;
  for (long long S : {1LL, 4LL, 15LL, 60LL}) {
    CAPTURE(S);
    std::vector<long long> cu;
    for (long long b = 0; b * S <= p.T; ++b) cu.push_back(b * S);
    const auto ref = moereg_ref::load_balancing_seq(p.P, p.I, to_int_mask(p.m), p.T, p.E, p.k, 0.3, cu);
    std::vector<double> g;
    const double v = run_seq(p, {}, false, S, 0.3, g);
    CHECK(v == Approx(ref.value).epsilon(1e-12).margin(1e-300));
    CHECK(rel_diff(g, ref.grad, 1e-300) < 1e-12);
    // The same sequences given as offsets give the same bits.
    std::vector<double> go;
    const double vo = run_seq(p, cu, false, 0, 0.3, go);
    CHECK(vo == v);
    CHECK(go == g);
  }
}

TEST_CASE("lb sequence scope: configured k wider than the topk columns", "[load_balancing][cu_seqlens][k]") {
  // cfg.k = 4 with two topk columns equals a four-column topk whose extra slots are dropped.
  seq_problem p = make(107, 25, 6, 2);
  p.m[24] = 1;
  seq_problem wide = p;
  wide.k = 4;
  wide.I.assign(static_cast<std::size_t>(p.T * 4), -1);
  for (long long t = 0; t < p.T; ++t)
    for (long long s = 0; s < 2; ++s)
      wide.I[static_cast<std::size_t>(t * 4 + s)] = p.I[static_cast<std::size_t>(t * 2 + s)];
  const std::vector<long long> cu = {0, 0, 11, 25};
  const auto ref = moereg_ref::load_balancing_seq(wide.P, wide.I, to_int_mask(wide.m), wide.T, wide.E, 4, 0.5, cu);
  std::vector<double> g;
  const double v = run_seq(p, cu, false, 0, 0.5, g, {}, nullptr, 4);
  CHECK(v == Approx(ref.value).epsilon(1e-12));
  CHECK(rel_diff(g, ref.grad, 1e-300) < 1e-12);
  // cfg.k = the number of columns is the default.
  std::vector<double> g2, g0;
  CHECK(run_seq(p, cu, false, 0, 0.5, g2, {}, nullptr, 2) == run_seq(p, cu, false, 0, 0.5, g0));
  CHECK(g2 == g0);
}

TEST_CASE("lb sequence scope: parts cut at sequence boundaries with the summed sequence count",
          "[load_balancing][cu_seqlens][stats]") {
  seq_problem p = make(108, 50, 8, 3);
  p.m[49] = 1;
  p.m[19] = 1;
  const std::vector<long long> cu = {0, 0, 7, 20, 20, 33, 50, 50};
  const auto ref = moereg_ref::load_balancing_seq(p.P, p.I, to_int_mask(p.m), p.T, p.E, p.k, 0.25, cu);
  // Parts: sequences [0, 3) (rows 0..20), [3, 5) (rows 20..33), [5, 7) (rows 33..50).
  const std::vector<std::vector<long long>> part_cu = {{0, 0, 7, 20}, {0, 0, 13}, {0, 17, 17}};
  const long long row0[] = {0, 20, 33};
  double B = 0;
  std::vector<seq_problem> parts;
  for (int i = 0; i < 3; ++i) {
    seq_problem q;
    const long long r0 = row0[i], n = part_cu[static_cast<std::size_t>(i)].back();
    q.T = n, q.E = p.E, q.k = p.k;
    q.P.assign(p.P.begin() + r0 * p.E, p.P.begin() + (r0 + n) * p.E);
    q.I.assign(p.I.begin() + r0 * p.k, p.I.begin() + (r0 + n) * p.k);
    q.m.assign(p.m.begin() + r0, p.m.begin() + r0 + n);
    const auto cu64 = cast<std::int64_t>(part_cu[static_cast<std::size_t>(i)]);
    const auto I64 = cast<std::int64_t>(q.I);
    moereg::load_balancing_inputs<double> in{{q.P.data(), q.T, q.E}, {I64.data(), q.T, q.k}, {q.m.data(), q.T}};
    in.cu_seqlens = moereg::offsets_view(cu64.data(), static_cast<index_t>(cu64.size()));
    const auto s = moereg::load_balancing_loss{{0.25, moereg::lb_scope::sequence}}.local_stats(in);
    REQUIRE(s.size() == 1);
    B += s[0];
    parts.push_back(q);
  }
  CHECK(B == 7.0);
  const std::vector<double> reduced = {B};
  double total = 0;
  for (int i = 0; i < 3; ++i) {
    std::vector<double> g;
    total += run_seq(parts[static_cast<std::size_t>(i)], part_cu[static_cast<std::size_t>(i)], i == 1, 0, 0.25, g, {},
                     &reduced);
    const std::vector<double> rows(ref.grad.begin() + row0[i] * p.E,
                                   ref.grad.begin() + (row0[i] + parts[static_cast<std::size_t>(i)].T) * p.E);
    CHECK(rel_diff(g, rows, 1e-300) < 1e-12);
  }
  CHECK(total == Approx(ref.value).epsilon(1e-12));
}

TEST_CASE("lb sequence scope: no sequences at all (T = 0, cu_seqlens = {0})", "[load_balancing][cu_seqlens]") {
  const std::int64_t cu[1] = {0};
  moereg::load_balancing_inputs<double> in{{static_cast<const double*>(nullptr), 0, 4},
                                           {static_cast<const std::int64_t*>(nullptr), 0, 2}};
  in.cu_seqlens = moereg::offsets_view(cu, 1);
  const moereg::load_balancing_loss loss{{1.0, moereg::lb_scope::sequence}};
  CHECK(loss.value(in) == 0.0);
  CHECK(loss.local_stats(in) == std::vector<double>{0.0});
}
