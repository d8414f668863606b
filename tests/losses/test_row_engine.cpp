// The CPU row engine (backend/cpu/row_engine.hpp) and fusion (losses/fuse.hpp): a router loss
// described in this file alone runs on the engine, alone and fused with the library's router
// losses; a fused call gives the values, gradients and statistics of the separate calls.
#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/fuse.hpp>
#include <moereg/testing/gradcheck.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

using moereg::index_t;
using namespace moereg_test;

// A router loss the library does not know, described the way the library's own headers describe
// theirs (losses/z_loss.hpp): L = c (1 / T_v) sum_t m_t sum_e P[t,e]^2, statistics [T_v],
// dL/dP[t,e] = 2 c m_t P[t,e] / T_v. Nothing else is needed to run it on the CPU.
namespace outside {

struct square_config {
  double coef = 0.5;
};
struct square_loss;
template <class T>
struct square_inputs {
  using loss_type = square_loss;
  using grad_type = moereg::matrix_view<T>;
  static constexpr const char* matrix_name = "probs";
  static constexpr const char* grad_name = "grad_probs";
  moereg::routing_view<T> probs;
  moereg::mask_view mask{};
  const moereg::routing_view<T>& matrix() const { return probs; }
};
struct square_loss : moereg::loss_api<square_loss, square_config> {
  static constexpr const char* name = "square_loss";
  static constexpr const char* label = "square";
  static constexpr index_t stats_counts = 1;
  template <class T>
  index_t stats_size(const square_inputs<T>&) const {
    return 1;
  }
};

template <class T>
struct square_kernel {
  using storage_type = T;
  using acc_type = moereg::accumulator_t<T>;
  using Acc = acc_type;
  moereg::matrix_view<const T> x;
  moereg::mask_view mask;
  double c = 0, grad_scale = 1;
  index_t sum_width = 0, count_width = 0, stats_size = 1;
  bool reads_row = true, active = false;
  Acc inv_tv = Acc(0);

  bool needs_pass1(bool) const { return false; }
  void stats_row(index_t, const Acc*, Acc*, index_t*) const {}
  void write_stats(const moereg::row_local<Acc>& local, double* out) const { out[0] = static_cast<double>(local.tv); }
  void prepare(const double* stats, const moereg::row_local<Acc>&) {
    active = stats[0] > 0;
    inv_tv = active ? static_cast<Acc>(1.0 / stats[0]) : Acc(0);
  }
  bool wants_rows(bool) const { return true; }
  template <class Ops>
  Acc row(index_t, const Acc* p, Acc* g, Ops& ops) const {
    Acc q = Acc(0);
    const Acc gc = static_cast<Acc>(2 * c * grad_scale) * inv_tv;
    for (index_t e = 0; e < x.cols; ++e) q += p[e] * p[e];
    if (g != nullptr) ops.put(g, x.cols, [&](index_t e) { return gc * p[e]; });
    return q;
  }
  double finish(Acc rows) const { return static_cast<double>(static_cast<Acc>(c) * inv_tv * rows); }
};

template <class T>
square_kernel<T> make_row_kernel(const square_loss& loss, const square_inputs<T>& in, moereg::grad_options opts) {
  square_kernel<T> k;
  k.x = in.probs;
  k.mask = in.mask;
  k.c = loss.cfg.coef;
  k.grad_scale = opts.grad_scale;
  return k;
}

}  // namespace outside

