// Tests of the cross-layer coupling loss (include/moereg/losses/coupling.hpp), all three forms,
// against the naive reference and finite differences.
#include <catch2/catch.hpp>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/coupling.hpp>
#include <moereg/testing/gradcheck.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

namespace {

using moereg::coupling_form;
using moereg::index_t;
using vec = std::vector<double>;

const char* form_name(coupling_form f) {
  return f == coupling_form::token ? "token" : f == coupling_form::log ? "log" : "batch";
}

struct problem {
  long long T = 0, E = 0;
  std::vector<long long> k;               // per layer
  std::vector<vec> P;                     // per layer, [T, E] row-major
  std::vector<std::vector<long long>> I;  // per layer, [T, k_l]
  std::vector<std::uint8_t> mask;         // empty = all valid
  std::size_t layers() const { return P.size(); }
};

problem make_problem(std::uint64_t seed, long long T, long long E, std::vector<long long> k, bool use_mask,
                     double drop = 0.15, double pad = 0.25) {
  moereg_test::rng r(seed);
  problem pb;
  pb.T = T;
  pb.E = E;
  pb.k = k;
  for (long long kl : k) {
    pb.P.push_back(moereg_test::random_probs(r, T, E));
    pb.I.push_back(moereg_test::random_topk<long long>(r, T, E, kl, drop));
  }
  if (use_mask) pb.mask = moereg_test::random_mask(r, T, pad);
  return pb;
}

problem slice(const problem& pb, long long r0, long long r1) {
  problem s;
  s.T = r1 - r0;
  s.E = pb.E;
  s.k = pb.k;
  for (std::size_t l = 0; l < pb.layers(); ++l) {
    s.P.emplace_back(pb.P[l].begin() + r0 * pb.E, pb.P[l].begin() + r1 * pb.E);
    s.I.emplace_back(pb.I[l].begin() + r0 * pb.k[l], pb.I[l].begin() + r1 * pb.k[l]);
  }
  if (!pb.mask.empty()) s.mask.assign(pb.mask.begin() + r0, pb.mask.begin() + r1);
  return s;
}

std::pair<double, std::vector<vec>> reference(const problem& pb, double lambda, coupling_form form,
                                              double eps = 1e-12) {
  return moereg_ref::coupling(pb.P, pb.I, pb.k, moereg_test::to_int_mask(pb.mask), pb.T, pb.E, lambda, form_name(form),
                              eps);
}

enum class layout { row_major, padded, col_major };

/// One library call on a problem, storage type S; P and gradients laid out as asked.
template <class S>
struct lib_call {
  const problem& pb;
  layout lay = layout::row_major;
  bool int32 = false;
  std::vector<std::vector<S>> Pbuf, Gbuf;
  std::vector<std::vector<std::int32_t>> I32;
  std::vector<std::vector<std::int64_t>> I64;
  std::vector<moereg::routing_view<S>> pv;
  std::vector<moereg::topk_view> kv;
  std::vector<moereg::matrix_view<S>> gv;
  moereg::coupling_inputs<S> in;

