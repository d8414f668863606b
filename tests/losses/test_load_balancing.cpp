// Load balancing (LOSSES.md section 1): reference agreement, finite differences, scopes,
// statistics split, storage types, determinism, bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/testing/gradcheck.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

using moereg::index_t;
using namespace moereg_test;

namespace {

struct lb_case {
  long long T, E, k;
  std::vector<double> P;
  std::vector<long long> I;
  std::vector<std::uint8_t> m;
  lb_case(std::uint64_t seed, long long T_, long long E_, long long k_, double drop = 0.2, double pad = 0.2)
      : T(T_), E(E_), k(k_) {
    rng r(seed);
    P = random_probs(r, T, E);
    I = random_topk(r, T, E, k, drop);
    m = random_mask(r, T, pad);
  }
  moereg::load_balancing_inputs<double> inputs(const double* p = nullptr) const {
    return {moereg::routing_view<double>(p ? p : P.data(), T, E),
            moereg::topk_view(reinterpret_cast<const std::int64_t*>(I.data()), T, k), moereg::mask_view(m.data(), T)};
  }
};

double run(const moereg::load_balancing_loss& loss, const moereg::load_balancing_inputs<double>& in,
           std::vector<double>& g, moereg::stats_view st = {}, moereg::cpu be = {}) {
  // NaN-filled before the overwrite call, random before an accumulate call (support/grad_buffers.hpp).
  return checked_grad_into(
      g, static_cast<std::size_t>(in.probs.rows * in.probs.cols), [&](double* b, moereg::grad_options o) {
        return loss.value_and_grad(in, moereg::matrix_view<double>(b, in.probs.rows, in.probs.cols), o, st, be);
      });
}

}  // namespace

TEST_CASE("load balancing agrees with the naive reference and finite differences", "[load_balancing]") {
  for (auto [T, E, k] :
       {std::tuple<long long, long long, long long>{1, 1, 1}, {7, 5, 2}, {33, 8, 8}, {300, 13, 3}, {2, 3, 1}}) {
    lb_case c(static_cast<std::uint64_t>(T * 131 + E), T, E, k);
    const moereg::load_balancing_loss loss{{0.7}};
    std::vector<double> g;
    const double v = run(loss, c.inputs(), g);
    const auto ref = moereg_ref::load_balancing(c.P, c.I, to_int_mask(c.m), T, E, k, 0.7);
    CHECK(v == Approx(ref.value).epsilon(1e-12).margin(1e-300));
    CHECK(rel_diff(g, ref.grad, 1e-300) < 1e-12);
    if (T * E <= 400) {
      auto f = [&](const double* p) { return loss.value(c.inputs(p)); };
      const auto rep = moereg::testing::gradcheck(f, c.P, g);
      INFO(rep.summary());
      CHECK(rep.ok);
    }
  }
}

TEST_CASE("load balancing: dropped slots lower f_e and config k overrides the width", "[load_balancing]") {
  // One token, E = 4, top-2 with the second slot dropped: f = (1/2, 0, 0, 0).
  const double P[4] = {0.4, 0.3, 0.2, 0.1};
  const std::int32_t I[2] = {0, -1};
  const moereg::load_balancing_inputs<double> in{{P, 1, 4}, {I, 1, 2}};
  CHECK(moereg::load_balancing_loss{{1.0}}.value(in) == Approx(4 * 0.5 * 0.4));
  moereg::load_balancing_loss wide{{1.0}};
  wide.cfg.k = 4;  // f = (1/4, 0, 0, 0)
  CHECK(wide.value(in) == Approx(4 * 0.25 * 0.4));
}

TEST_CASE("load balancing: sequence scope with a fixed length and with packed offsets", "[load_balancing]") {
  lb_case c(11, 24, 6, 2);
  c.m[9] = c.m[10] = c.m[11] = 0;  // hold a fully padded sequence when S = 3 (rows 9..11)
  moereg::load_balancing_loss loss{{0.3, moereg::lb_scope::sequence, 3}};
  std::vector<double> g;
  double v = run(loss, c.inputs(), g);
  std::vector<long long> cu;
  for (long long b = 0; b <= 8; ++b) cu.push_back(3 * b);
  auto ref = moereg_ref::load_balancing_seq(c.P, c.I, to_int_mask(c.m), c.T, c.E, c.k, 0.3, cu);
  CHECK(v == Approx(ref.value).epsilon(1e-12));
  CHECK(rel_diff(g, ref.grad) < 1e-12);

  // Packed sequences of uneven lengths, one of them empty, int32 offsets.
  const std::vector<std::int32_t> cu32 = {0, 5, 5, 12, 13, 24};
  loss.cfg.seq_len = 0;
  auto in = c.inputs();
  in.cu_seqlens = moereg::offsets_view(cu32.data(), 6);
  v = run(loss, in, g);
  ref = moereg_ref::load_balancing_seq(c.P, c.I, to_int_mask(c.m), c.T, c.E, c.k, 0.3, cast<long long>(cu32));
  CHECK(v == Approx(ref.value).epsilon(1e-12));
  CHECK(rel_diff(g, ref.grad) < 1e-12);

  auto f = [&](const double* p) {
    auto x = c.inputs(p);
    x.cu_seqlens = in.cu_seqlens;
    return loss.value(x);
  };
  const auto rep = moereg::testing::gradcheck(f, c.P, g);
  INFO(rep.summary());
  CHECK(rep.ok);
}