namespace {

// The naive reference of the square loss, in double.
moereg_ref::result square_ref(const std::vector<double>& P, const std::vector<int>& m, long long T, long long E,
                              double c) {
  moereg_ref::result r;
  r.grad.assign(static_cast<std::size_t>(T * E), 0.0);
  double tv = 0;
  for (long long t = 0; t < T; ++t) tv += m[static_cast<std::size_t>(t)] != 0;
  if (tv == 0) return r;
  for (long long t = 0; t < T; ++t) {
    if (m[static_cast<std::size_t>(t)] == 0) continue;
    for (long long e = 0; e < E; ++e) {
      const double p = P[static_cast<std::size_t>(t * E + e)];
      r.value += c * p * p / tv;
      r.grad[static_cast<std::size_t>(t * E + e)] = 2 * c * p / tv;
    }
  }
  return r;
}

// One batch for every router loss: P (shared by load balancing, entropy, importance, the
// square loss and, as the variance scores, by the variance loss), logits Z, top-k ids with
// dropped slots, a mask.
struct batch {
  long long T, E, k;
  std::vector<double> P, Z;
  std::vector<long long> I;
  std::vector<std::uint8_t> m;
  batch(long long T_, long long E_, long long k_, std::uint64_t seed) : T(T_), E(E_), k(k_) {
    rng r(seed);
    P = random_probs(r, T, E);
    Z = random_normal(r, static_cast<std::size_t>(T * E), 2.0);
    I = random_topk(r, T, E, k);
    m = random_mask(r, T, 0.25);
  }
  moereg::mask_view mask() const { return {m.data(), T}; }
  moereg::topk_view topk() const { return {reinterpret_cast<const std::int64_t*>(I.data()), T, k}; }
};

template <class T>
struct typed {
  std::vector<T> P, Z;
  explicit typed(const batch& b) : P(cast<T>(b.P)), Z(cast<T>(b.Z)) {}
};

const moereg::load_balancing_loss lb{{0.4}};
const moereg::z_loss zl{{0.3}};
const moereg::entropy_loss ent{{0.2}};
const moereg::importance_loss imp{{0.1}};
const moereg::variance_loss var{{0.6, moereg::variance_axis::tokens}};
const outside::square_loss sq{{0.7}};

// Bitwise equality of two buffers (memcmp would be handed null for empty ones).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace

TEST_CASE("row engine: a loss described outside the library, against its reference and finite differences",
          "[row_engine]") {
  for (const auto& shape : {std::pair<long long, long long>{0, 3}, {1, 1}, {7, 5}, {257, 9}, {600, 13}}) {
    const long long T = shape.first, E = shape.second;
    CAPTURE(T, E);
    rng r(static_cast<std::uint64_t>(31 * T + E));
    const auto P = random_probs(r, T, E);
    const auto m = random_mask(r, T, 0.3);
    const outside::square_inputs<double> in{{P.data(), T, E}, {m.data(), T}};
    std::vector<double> g;
    const double v = checked_matrix_into(g, sq, in, T, E);
    const auto ref = square_ref(P, to_int_mask(m), T, E, 0.7);
    CHECK(v == Approx(ref.value).epsilon(1e-12).margin(1e-300));
    CHECK(rel_diff(g, ref.grad) < 1e-12);
    CHECK(sq.value(in) == v);
    CHECK(sq.local_stats(in) == std::vector<double>{static_cast<double>(moereg::detail::count_valid(in.mask, T))});
    if (T > 0 && T * E <= 200) {
      const auto f = [&](const double* p) { return sq.value(outside::square_inputs<double>{{p, T, E}, in.mask}); };
      const auto rep = moereg::testing::gradcheck(f, P, g);
      INFO(rep.summary());
      CHECK(rep.ok);
    }
    // float storage: the same loss, to float precision.
    const auto Pf = cast<float>(P);
    const auto rf = checked_matrix<float>(sq, outside::square_inputs<float>{{Pf.data(), T, E}, in.mask}, T, E);
    CHECK(rf.value == Approx(ref.value).epsilon(1e-5).margin(1e-30));
    CHECK(rel_diff(cast<double>(rf.grad), ref.grad, 1e-6) < 1e-5);
  }
}

TEST_CASE("row engine: the loss described outside the library splits by reduced statistics", "[row_engine][stats]") {
  const long long T = 300, E = 6, cut = 113;
  rng r(5);
  const auto P = random_probs(r, T, E);
  const auto m = random_mask(r, T, 0.3);
  const auto part = [&](long long r0, long long n) {
    return outside::square_inputs<double>{{P.data() + r0 * E, n, E}, {m.data() + r0, n}};
  };
  const auto whole = part(0, T), a = part(0, cut), b = part(cut, T - cut);
  auto red = sq.local_stats(a);
  red[0] += sq.local_stats(b)[0];
  std::vector<double> g(static_cast<std::size_t>(T * E));
  const double v = sq.value_and_grad(whole, moereg::matrix_view<double>(g.data(), T, E));
  std::vector<double> gp(static_cast<std::size_t>(T * E));
  const moereg::stats_view rv{red.data(), static_cast<index_t>(red.size())};
  const double va = sq.value_and_grad(a, moereg::matrix_view<double>(gp.data(), cut, E), {}, rv);
  const double vb = sq.value_and_grad(b, moereg::matrix_view<double>(gp.data() + cut * E, T - cut, E), {}, rv);
  CHECK(va + vb == Approx(v).epsilon(1e-13));
  CHECK(rel_diff(gp, g) < 1e-14);
}

TEMPLATE_TEST_CASE("fuse: values, gradients and statistics equal the separate calls", "[row_engine][fuse]", double,
                   float) {
  using T = TestType;
  for (const auto& shape : {std::array<long long, 3>{0, 4, 2}, {1, 3, 1}, {9, 5, 2}, {300, 17, 3}, {777, 8, 2}}) {
    const batch b(shape[0], shape[1], shape[2], static_cast<std::uint64_t>(shape[0] * 7 + shape[1]));
    const long long Tn = b.T, E = b.E;
    CAPTURE(Tn, E, b.k);
    const typed<T> x(b);
    const moereg::routing_view<T> P(x.P.data(), Tn, E), Z(x.Z.data(), Tn, E);
    const moereg::load_balancing_inputs<T> lb_in{P, b.topk(), b.mask()};
    const moereg::z_loss_inputs<T> z_in{Z, b.mask()};
    const moereg::entropy_inputs<T> ent_in{P, b.mask()};
    const moereg::importance_inputs<T> imp_in{P, b.mask()};
    const moereg::variance_inputs<T> var_in{P, b.mask()};
    const outside::square_inputs<T> sq_in{P, b.mask()};
    const auto f = moereg::fuse(lb, zl, ent, imp, var, sq);
    const auto in = std::tie(lb_in, z_in, ent_in, imp_in, var_in, sq_in);
    const std::size_t n = static_cast<std::size_t>(Tn * E);

    // Separate calls: P's four gradients summed in the fused order (lb, entropy, importance,
    // square) by accumulating into one buffer; variance's and z's into their own.
    std::vector<T> gP(n), gZ(n), gS(n);
    const auto mv = [&](std::vector<T>& g) { return moereg::matrix_view<T>(g.data(), Tn, E); };
    const moereg::grad_options acc{1.0, true};
    std::array<double, 6> sep{};
    sep[0] = lb.value_and_grad(lb_in, mv(gP));
    sep[1] = zl.value_and_grad(z_in, mv(gZ));
    sep[2] = ent.value_and_grad(ent_in, mv(gP), acc);
    sep[3] = imp.value_and_grad(imp_in, mv(gP), acc);
    sep[4] = var.value_and_grad(var_in, mv(gS));
    sep[5] = sq.value_and_grad(sq_in, mv(gP), acc);

    std::vector<T> fP(n), fZ(n), fS(n);
    fill_sentinel(fP), fill_sentinel(fZ), fill_sentinel(fS);
    const auto v = f.value_and_grad(in, std::make_tuple(mv(fP), mv(fZ), mv(fP), mv(fP), mv(fS), mv(fP)));
    for (std::size_t i = 0; i < 6; ++i) {
      CAPTURE(i);
      CHECK(std::memcmp(&v[i], &sep[i], sizeof(double)) == 0);
    }
    // The same sums in the same order: bitwise.
    CHECK(same_bits(fP, gP));
    CHECK(same_bits(fZ, gZ));
    CHECK(same_bits(fS, gS));
    CHECK(f.value(in) == v);

    // Against the naive references, in double.
    const auto mi = to_int_mask(b.m);
    const auto Pd = cast<double>(x.P), Zd = cast<double>(x.Z);
    const double tol = std::is_same<T, double>::value ? 1e-11 : 2e-4;
    const moereg_ref::result refs[] = {moereg_ref::load_balancing(Pd, b.I, mi, Tn, E, b.k, 0.4),
                                       moereg_ref::z_loss(Zd, mi, Tn, E, 0.3),
                                       moereg_ref::entropy(Pd, mi, Tn, E, 0.2),
                                       moereg_ref::importance(Pd, mi, Tn, E, 0.1),
                                       moereg_ref::variance(Pd, mi, Tn, E, 0.6, "tokens", false),
                                       square_ref(Pd, mi, Tn, E, 0.7)};
    for (std::size_t i = 0; i < 6; ++i) {
      CAPTURE(i);
      CHECK(v[i] == Approx(refs[i].value).epsilon(tol).margin(tol * 1e-3));
    }
    std::vector<double> want_P(n, 0.0);
    for (const std::size_t i : {0, 2, 3, 5})
      for (std::size_t j = 0; j < n; ++j) want_P[j] += refs[i].grad[j];
    CHECK(rel_diff(cast<double>(fP), want_P, 1e-6) < tol);
    CHECK(rel_diff(cast<double>(fZ), refs[1].grad, 1e-6) < tol);
    CHECK(rel_diff(cast<double>(fS), refs[4].grad, 1e-6) < tol);

    // Statistics: each loss's own, from one pass.
    const auto st = f.local_stats(in);
    CHECK(st[0] == lb.local_stats(lb_in));
    CHECK(st[1] == zl.local_stats(z_in));
    CHECK(st[2] == ent.local_stats(ent_in));
    CHECK(st[3] == imp.local_stats(imp_in));
    CHECK(st[4] == var.local_stats(var_in));
    CHECK(st[5] == sq.local_stats(sq_in));

    // Gradients not wanted (null views) are not written; the values stay.
    std::vector<T> only(n);
    fill_sentinel(only);
    const moereg::matrix_view<T> none{};
    const auto v2 = f.value_and_grad(in, std::make_tuple(none, mv(only), none, none, none, none));
    CHECK(v2 == v);
    CHECK(same_bits(only, gZ));
  }
}

TEST_CASE("fuse: the total gradient of losses sharing P against finite differences", "[row_engine][fuse]") {
  const batch b(23, 6, 2, 11);
  const long long T = b.T, E = b.E;
  const auto in_of = [&](const double* p) {
    const moereg::routing_view<double> P(p, T, E);
    return std::make_tuple(moereg::load_balancing_inputs<double>{P, b.topk(), b.mask()},
                           moereg::entropy_inputs<double>{P, b.mask()}, moereg::importance_inputs<double>{P, b.mask()},
                           moereg::variance_inputs<double>{P, b.mask()}, outside::square_inputs<double>{P, b.mask()});
  };
  const auto f = moereg::fuse(lb, ent, imp, var, sq);
  std::vector<double> g(static_cast<std::size_t>(T * E));
  const moereg::matrix_view<double> G(g.data(), T, E);
  const auto v = f.value_and_grad(in_of(b.P.data()), std::make_tuple(G, G, G, G, G));
  const auto total = [&](const double* p) {
    const auto w = f.value(in_of(p));
    return w[0] + w[1] + w[2] + w[3] + w[4];
  };
  CHECK(total(b.P.data()) == v[0] + v[1] + v[2] + v[3] + v[4]);
  const auto rep = moereg::testing::gradcheck(total, b.P, g);
  INFO(rep.summary());
  CHECK(rep.ok);
}

TEST_CASE("fuse: reduced statistics per loss, and any thread count, as the separate calls", "[row_engine][fuse]") {
  const batch b(700, 7, 2, 19);
  const long long T = b.T, E = b.E;
  const moereg::routing_view<double> P(b.P.data(), T, E), Z(b.Z.data(), T, E);
  const moereg::load_balancing_loss lbg{{0.4, moereg::lb_scope::global}};
  const moereg::load_balancing_inputs<double> lb_in{P, b.topk(), b.mask()};
  const moereg::z_loss_inputs<double> z_in{Z, b.mask()};
  const moereg::variance_inputs<double> var_in{P, b.mask()};
  const auto f = moereg::fuse(lbg, zl, var);
  const auto in = std::tie(lb_in, z_in, var_in);
  // Statistics as if other ranks had added theirs.
  auto s_lb = lbg.local_stats(lb_in), s_z = zl.local_stats(z_in), s_var = var.local_stats(var_in);
  for (auto* s : {&s_lb, &s_z, &s_var})
    for (auto& x : *s) x = 3 * x + 1;
  const auto sv = [](const std::vector<double>& v) {
    return moereg::stats_view{v.data(), static_cast<index_t>(v.size())};
  };
  const std::array<moereg::stats_view, 3> red{sv(s_lb), sv(s_z), sv(s_var)};
  const std::size_t n = static_cast<std::size_t>(T * E);
  std::vector<double> a(n), z(n), s(n);
  const auto mv = [&](std::vector<double>& g) { return moereg::matrix_view<double>(g.data(), T, E); };
  const std::array<double, 3> sep{lbg.value_and_grad(lb_in, mv(a), {}, red[0]),
                                  zl.value_and_grad(z_in, mv(z), {}, red[1]),
                                  var.value_and_grad(var_in, mv(s), {}, red[2])};
  for (const int threads : {1, 2, 3}) {
    CAPTURE(threads);
    std::vector<double> fa(n), fz(n), fs(n);
    const auto v = f.value_and_grad(in, std::make_tuple(mv(fa), mv(fz), mv(fs)), {}, red, moereg::cpu{threads});
    CHECK(v == sep);
    CHECK(fa == a);
    CHECK(fz == z);
    CHECK(fs == s);
  }
}

TEST_CASE("fuse: bad input throws before anything is written", "[row_engine][fuse][errors]") {
  const batch b(40, 5, 2, 23);
  const long long T = b.T, E = b.E;
  const moereg::routing_view<double> P(b.P.data(), T, E), Z(b.Z.data(), T, E);
  const moereg::load_balancing_inputs<double> lb_in{P, b.topk(), b.mask()};
  const moereg::z_loss_inputs<double> z_in{Z, b.mask()};
  std::vector<double> g1(static_cast<std::size_t>(T * E)), g2(static_cast<std::size_t>(T * E) + E);
  fill_sentinel(g1), fill_sentinel(g2);
  const auto untouched = [&] { return count_nan(g1) == g1.size() && count_nan(g2) == g2.size(); };
  const moereg::matrix_view<double> G1(g1.data(), T, E), G2(g2.data(), T, E);

  // The sequence scope runs on its own engine.
  moereg::load_balancing_loss seq{{0.1, moereg::lb_scope::sequence, 8}};
  CHECK_THROWS_WITH(moereg::fuse(seq, zl).value_and_grad(std::tie(lb_in, z_in), std::make_tuple(G1, G2)),
                    Catch::Contains("load_balancing") && Catch::Contains("cannot be fused"));
  // Different row counts.
  const moereg::z_loss_inputs<double> z_short{{b.Z.data(), T - 1, E}, {b.m.data(), T - 1}};
  CHECK_THROWS_WITH(moereg::fuse(lb, zl).value(std::tie(lb_in, z_short)), Catch::Contains("rows"));
  // Two distinct gradient views over overlapping memory (one row apart).
  const moereg::matrix_view<double> G2shift(g2.data() + E, T, E), G2same(g2.data(), T, E);
  CHECK_THROWS_WITH(moereg::fuse(lb, zl).value_and_grad(std::tie(lb_in, z_in), std::make_tuple(G2, G2shift)),
                    Catch::Contains("overlap"));
  // One loss's own checks (a top-k id out of range) stop the whole call.
  std::vector<long long> bad = b.I;
  bad[3] = E;
  const moereg::load_balancing_inputs<double> lb_bad{
      P, {reinterpret_cast<const std::int64_t*>(bad.data()), T, b.k}, b.mask()};
  CHECK_THROWS_WITH(moereg::fuse(zl, lb).value_and_grad(std::tie(z_in, lb_bad), std::make_tuple(G2, G1)),
                    Catch::Contains("load_balancing"));
  // A non-finite coefficient, named by its loss.
  const moereg::z_loss znan{{std::nan("")}};
  CHECK_THROWS_WITH(moereg::fuse(lb, znan).value_and_grad(std::tie(lb_in, z_in), std::make_tuple(G1, G2)),
                    Catch::Contains("z_loss"));
  CHECK(untouched());
  // The same view for two losses is fine (the gradients are summed).
  CHECK_NOTHROW(moereg::fuse(lb, zl).value_and_grad(std::tie(lb_in, z_in), std::make_tuple(G2, G2same)));
}