  explicit lib_call(const problem& p, layout l = layout::row_major, bool use_int32 = false)
      : pb(p), lay(l), int32(use_int32) {
    const long long T = pb.T, E = pb.E;
    const std::size_t n = static_cast<std::size_t>(layout_size());
    for (std::size_t l2 = 0; l2 < pb.layers(); ++l2) {
      Pbuf.emplace_back(n, S(-7.0f));  // padding holds garbage that must not be read
      Gbuf.emplace_back(n, S(0.0f));
      for (long long t = 0; t < T; ++t)
        for (long long e = 0; e < E; ++e)
          Pbuf[l2][off(t, e)] = static_cast<S>(pb.P[l2][static_cast<std::size_t>(t * E + e)]);
      I32.push_back(moereg_test::cast<std::int32_t>(pb.I[l2]));
      I64.push_back(moereg_test::cast<std::int64_t>(pb.I[l2]));
    }
    for (std::size_t l2 = 0; l2 < pb.layers(); ++l2) {
      pv.push_back(view(Pbuf[l2].data()));
      gv.push_back(view(Gbuf[l2].data()));
      kv.push_back(int32 ? moereg::topk_view(I32[l2].data(), T, pb.k[l2])
                         : moereg::topk_view(I64[l2].data(), T, pb.k[l2]));
    }
    in.probs = pv.data();
    in.topk = kv.data();
    in.layers = static_cast<index_t>(pb.layers());
    if (!pb.mask.empty()) in.mask = moereg::mask_view(pb.mask.data(), T);
  }
  long long layout_size() const { return lay == layout::padded ? pb.T * (pb.E + 3) : pb.T * pb.E; }
  std::size_t off(long long t, long long e) const {
    switch (lay) {
      case layout::padded:
        return static_cast<std::size_t>(t * (pb.E + 3) + e);
      case layout::col_major:
        return static_cast<std::size_t>(e * pb.T + t);
      default:
        return static_cast<std::size_t>(t * pb.E + e);
    }
  }
  template <class U>
  moereg::matrix_view<U> view(U* d) const {
    switch (lay) {
      case layout::padded:
        return moereg::matrix_view<U>(d, pb.T, pb.E, pb.E + 3, 1);
      case layout::col_major:
        return moereg::matrix_view<U>(d, pb.T, pb.E, 1, pb.T);
      default:
        return moereg::matrix_view<U>(d, pb.T, pb.E);
    }
  }
  /// value_and_grad through moereg_test::checked_grad (support/grad_buffers.hpp) on one flat
  /// buffer holding every layer's gradient: NaN before the overwrite call, random values before
  /// an accumulate call, and the entries of the padded layout that map to no (t, e) must stay
  /// untouched. Gbuf holds the overwrite-mode gradients afterwards.
  template <class Loss>
  double checked(const Loss& loss, moereg::grad_options o = {}, moereg::stats_view st = {}, moereg::cpu be = {}) {
    const std::size_t n = static_cast<std::size_t>(layout_size()), L = pb.layers();
    std::vector<char> mapped(n * L, 0);
    for (std::size_t l = 0; l < L; ++l)
      for (long long t = 0; t < pb.T; ++t)
        for (long long e = 0; e < pb.E; ++e) mapped[l * n + off(t, e)] = 1;
    moereg_test::grad_check_options chk;
    chk.mapped = &mapped;
    auto r = moereg_test::checked_grad<S>(
        n * L,
        [&](S* b, moereg::grad_options go) {
          std::vector<moereg::matrix_view<S>> views;
          for (std::size_t l = 0; l < L; ++l) views.push_back(view(b + l * n));
          return loss.value_and_grad(in, views.data(), go, st, be);
        },
        o, chk);
    for (std::size_t l = 0; l < L; ++l)
      std::copy(r.grad.begin() + static_cast<std::ptrdiff_t>(l * n),
                r.grad.begin() + static_cast<std::ptrdiff_t>((l + 1) * n), Gbuf[l].begin());
    return r.value;
  }
  std::vector<vec> grads() const {
    std::vector<vec> out;
    for (std::size_t l = 0; l < pb.layers(); ++l) {
      vec g(static_cast<std::size_t>(pb.T * pb.E));
      for (long long t = 0; t < pb.T; ++t)
        for (long long e = 0; e < pb.E; ++e)
          g[static_cast<std::size_t>(t * pb.E + e)] = static_cast<double>(Gbuf[l][off(t, e)]);
      out.push_back(g);
    }
    return out;
  }
};

double rel(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-300);
}

double max_rel(const std::vector<vec>& a, const std::vector<vec>& b) {
  vec fa, fb;
  for (const auto& x : a) fa.insert(fa.end(), x.begin(), x.end());
  for (const auto& x : b) fb.insert(fb.end(), x.begin(), x.end());
  REQUIRE(fa.size() == fb.size());
  return moereg_test::rel_diff(fa, fb);
}

const coupling_form all_forms[] = {coupling_form::token, coupling_form::log, coupling_form::batch};

}  // namespace