TEST_CASE("load balancing: statistics of uneven parts reproduce the whole batch (micro scope)",
          "[load_balancing][stats]") {
  lb_case c(5, 101, 9, 3);
  const moereg::load_balancing_loss loss{{0.05}};
  std::vector<double> g_all;
  const double v_all = run(loss, c.inputs(), g_all);
  const long long cuts[4] = {0, 17, 80, 101};
  std::vector<double> total(static_cast<std::size_t>(1 + c.E), 0.0);
  for (int p = 0; p < 3; ++p) {
    auto in = c.inputs();
    const long long r0 = cuts[p], n = cuts[p + 1] - cuts[p];
    in.probs = moereg::routing_view<double>(c.P.data() + r0 * c.E, n, c.E);
    in.topk = moereg::topk_view(reinterpret_cast<const std::int64_t*>(c.I.data()) + r0 * c.k, n, c.k);
    in.mask = moereg::mask_view(c.m.data() + r0, n);
    const auto s = loss.local_stats(in);
    REQUIRE(static_cast<index_t>(s.size()) == loss.stats_size(in));
    for (std::size_t i = 0; i < s.size(); ++i) total[i] += s[i];
  }
  double v_sum = 0;
  for (int p = 0; p < 3; ++p) {
    auto in = c.inputs();
    const long long r0 = cuts[p], n = cuts[p + 1] - cuts[p];
    in.probs = moereg::routing_view<double>(c.P.data() + r0 * c.E, n, c.E);
    in.topk = moereg::topk_view(reinterpret_cast<const std::int64_t*>(c.I.data()) + r0 * c.k, n, c.k);
    in.mask = moereg::mask_view(c.m.data() + r0, n);
    std::vector<double> g;
    v_sum += run(loss, in, g, {total.data(), static_cast<index_t>(total.size())});
    const std::vector<double> rows(g_all.begin() + r0 * c.E, g_all.begin() + (r0 + n) * c.E);
    CHECK(rel_diff(g, rows) < 1e-14);
  }
  CHECK(v_sum == Approx(v_all).epsilon(1e-13));
}

TEST_CASE("load balancing: global scope takes f from reduced counts and keeps pbar local", "[load_balancing][stats]") {
  lb_case a(21, 40, 6, 2), b(22, 25, 6, 2);
  moereg::load_balancing_loss loss{{1.0, moereg::lb_scope::global}};
  auto sa = loss.local_stats(a.inputs()), sb = loss.local_stats(b.inputs());
  std::vector<double> tot(sa.size());
  for (std::size_t i = 0; i < tot.size(); ++i) tot[i] = sa[i] + sb[i];
  std::vector<double> g;
  const double v = run(loss, a.inputs(), g, {tot.data(), static_cast<index_t>(tot.size())});
  // By hand: f_e = total count_e / (k * total T_v); pbar_e = local column mean over valid tokens.
  double tv_local = 0;
  std::vector<double> pbar(6, 0.0);
  for (long long t = 0; t < a.T; ++t)
    if (a.m[t]) {
      tv_local += 1;
      for (int e = 0; e < 6; ++e) pbar[e] += a.P[t * 6 + e];
    }
  double expect = 0;
  for (int e = 0; e < 6; ++e) expect += 6 * (tot[1 + e] / (2 * tot[0])) * pbar[e] / tv_local;
  CHECK(v == Approx(expect).epsilon(1e-12));
  for (long long t = 0; t < a.T; ++t)
    for (int e = 0; e < 6; ++e)
      CHECK(g[t * 6 + e] == Approx(a.m[t] ? 6 * (tot[1 + e] / (2 * tot[0])) / tv_local : 0.0).epsilon(1e-12));
  // Without reduced statistics the global scope is the micro-batch loss.
  std::vector<double> g2;
  CHECK(run(loss, a.inputs(), g2) == Approx(moereg::load_balancing_loss{{1.0}}.value(a.inputs())).epsilon(1e-14));
}