TEST_CASE("coupling matches the reference in double", "[coupling]") {
  struct shape {
    long long T, E;
    std::vector<long long> k;
    bool mask;
    layout lay;
    bool int32;
  };
  const std::vector<shape> shapes = {
      {37, 6, {2, 3}, true, layout::row_major, false},        {41, 7, {2, 3, 1}, true, layout::padded, true},
      {300, 5, {2, 2, 2, 2}, true, layout::col_major, false}, {600, 8, {3, 1, 8}, false, layout::row_major, true},
      {19, 4, {4, 4}, false, layout::padded, false},          {1, 3, {1, 2}, false, layout::row_major, false},
      {9, 1, {1, 1, 1}, true, layout::row_major, false}};
  std::uint64_t seed = 11;
  for (const auto& sh : shapes)
    for (coupling_form f : all_forms) {
      const problem pb = make_problem(seed++, sh.T, sh.E, sh.k, sh.mask);
      const double lambda = 0.37;
      const auto ref = reference(pb, lambda, f);
      lib_call<double> c(pb, sh.lay, sh.int32);
      const moereg::coupling_loss loss{{lambda, f}};
      const double v = c.checked(loss);
      INFO("form " << form_name(f) << " T " << sh.T << " E " << sh.E << " layers " << sh.k.size());
      CHECK(rel(v, ref.first) < 1e-12);
      CHECK(max_rel(c.grads(), ref.second) < 1e-12);
      CHECK(rel(loss.value(c.in), ref.first) < 1e-12);
      if (sh.T >= 19) {  // not trivially zero
        CHECK(ref.first != 0.0);
        CHECK(moereg_test::max_abs(ref.second[0]) > 0.0);
      }
    }
}

TEST_CASE("coupling log form honours eps", "[coupling]") {
  // Every slot of layer 0 dropped for some tokens: M = 0 and log(0 * M' + eps) = log(eps).
  problem pb = make_problem(5, 23, 5, {2, 2}, true, 0.6);
  for (double eps : {1e-12, 1e-3, 0.5}) {
    const auto ref = reference(pb, 1.0, coupling_form::log, eps);
    lib_call<double> c(pb);
    const double v = c.checked(moereg::coupling_loss{{1.0, coupling_form::log, eps}});
    CHECK(rel(v, ref.first) < 1e-12);
    CHECK(max_rel(c.grads(), ref.second) < 1e-12);
  }
}

TEST_CASE("coupling gradients match finite differences", "[coupling][gradcheck]") {
  std::uint64_t seed = 101;
  for (coupling_form f : all_forms)
    for (const auto& ks : std::vector<std::vector<long long>>{{2, 3}, {2, 1, 3}}) {
      const problem base = make_problem(seed++, 7, 5, ks, true, 0.2, 0.3);
      const moereg::coupling_loss loss{{1.0, f}};
      lib_call<double> c(base);
      (void)c.checked(loss);
      vec x, g;
      for (std::size_t l = 0; l < base.layers(); ++l) x.insert(x.end(), base.P[l].begin(), base.P[l].end());
      for (const auto& gl : c.grads()) g.insert(g.end(), gl.begin(), gl.end());
      auto fx = [&](const double* p) {
        problem q = base;
        for (std::size_t l = 0; l < q.layers(); ++l)
          std::copy(p + l * q.P[l].size(), p + (l + 1) * q.P[l].size(), q.P[l].begin());
        lib_call<double> cq(q);
        return loss.value(cq.in);
      };
      const auto rep = moereg::testing::gradcheck(fx, x, g);
      INFO(form_name(f) << " layers " << ks.size() << ": " << rep.summary());
      CHECK(rep.ok);
      CHECK(rep.checked == static_cast<index_t>(x.size()));
      CHECK(moereg_test::max_abs(g) > 1e-3);
    }
}

TEST_CASE("coupling odd sizes: T = 0, T = 1, all masked, E = 1, k = E", "[coupling]") {
  for (coupling_form f : all_forms) {
    INFO(form_name(f));
    {  // T = 0
      problem pb = make_problem(1, 0, 4, {2, 2}, false);
      lib_call<double> c(pb);
      const moereg::coupling_loss loss{{1.0, f}};
      CHECK(c.checked(loss) == 0.0);
      CHECK(loss.local_stats(c.in)[0] == 0.0);
    }
    {  // all masked: value 0, gradient overwritten with zeros, accumulate leaves it alone
      problem pb = make_problem(2, 13, 4, {2, 3}, true);
      std::fill(pb.mask.begin(), pb.mask.end(), std::uint8_t(0));
      lib_call<double> c(pb);
      for (auto& g : c.Gbuf) std::fill(g.begin(), g.end(), 3.0);
      const moereg::coupling_loss loss{{1.0, f}};
      CHECK(loss.value_and_grad(c.in, c.gv.data(), {1.0, true}) == 0.0);
      for (const auto& g : c.grads()) CHECK(moereg_test::max_abs(g) == 3.0);
      CHECK(c.checked(loss) == 0.0);
      for (const auto& g : c.grads()) CHECK(moereg_test::max_abs(g) == 0.0);
    }
    for (const auto& sh : std::vector<std::pair<long long, std::vector<long long>>>{
             {1, {1, 1}}, {4, {4, 4, 4}}, {3, {3, 1}}}) {  // E = 1; k = E
      for (long long T : {1LL, 17LL}) {
        const problem pb = make_problem(static_cast<std::uint64_t>(T * 7 + sh.first), T, sh.first, sh.second, T > 1);
        const auto ref = reference(pb, 0.5, f);
        lib_call<double> c(pb);
        const double v = c.checked(moereg::coupling_loss{{0.5, f}});
        CHECK(std::abs(v - ref.first) <= 1e-12 * std::abs(ref.first) + 1e-300);
        CHECK(max_rel(c.grads(), ref.second) < 1e-12);
      }
    }
  }
}