TEST_CASE("load balancing: grad_scale, accumulate and padding rows", "[load_balancing]") {
  lb_case c(8, 12, 5, 2);
  const moereg::load_balancing_loss loss{};
  std::vector<double> g0;
  run(loss, c.inputs(), g0);
  std::vector<double> g(g0.size(), 0.25);
  loss.backward(c.inputs(), moereg::matrix_view<double>(g.data(), c.T, c.E), {-3.0, true});
  for (std::size_t i = 0; i < g.size(); ++i) CHECK(g[i] == Approx(0.25 - 3.0 * g0[i]).epsilon(1e-14));
  for (long long t = 0; t < c.T; ++t)
    if (!c.m[t])
      for (int e = 0; e < 5; ++e) CHECK(g0[t * 5 + e] == 0.0);
}

TEST_CASE("load balancing: empty and fully padded batches give 0 and a zero gradient", "[load_balancing]") {
  const moereg::load_balancing_loss loss{};
  const moereg::load_balancing_inputs<float> empty{{static_cast<const float*>(nullptr), 0, 4},
                                                   {static_cast<const std::int32_t*>(nullptr), 0, 2}};
  CHECK(loss.value(empty) == 0.0);
  lb_case c(3, 6, 4, 2);
  std::fill(c.m.begin(), c.m.end(), 0);
  std::vector<double> g;
  CHECK(run(loss, c.inputs(), g) == 0.0);
  for (double x : g) CHECK(x == 0.0);
  for (auto x : loss.local_stats(c.inputs())) CHECK(x == 0.0);
}

TEMPLATE_TEST_CASE("load balancing in 16- and 32-bit storage matches the double result", "[load_balancing][types]",
                   float, moereg::half, moereg::bfloat16) {
  lb_case c(31, 77, 16, 4);
  const moereg::load_balancing_loss loss{{1.0}};
  std::vector<double> gd;
  const double vd = run(loss, c.inputs(), gd);
  std::vector<TestType> P(c.P.size());
  for (std::size_t i = 0; i < P.size(); ++i) P[i] = static_cast<TestType>(static_cast<float>(c.P[i]));
  std::vector<std::int32_t> I32(c.I.begin(), c.I.end());
  std::vector<std::int32_t> mi(c.m.begin(), c.m.end());
  const moereg::load_balancing_inputs<TestType> in{{P.data(), c.T, c.E}, {I32.data(), c.T, c.k}, {mi.data(), c.T}};
  const auto res = checked_grad<TestType>(P.size(), [&](TestType* b, moereg::grad_options o) {
    return loss.value_and_grad(in, moereg::matrix_view<TestType>(b, c.T, c.E), o);
  });
  const double v = res.value;
  const auto& g = res.grad;
  const double tol = std::is_same_v<TestType, float> ? 1e-6 : std::is_same_v<TestType, moereg::half> ? 2e-3 : 1.6e-2;
  CHECK(v == Approx(vd).epsilon(tol));
  std::vector<double> gf(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) gf[i] = static_cast<double>(static_cast<float>(g[i]));
  CHECK(rel_diff(gf, gd) < tol);
}