TEST_CASE("coupling batch form: ties go to the lower expert index", "[coupling]") {
  // P^1 rows [0.5, 0.5, 0, 0], P^2 rows uniform: every J^1[e, :] has four equal entries, so
  // with k_1 = 1 each source expert selects nu = 0 and only column 0 of P^2 gets a gradient.
  problem pb;
  pb.T = 6;
  pb.E = 4;
  pb.k = {1, 2};
  vec p1, p2;
  for (int t = 0; t < 6; ++t) {
    p1.insert(p1.end(), {0.5, 0.5, 0.0, 0.0});
    p2.insert(p2.end(), {0.25, 0.25, 0.25, 0.25});
  }
  pb.P = {p1, p2};
  pb.I = {std::vector<long long>(6, 0), std::vector<long long>(12, -1)};
  lib_call<double> c(pb);
  const double v = c.checked(moereg::coupling_loss{{1.0, coupling_form::batch}});
  // J^1[e, 0] = 0.5 * 0.25 for e in {0, 1}, 0 for e in {2, 3}: L = -(0.125 + 0.125).
  CHECK(v == Approx(-0.25).epsilon(1e-15));
  const auto g = c.grads();
  for (int t = 0; t < 6; ++t) {
    CHECK(g[1][static_cast<std::size_t>(t * 4)] == -1.0 / 6.0);
    for (int e = 1; e < 4; ++e) CHECK(g[1][static_cast<std::size_t>(t * 4 + e)] == 0.0);
    for (int e = 0; e < 4; ++e) CHECK(g[0][static_cast<std::size_t>(t * 4 + e)] == 0.25 / 6.0 * -1.0);
  }
  const auto ref = reference(pb, 1.0, coupling_form::batch);
  CHECK(rel(v, ref.first) < 1e-15);
  CHECK(max_rel(g, ref.second) < 1e-15);
}

TEMPLATE_TEST_CASE("coupling 16-bit inputs agree with float", "[coupling][half]", moereg::half, moereg::bfloat16) {
  using S = TestType;
  const double tol = std::is_same<S, moereg::half>::value ? 2e-3 : 1.6e-2;
  std::uint64_t seed = 77;
  for (coupling_form f : all_forms) {
    problem pb = make_problem(seed++, 531, 6, {2, 3, 2}, true);
    for (auto& P : pb.P)
      for (auto& x : P) x = static_cast<double>(static_cast<float>(static_cast<S>(x)));  // same inputs for both
    lib_call<S> cs(pb, layout::padded);
    lib_call<float> cf(pb);
    const moereg::coupling_loss loss{{1.0, f}};
    const double vs = cs.checked(loss);
    const double vf = cf.checked(loss);
    INFO(form_name(f));
    CHECK(rel(vs, vf) < 1e-5);
    CHECK(max_rel(cs.grads(), cf.grads()) < tol);
    const auto ref = reference(pb, 1.0, f);
    CHECK(rel(vf, ref.first) < 1e-5);
    CHECK(max_rel(cf.grads(), ref.second) < 1e-5);
  }
}

TEST_CASE("coupling grad_scale and accumulate", "[coupling]") {
  std::uint64_t seed = 200;
  for (coupling_form f : all_forms) {
    const problem pb = make_problem(seed++, 45, 5, {2, 3, 2}, true);
    const auto ref = reference(pb, 0.8, f);
    lib_call<double> c(pb, layout::col_major);
    moereg_test::rng r(seed);
    std::vector<vec> init;
    for (auto& g : c.Gbuf) {
      for (auto& x : g) x = r.normal();
    }
    init = c.grads();
    const double gs = -2.5;
    const double v = moereg::coupling_loss{{0.8, f}}.value_and_grad(c.in, c.gv.data(), {gs, true});
    CHECK(rel(v, ref.first) < 1e-12);
    std::vector<vec> want = init;
    for (std::size_t l = 0; l < want.size(); ++l)
      for (std::size_t i = 0; i < want[l].size(); ++i) want[l][i] += gs * ref.second[l][i];
    CHECK(max_rel(c.grads(), want) < 1e-12);
    // backward overwrites (an entry it does not write stays NaN)
    for (auto& g : c.Gbuf) moereg_test::fill_sentinel(g);
    moereg::coupling_loss{{0.8, f}}.backward(c.in, c.gv.data(), {gs, false});
    std::vector<vec> scaled = ref.second;
    for (auto& g : scaled)
      for (auto& x : g) x *= gs;
    CHECK(max_rel(c.grads(), scaled) < 1e-12);
  }
}

TEMPLATE_TEST_CASE("coupling is bitwise identical for 1 and 2 threads", "[coupling][determinism]", double, float) {
  using S = TestType;
  std::uint64_t seed = 300;
  for (coupling_form f : all_forms)
    for (long long T : {1000LL, 64LL * 256 + 77}) {
      if (T > 1000 && f != coupling_form::batch) continue;  // several reduction waves: batch form only
      const problem pb = make_problem(seed++, T, 9, {2, 3, 1}, true);
      for (layout lay : {layout::row_major, layout::col_major}) {
        lib_call<S> c1(pb, lay), c2(pb, lay);
        const moereg::coupling_loss loss{{1.0, f}};
        const double v1 = c1.checked(loss, {}, {}, moereg::cpu{1});
        const double v2 = c2.checked(loss, {}, {}, moereg::cpu{2});
        INFO(form_name(f) << " T " << T);
        CHECK(std::memcmp(&v1, &v2, sizeof v1) == 0);
        for (std::size_t l = 0; l < pb.layers(); ++l)
          CHECK(std::memcmp(c1.Gbuf[l].data(), c2.Gbuf[l].data(), c1.Gbuf[l].size() * sizeof(S)) == 0);
        const auto s1 = loss.local_stats(c1.in, moereg::cpu{1}), s2 = loss.local_stats(c2.in, moereg::cpu{2});
        CHECK(std::memcmp(s1.data(), s2.data(), s1.size() * sizeof(double)) == 0);
      }
    }
}

TEST_CASE("coupling statistics: three uneven parts reproduce the whole batch", "[coupling][stats]") {
  std::uint64_t seed = 400;
  for (coupling_form f : all_forms)
    for (bool use_mask : {true, false}) {
      const problem pb = make_problem(seed++, 611, 6, {2, 3, 2}, use_mask);
      const moereg::coupling_loss loss{{0.9, f}};
      lib_call<double> whole(pb);
      const double vw = whole.checked(loss);
      const auto gw = whole.grads();
      const long long cuts[] = {0, 17, 400, 611};
      std::vector<problem> parts;
      for (int i = 0; i < 3; ++i) parts.push_back(slice(pb, cuts[i], cuts[i + 1]));
      std::vector<double> reduced;
      for (const auto& p : parts) {
        lib_call<double> c(p);
        const auto s = loss.local_stats(c.in);
        if (reduced.empty()) reduced.assign(s.size(), 0.0);
        REQUIRE(s.size() == reduced.size());
        for (std::size_t i = 0; i < s.size(); ++i) reduced[i] += s[i];
      }
      const auto sw = loss.local_stats(whole.in);
      REQUIRE(sw.size() == reduced.size());
      CHECK(moereg_test::rel_diff(reduced, sw) < 1e-12);
      double vsum = 0;
      for (int i = 0; i < 3; ++i) {
        lib_call<double> c(parts[static_cast<std::size_t>(i)]);
        vsum += c.checked(loss, {}, moereg::stats_view{reduced.data(), static_cast<index_t>(reduced.size())});
        const auto gp = c.grads();
        for (std::size_t l = 0; l < pb.layers(); ++l) {
          const vec want(gw[l].begin() + cuts[i] * pb.E, gw[l].begin() + cuts[i + 1] * pb.E);
          INFO(form_name(f) << " part " << i << " layer " << l);
          CHECK(moereg_test::rel_diff(gp[l], want, moereg_test::max_abs(gw[l])) < 1e-12);
        }
      }
      INFO(form_name(f));
      CHECK(rel(vsum, vw) < 1e-12);
    }
}