TEST_CASE("load balancing is bitwise identical for 1 and 2 threads and across runs", "[load_balancing][determinism]") {
  lb_case c(41, 3003, 64, 6);
  std::vector<float> P(c.P.begin(), c.P.end());
  for (auto scope : {moereg::lb_scope::micro, moereg::lb_scope::sequence}) {
    const moereg::load_balancing_loss loss{{1e-2, scope, scope == moereg::lb_scope::sequence ? 1001 : 0}};
    const moereg::load_balancing_inputs<float> in{{P.data(), c.T, c.E}, c.inputs().topk, c.inputs().mask};
    auto with_threads = [&](int n) {
      return checked_grad<float>(P.size(), [&](float* b, moereg::grad_options o) {
        return loss.value_and_grad(in, moereg::matrix_view<float>(b, c.T, c.E), o, {}, moereg::cpu{n});
      });
    };
    const auto r1 = with_threads(1), r2 = with_threads(2), r3 = with_threads(2);
    const double v1 = r1.value, v2 = r2.value, v3 = r3.value;
    const auto &g1 = r1.grad, &g2 = r2.grad, &g3 = r3.grad;
    CHECK(std::memcmp(&v1, &v2, sizeof v1) == 0);
    CHECK(std::memcmp(&v2, &v3, sizeof v1) == 0);
    CHECK(std::memcmp(g1.data(), g2.data(), g1.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(g2.data(), g3.data(), g1.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("load balancing accepts column-major Eigen matrices and strided rows without a copy",
          "[load_balancing][views]") {
  lb_case c(51, 20, 7, 3);
  Eigen::MatrixXd Pc(c.T, c.E);  // column-major
  for (long long t = 0; t < c.T; ++t)
    for (long long e = 0; e < c.E; ++e) Pc(t, e) = c.P[t * c.E + e];
  Eigen::MatrixXd Gc = Eigen::MatrixXd::Constant(c.T, c.E, std::numeric_limits<double>::quiet_NaN());
  auto in = c.inputs();
  in.probs = moereg::view(Pc);
  const moereg::load_balancing_loss loss{{1.0}};
  const double v = loss.value_and_grad(in, moereg::view(Gc));
  std::vector<double> g;
  CHECK(v == Approx(run(loss, c.inputs(), g)).epsilon(1e-14));
  for (long long t = 0; t < c.T; ++t)
    for (long long e = 0; e < c.E; ++e) CHECK(Gc(t, e) == Approx(g[t * c.E + e]).epsilon(1e-14));
}

TEST_CASE("load balancing rejects bad input with a named error and writes nothing", "[load_balancing][errors]") {
  lb_case c(61, 6, 4, 2, 0.0, 0.0);
  const moereg::load_balancing_loss loss{};
  std::vector<double> g(c.P.size(), std::numeric_limits<double>::quiet_NaN());
  auto expect_error = [&](const moereg::load_balancing_inputs<double>& in, const char* needle,
                          const moereg::load_balancing_loss& l, moereg::matrix_view<double> gv,
                          moereg::stats_view st = {}) {
    const std::vector<double> before(g);
    std::string msg;
    try {
      l.value_and_grad(in, gv, {}, st);
    } catch (const moereg::error& e) {
      msg = e.what();
    }
    INFO("message: " << msg);
    CHECK(msg.find(needle) != std::string::npos);
    CHECK(std::memcmp(before.data(), g.data(), g.size() * sizeof(double)) == 0);
  };
  const moereg::matrix_view<double> gv(g.data(), c.T, c.E);
  std::vector<long long> I = c.I;
  auto in = c.inputs();

  in.topk = moereg::topk_view(reinterpret_cast<const std::int64_t*>(I.data()), c.T - 1, c.k);
  expect_error(in, "topk has 5 rows", loss, gv);
  in = c.inputs();
  I[3] = 4;  // out of range
  in.topk = moereg::topk_view(reinterpret_cast<const std::int64_t*>(I.data()), c.T, c.k);
  expect_error(in, "out of range", loss, gv);
  I[3] = I[2];  // repeated
  expect_error(in, "twice", loss, gv);
  I = c.I;
  std::vector<long long> I5(static_cast<std::size_t>(c.T * 5), 0);
  for (long long t = 0; t < c.T; ++t)
    for (int s = 0; s < 5; ++s) I5[t * 5 + s] = s;
  in.topk = moereg::topk_view(reinterpret_cast<const std::int64_t*>(I5.data()), c.T, 5);
  expect_error(in, "k > E", loss, gv);
  in = c.inputs();
  expect_error(in, "grad_probs is [6, 3]", loss, moereg::matrix_view<double>(g.data(), c.T, 3));
  in.mask = moereg::mask_view(c.m.data(), c.T + 1);
  expect_error(in, "mask has 7 entries", loss, gv);
  in = c.inputs();
  in.probs = moereg::routing_view<double>(nullptr, c.T, c.E);
  expect_error(in, "probs is null", loss, gv);
  in = c.inputs();
  in.probs = moereg::routing_view<double>(c.P.data(), -1, c.E);
  expect_error(in, "probs has a negative size", loss, gv);
  const double st[3] = {1, 2, 3};
  expect_error(c.inputs(), "reduced statistics have 3 entries", loss, gv, {st, 3});
  expect_error(c.inputs(), "not a multiple of seq_len", moereg::load_balancing_loss{{1, moereg::lb_scope::sequence, 4}},
               gv);
  expect_error(c.inputs(), "needs seq_len > 0 or cu_seqlens",
               moereg::load_balancing_loss{{1, moereg::lb_scope::sequence}}, gv);
  const std::int64_t bad_cu[3] = {0, 4, 3};
  in = c.inputs();
  in.cu_seqlens = moereg::offsets_view(bad_cu, 3);
  expect_error(in, "not increasing", moereg::load_balancing_loss{{1, moereg::lb_scope::sequence}}, gv);
  const std::int64_t short_cu[3] = {0, 2, 5};
  in.cu_seqlens = moereg::offsets_view(short_cu, 3);
  expect_error(in, "ends at 5 but T = 6", moereg::load_balancing_loss{{1, moereg::lb_scope::sequence}}, gv);
  CHECK_NOTHROW(loss.value(c.inputs()));  // the fixture itself is valid
}