TEST_CASE("coupling rejects bad input and leaves the gradients untouched", "[coupling][validation]") {
  const problem good = make_problem(9, 12, 5, {2, 3}, true);
  auto poisoned = [](lib_call<double>& c) {
    for (auto& g : c.Gbuf) std::fill(g.begin(), g.end(), std::numeric_limits<double>::quiet_NaN());
    std::vector<std::vector<unsigned char>> bytes;
    for (auto& g : c.Gbuf) {
      bytes.emplace_back(g.size() * sizeof(double));
      std::memcpy(bytes.back().data(), g.data(), bytes.back().size());
    }
    return bytes;
  };
  auto untouched = [](const lib_call<double>& c, const std::vector<std::vector<unsigned char>>& bytes) {
    for (std::size_t l = 0; l < bytes.size(); ++l)
      if (std::memcmp(bytes[l].data(), c.Gbuf[l].data(), bytes[l].size()) != 0) return false;
    return true;
  };
  for (coupling_form f : all_forms) {
    INFO(form_name(f));
    const moereg::coupling_loss loss{{1.0, f}};
    {  // shape mismatch: layer 1 has fewer rows
      lib_call<double> c(good);
      const auto b = poisoned(c);
      c.pv[1].rows = 11;
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      CHECK(untouched(c, b));
    }
    {  // layers with different E
      lib_call<double> c(good);
      const auto b = poisoned(c);
      c.pv[1].cols = 4;
      c.gv[1].cols = 4;
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      CHECK(untouched(c, b));
    }
    {  // gradient shape mismatch
      lib_call<double> c(good);
      const auto b = poisoned(c);
      c.gv[0].rows = 11;
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      CHECK(untouched(c, b));
    }
    {  // k > E
      problem p = good;
      p.k[1] = 6;
      p.I[1].assign(static_cast<std::size_t>(p.T * 6), -1);
      lib_call<double> c(p);
      const auto b = poisoned(c);
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      CHECK(untouched(c, b));
    }
    {  // index out of range
      problem p = good;
      p.I[0][7] = 5;
      lib_call<double> c(p, layout::row_major, true);
      const auto b = poisoned(c);
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      CHECK(untouched(c, b));
    }
    {  // repeated index in a row
      problem p = good;
      p.I[1][3 * 3 + 0] = 2;
      p.I[1][3 * 3 + 2] = 2;
      lib_call<double> c(p);
      const auto b = poisoned(c);
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      CHECK(untouched(c, b));
    }
    {  // too few layers
      lib_call<double> c(good);
      const auto b = poisoned(c);
      c.in.layers = 1;
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      CHECK_THROWS_AS(loss.value(c.in), moereg::error);
      CHECK_THROWS_AS(loss.local_stats(c.in), moereg::error);
      CHECK(untouched(c, b));
    }
    {  // mask of the wrong length, reduced statistics of the wrong size or not finite
      lib_call<double> c(good);
      const auto b = poisoned(c);
      c.in.mask = moereg::mask_view(good.mask.data(), 11);
      CHECK_THROWS_AS(loss.value_and_grad(c.in, c.gv.data()), moereg::error);
      c.in.mask = moereg::mask_view(good.mask.data(), 12);
      std::vector<double> st = loss.local_stats(c.in);
      st.push_back(1.0);
      CHECK_THROWS_AS(
          loss.value_and_grad(c.in, c.gv.data(), {}, moereg::stats_view{st.data(), static_cast<index_t>(st.size())}),
          moereg::error);
      st.pop_back();
      st.back() = std::numeric_limits<double>::infinity();
      CHECK_THROWS_AS(
          loss.value_and_grad(c.in, c.gv.data(), {}, moereg::stats_view{st.data(), static_cast<index_t>(st.size())}),
          moereg::error);
      CHECK(untouched(c, b));
    }
    {  // null pointers
      lib_call<double> c(good);
      const auto b = poisoned(c);
      CHECK_THROWS_AS(loss.value_and_grad(c.in, static_cast<const moereg::matrix_view<double>*>(nullptr)),
                      moereg::error);
      auto in = c.in;
      in.topk = nullptr;
      CHECK_THROWS_AS(loss.value_and_grad(in, c.gv.data()), moereg::error);
      CHECK(untouched(c, b));
    }
  }
}
