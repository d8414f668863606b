// Intra-layer specialization loss (LOSSES.md section 3): the CPU implementation against the
// naive float64 reference, finite differences, every layout, every storage type, threads,
// split statistics and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/specialization.hpp>
#include <moereg/testing/gradcheck.hpp>

#include "reference/reference.hpp"
#include "support/grad_buffers.hpp"
#include "support/random.hpp"

namespace {

using moereg::index_t;

// ---------------------------------------------------------------------------------------------
// A problem in logical form (token-major double activations) and its runs through the library
// in each layout. The same harness is used by test_orthogonality.cpp's copy.

struct problem {
  long long T = 0, k = 0, d = 0, E = 0;
  std::vector<double> H;           // [T, k, d]
  std::vector<long long> I;        // [T, k]
  std::vector<std::uint8_t> mask;  // [T] or empty
};

problem make_problem(std::uint64_t seed, long long T, long long k, long long d, double drop = 0.2, double pad = 0.2,
                     bool masked = true) {
  moereg_test::rng r(seed);
  problem p;
  p.T = T, p.k = k, p.d = d, p.E = k + 3;
  p.H = moereg_test::random_normal(r, static_cast<std::size_t>(T * k * d));
  p.I = moereg_test::random_topk(r, T, p.E, k, drop);
  if (masked) p.mask = moereg_test::random_mask(r, T, pad);
  return p;
}

std::vector<int> ref_mask(const problem& p) {
  return moereg_test::to_int_mask(p.mask);
}

template <class T>
T to_t(double v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return static_cast<T>(static_cast<float>(v));
}
template <class T>
double to_d(T v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return static_cast<double>(static_cast<float>(v));
}
/// The logical data after rounding to storage type T.
template <class T>
std::vector<double> rounded(const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_d(to_t<T>(v[i]));
  return out;
}

enum class lay { token_major, strided, grouped, padded };
const lay all_layouts[] = {lay::token_major, lay::strided, lay::grouped, lay::padded};

/// Index maps of the non-token-major layouts, built once per problem.
struct maps {
  std::vector<long long> row_of;  // grouped: [T, k] row or -1
  long long rows = 0;
  std::vector<long long> expert_of, pos_of;  // padded
  long long C = 0;
};

maps make_maps(const problem& p, std::uint64_t seed) {
  moereg_test::rng r(seed);
  maps m;
  const std::size_t n = static_cast<std::size_t>(p.T * p.k);
  // Grouped: every valid slot and about half of the dropped ones get a distinct row, in a
  // shuffled order; 3 rows stay unused.
  std::vector<std::size_t> with_row;
  for (std::size_t i = 0; i < n; ++i)
    if (p.I[i] >= 0 || r.uniform() < 0.5) with_row.push_back(i);
  m.rows = static_cast<long long>(with_row.size()) + 3;
  std::vector<long long> perm(static_cast<std::size_t>(m.rows));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), r.gen);
  m.row_of.assign(n, -1);
  for (std::size_t j = 0; j < with_row.size(); ++j) m.row_of[with_row[j]] = perm[j];
  // Padded: slot (t, s) sits in its expert's buffer at the next free position; capacity one
  // more than the busiest expert needs (so some positions stay unused).
  m.expert_of = p.I;
  m.pos_of.assign(n, -1);
  std::vector<long long> fill(static_cast<std::size_t>(p.E), 0);
  for (std::size_t i = 0; i < n; ++i)
    if (p.I[i] >= 0) m.pos_of[i] = fill[static_cast<std::size_t>(p.I[i])]++;
  m.C = 1 + (p.E > 0 ? *std::max_element(fill.begin(), fill.end()) : 0);
  return m;
}

struct run_opts {
  moereg::grad_options g{};
  std::vector<double> reduced;  // empty = local statistics
  int threads = 1;
  bool with_grad = true;                         // false: value() only
  const std::vector<double>* prefill = nullptr;  // logical [T, k, d] initial gradient (accumulate)
};

struct outcome {
  double value = 0;
  std::vector<double> grad;  // logical [T, k, d]; slots without storage read as 0
  bool untouched = true;     // storage mapped to no (token, slot) still holds the poison
};

// Poison for storage no slot maps to; chosen to be exactly representable in every type.
constexpr double poison = 12345.0;

template <class T, class Loss, template <class, class> class Inputs, class Layout>
outcome run_in(const Loss& loss, const problem& p, const Layout& xl, const Layout& gl, std::size_t xsize,
               std::size_t gsize, const run_opts& o) {
  const index_t T_ = p.T, k = p.k, d = p.d;
  std::vector<T> x(xsize, to_t<T>(poison)), g(gsize, to_t<T>(poison));
  std::vector<char> covered(gsize, 0);
  for (index_t t = 0; t < T_; ++t)
    for (index_t s = 0; s < k; ++s) {
      const index_t ox = xl.offset(t, s), og = gl.offset(t, s);
      for (index_t i = 0; i < d; ++i) {
        const std::size_t li = static_cast<std::size_t>((t * k + s) * d + i);
        if (ox >= 0) x[static_cast<std::size_t>(ox + i * xl.stride())] = to_t<T>(p.H[li]);
        if (og >= 0) {
          const std::size_t gi = static_cast<std::size_t>(og + i * gl.stride());
          covered[gi] = 1;
          if (o.prefill) g[gi] = to_t<T>((*o.prefill)[li]);
        }
      }
    }
  const std::vector<std::int64_t> I64(p.I.begin(), p.I.end());
  Inputs<T, Layout> in{{x.data(), xl}, moereg::topk_view(I64.data(), T_, k), moereg::mask_view{}};
  if (!p.mask.empty()) in.mask = moereg::mask_view(p.mask.data(), T_);
  moereg::stats_view st{};
  if (!o.reduced.empty()) st = moereg::stats_view{o.reduced.data(), static_cast<index_t>(o.reduced.size())};
  outcome out;
  moereg::activation_view<T, Layout> gv{g.data(), gl};
  // An overwrite-mode run goes through moereg_test::checked_grad (support/grad_buffers.hpp):
  // NaN in every entry before the call, so an entry the loss should write (zeros included)
  // but does not is caught, then the same call in accumulate mode on random values; storage
  // mapped to no (token, slot) must keep the sentinel.
  const bool checked = o.with_grad && !o.g.accumulate && o.prefill == nullptr;
  if (checked) {
    moereg_test::grad_check_options chk;
    chk.mapped = &covered;
    auto r = moereg_test::checked_grad<T>(
        gsize,
        [&](T* b, moereg::grad_options go) {
          return loss.value_and_grad(in, moereg::activation_view<T, Layout>{b, gl}, go, st, moereg::cpu{o.threads});
        },
        o.g, chk);
    out.value = r.value;
    g = std::move(r.grad);
  } else if (o.with_grad) {
    out.value = loss.value_and_grad(in, gv, o.g, st, moereg::cpu{o.threads});
  } else {
    out.value = loss.value(in, st, moereg::cpu{o.threads});
  }
  out.grad.assign(static_cast<std::size_t>(T_ * k * d), 0.0);
  for (index_t t = 0; t < T_; ++t)
    for (index_t s = 0; s < k; ++s) {
      const index_t og = gl.offset(t, s);
      if (og < 0) continue;
      for (index_t i = 0; i < d; ++i)
        out.grad[static_cast<std::size_t>((t * k + s) * d + i)] =
            to_d(g[static_cast<std::size_t>(og + i * gl.stride())]);
    }
  for (std::size_t i = 0; i < gsize; ++i)
    if (!covered[i] && !(checked ? std::isnan(to_d(g[i])) : to_d(g[i]) == to_d(to_t<T>(poison)))) out.untouched = false;
  return out;
}

template <class T, class Loss, template <class, class> class Inputs>
outcome run(const Loss& loss, const problem& p, lay L = lay::token_major, const run_opts& o = {}) {
  const index_t T_ = p.T, k = p.k, d = p.d;
  switch (L) {
    case lay::token_major: {
      const moereg::token_major l(T_, k, d);
      const std::size_t n = static_cast<std::size_t>(T_ * k * d);
      return run_in<T, Loss, Inputs>(loss, p, l, l, n, n, o);
    }
    case lay::strided: {
      // Input: element stride 2 and padded slots/tokens; gradient: element stride 3.
      const index_t ss = 2 * d + 3, ts = k * ss + 5, gss = 3 * d + 1, gts = k * gss + 2;
      const moereg::token_major xl(T_, k, d, ts, ss, 2), gl(T_, k, d, gts, gss, 3);
      return run_in<T, Loss, Inputs>(loss, p, xl, gl, static_cast<std::size_t>(T_ * ts + 1),
                                     static_cast<std::size_t>(T_ * gts + 1), o);
    }
    case lay::grouped: {
      const maps m = make_maps(p, 99);
      const std::vector<std::int64_t> rows(m.row_of.begin(), m.row_of.end());
      const moereg::topk_view map(rows.data(), T_, k);
      // Input rows padded to d + 4; gradient rows dense.
      const moereg::expert_grouped xl(map, m.rows, d, d + 4), gl(map, m.rows, d);
      return run_in<T, Loss, Inputs>(loss, p, xl, gl, static_cast<std::size_t>(m.rows * (d + 4)),
                                     static_cast<std::size_t>(m.rows * d), o);
    }
    default: {
      const maps m = make_maps(p, 98);
      const std::vector<std::int64_t> ex(m.expert_of.begin(), m.expert_of.end()), po(m.pos_of.begin(), m.pos_of.end());
      const moereg::topk_view ev(ex.data(), T_, k), pv(po.data(), T_, k);
      const moereg::capacity_padded l(ev, pv, p.E, m.C, d);
      const std::size_t n = static_cast<std::size_t>(p.E * m.C * d);
      return run_in<T, Loss, Inputs>(loss, p, l, l, n, n, o);
    }
  }
}

/// max over slot vectors of max_i |a - b| / max(max_i |b|, floor): every vector judged at its
/// own scale (a vector shorter than eps has a gradient of order 1/eps next to O(1) ones; a
/// vanishing gradient, e.g. d = 1 where every cosine is +-1, is rounding noise judged against
/// `floor`).
double slot_rel_diff(const std::vector<double>& a, const std::vector<double>& b, long long d, double floor) {
  double worst = 0;
  for (std::size_t v = 0; v + static_cast<std::size_t>(d) <= b.size(); v += static_cast<std::size_t>(d)) {
    double diff = 0, scale = 0;
    for (std::size_t i = v; i < v + static_cast<std::size_t>(d); ++i) {
      diff = std::max(diff, std::abs(a[i] - b[i]));
      scale = std::max(scale, std::abs(b[i]));
    }
    worst = std::max(worst, diff / std::max(scale, floor));
  }
  return worst;
}

// Tokens [b, e) of a problem.
problem slice(const problem& p, long long b, long long e) {
  problem q;
  q.T = e - b, q.k = p.k, q.d = p.d, q.E = p.E;
  q.H.assign(p.H.begin() + b * p.k * p.d, p.H.begin() + e * p.k * p.d);
  q.I.assign(p.I.begin() + b * p.k, p.I.begin() + e * p.k);
  if (!p.mask.empty()) q.mask.assign(p.mask.begin() + b, p.mask.begin() + e);
  return q;
}

// ---------------------------------------------------------------------------------------------
// Specialization-specific glue.

template <class T, class L>
using sp_in = moereg::specialization_inputs<T, L>;

moereg::specialization_loss make_loss(double coef, bool mean, double eps = 1e-8) {
  moereg::specialization_loss l{};
  l.cfg.coef = coef;
  l.cfg.eps = eps;
  l.cfg.pairs = mean ? moereg::sp_pairs::mean : moereg::sp_pairs::sum;
  return l;
}

moereg_ref::result reference(const moereg::specialization_loss& l, const problem& p, const std::vector<double>& H) {
  return moereg_ref::specialization(H, p.I, ref_mask(p), p.T, p.k, p.d, l.cfg.coef,
                                    l.cfg.pairs == moereg::sp_pairs::mean, l.cfg.eps);
}

template <class T>
outcome sp_run(const moereg::specialization_loss& l, const problem& p, lay L = lay::token_major,
               const run_opts& o = {}) {
  return run<T, moereg::specialization_loss, sp_in>(l, p, L, o);
}

}  // namespace

TEST_CASE("specialization: matches the float64 reference", "[specialization]") {
  for (long long k : {1, 2, 3, 4, 5, 6, 7, 8, 12, 16})
    for (long long d : {1, 7, 33})
      for (bool mean : {false, true}) {
        CAPTURE(k, d, mean);
        problem p = make_problem(static_cast<std::uint64_t>(k * 100 + d), 37, k, d);
        if (k >= 2) {
          // token 0 is valid: give it an all-zero vector and a vector shorter than eps.
          for (long long s = 0; s < k; ++s) p.I[static_cast<std::size_t>(s)] = s;
          // (Not for d = 1: there every gradient other than the short vector's is an exact
          // cancellation of O(1/eps) terms, i.e. pure rounding noise.)
          for (long long i = 0; i < d; ++i) {
            p.H[static_cast<std::size_t>(i)] = 0.0;
            if (d > 1) p.H[static_cast<std::size_t>(d + i)] *= 1e-10;
          }
        }
        const auto loss = make_loss(0.7, mean);
        const auto ref = reference(loss, p, p.H);
        const auto got = sp_run<double>(loss, p);
        REQUIRE(std::isfinite(got.value));
        REQUIRE(got.value == Approx(ref.value).epsilon(1e-12).margin(1e-300));
        if (d > 1) {
          REQUIRE(slot_rel_diff(got.grad, ref.grad, d, 1e-2) <= 1e-12);
        } else {
          // d = 1: |c| = 1 whatever the lengths, so every true gradient is 0 and both sides are
          // rounding noise (of order 1e-16 / |h|).
          for (double v : got.grad) REQUIRE(std::abs(v) <= 1e-9);
        }
        if (k >= 2) REQUIRE(ref.value > 0);
        const auto val = sp_run<double>(loss, p, lay::token_major, run_opts{{}, {}, 1, false});
        REQUIRE(val.value == got.value);
      }
}

TEST_CASE("specialization: gradient matches finite differences", "[specialization]") {
  struct cfg {
    long long T, k, d;
    bool mean;
    double eps;
    double scale0;  // scale of slot 0's vector of token 0 (below eps: clamp branch)
  };
  for (const cfg c : {cfg{6, 4, 5, false, 1e-8, 1.0}, cfg{5, 3, 7, true, 1e-8, 1.0}, cfg{4, 6, 3, false, 1e-8, 1.0},
                      cfg{3, 8, 4, true, 1e-8, 1.0}, cfg{5, 5, 2, false, 1e-8, 1.0}, cfg{4, 3, 5, false, 0.5, 0.02}}) {
    CAPTURE(c.T, c.k, c.d, c.mean, c.eps);
    problem p = make_problem(static_cast<std::uint64_t>(c.T * 7 + c.k), c.T, c.k, c.d, 0.2, 0.25);
    for (long long s = 0; s < c.k; ++s) p.I[static_cast<std::size_t>(s)] = s;  // token 0: all slots valid
    for (long long i = 0; i < c.d; ++i) p.H[static_cast<std::size_t>(i)] *= c.scale0;
    const auto loss = make_loss(1.0, c.mean, c.eps);
    const auto got = sp_run<double>(loss, p);
    auto f = [&](const double* x) {
      problem q = p;
      q.H.assign(x, x + p.H.size());
      return sp_run<double>(loss, q, lay::token_major, run_opts{{}, {}, 1, false}).value;
    };
    const auto rep = moereg::testing::gradcheck(f, p.H, got.grad);
    INFO(rep.summary());
    REQUIRE(rep.ok);
    REQUIRE(moereg_test::max_abs(got.grad) > 1e-3);  // gradients are O(1): the check is not vacuous
  }
}

TEST_CASE("specialization: every layout gives bitwise the same value and gradient", "[specialization]") {
  for (long long k : {2, 5, 8})
    for (long long d : {16, 33}) {
      CAPTURE(k, d);
      const problem p = make_problem(static_cast<std::uint64_t>(500 + k * 10 + d), 45, k, d);
      const auto loss = make_loss(2e-3, false);
      const auto base_f = sp_run<float>(loss, p);
      const auto base_d = sp_run<double>(loss, p);
      const auto base_b = sp_run<moereg::bfloat16>(loss, p);
      const auto ref = reference(loss, p, p.H);
      REQUIRE(moereg_test::rel_diff(base_d.grad, ref.grad) <= 1e-12);
      for (lay L : all_layouts) {
        CAPTURE(static_cast<int>(L));
        const auto f = sp_run<float>(loss, p, L);
        const auto dd = sp_run<double>(loss, p, L);
        const auto b = sp_run<moereg::bfloat16>(loss, p, L);
        REQUIRE(f.value == base_f.value);
        REQUIRE(f.grad == base_f.grad);
        REQUIRE(dd.value == base_d.value);
        REQUIRE(dd.grad == base_d.grad);
        REQUIRE(b.value == base_b.value);
        REQUIRE(b.grad == base_b.grad);
        REQUIRE(f.untouched);
        REQUIRE(dd.untouched);
        REQUIRE(b.untouched);
      }
    }
}

TEST_CASE("specialization: storage types", "[specialization]") {
  const problem p = make_problem(77, 50, 6, 40);
  for (bool mean : {false, true}) {
    const auto loss = make_loss(1.0, mean);
    const auto ref = reference(loss, p, p.H);
    const auto f = sp_run<float>(loss, p);
    REQUIRE(f.value == Approx(ref.value).epsilon(1e-5));
    REQUIRE(moereg_test::rel_diff(f.grad, ref.grad) <= 1e-5);
    // 16-bit storage against the reference on the rounded data.
    const auto rh = reference(loss, p, rounded<moereg::half>(p.H));
    const auto h = sp_run<moereg::half>(loss, p);
    REQUIRE(h.value == Approx(rh.value).epsilon(1e-2));
    REQUIRE(moereg_test::rel_diff(h.grad, rh.grad) <= 1e-2);
    const auto rb = reference(loss, p, rounded<moereg::bfloat16>(p.H));
    const auto b = sp_run<moereg::bfloat16>(loss, p);
    REQUIRE(b.value == Approx(rb.value).epsilon(1e-2));
    REQUIRE(moereg_test::rel_diff(b.grad, rb.grad) <= 1e-2);
  }
}

TEST_CASE("specialization: grad_scale and accumulate", "[specialization]") {
  const problem p = make_problem(31, 40, 4, 9);
  moereg_test::rng r(5);
  const auto pre = moereg_test::random_normal(r, p.H.size());
  const auto loss = make_loss(0.5, false);
  const auto ref = reference(loss, p, p.H);
  for (lay L : all_layouts) {
    CAPTURE(static_cast<int>(L));
    const auto scaled = sp_run<double>(loss, p, L, run_opts{{2.5, false}, {}, 1, true, &pre});
    const auto acc = sp_run<double>(loss, p, L, run_opts{{2.5, true}, {}, 1, true, &pre});
    REQUIRE(scaled.value == Approx(ref.value).epsilon(1e-12));
    REQUIRE(acc.value == Approx(ref.value).epsilon(1e-12));
    const auto plain = sp_run<double>(loss, p, L);
    for (long long t = 0; t < p.T; ++t)
      for (long long s = 0; s < p.k; ++s) {
        const bool valid =
            (p.mask.empty() || p.mask[static_cast<std::size_t>(t)]) && p.I[static_cast<std::size_t>(t * p.k + s)] >= 0;
        for (long long i = 0; i < p.d; ++i) {
          const std::size_t li = static_cast<std::size_t>((t * p.k + s) * p.d + i);
          REQUIRE(scaled.grad[li] == Approx(2.5 * ref.grad[li]).epsilon(1e-12).margin(1e-15));
          if (plain.grad[li] == 0.0 && !valid) {
            // no gradient here: overwrite wrote 0 (or there is no storage), accumulate left the buffer
            REQUIRE(scaled.grad[li] == 0.0);
            if (L == lay::token_major || L == lay::strided) REQUIRE(acc.grad[li] == pre[li]);
          } else {
            REQUIRE(acc.grad[li] == Approx(pre[li] + 2.5 * ref.grad[li]).epsilon(1e-12).margin(1e-14));
          }
        }
      }
  }
}

TEST_CASE("specialization: 1 and 2 threads give bitwise the same result", "[specialization]") {
  const problem p = make_problem(41, 700, 8, 24);
  const auto loss = make_loss(2e-3, false);
  const auto a = sp_run<float>(loss, p, lay::token_major, run_opts{{}, {}, 1});
  const auto b = sp_run<float>(loss, p, lay::token_major, run_opts{{}, {}, 2});
  REQUIRE(a.value == b.value);
  REQUIRE(a.grad == b.grad);
  const auto c = sp_run<double>(loss, p, lay::grouped, run_opts{{}, {}, 1});
  const auto e = sp_run<double>(loss, p, lay::grouped, run_opts{{}, {}, 2});
  REQUIRE(c.value == e.value);
  REQUIRE(c.grad == e.grad);
}

TEST_CASE("specialization: split statistics reproduce the whole batch", "[specialization]") {
  const problem p = make_problem(51, 700, 6, 20);
  for (bool mean : {false, true}) {
    const auto loss = make_loss(1e-2, mean);
    const auto whole_f = sp_run<float>(loss, p);
    const auto whole_d = sp_run<double>(loss, p);
    const long long cuts[] = {0, 137, 560, 700};
    std::vector<double> reduced(1, 0.0);
    for (int i = 0; i < 3; ++i) {
      const problem q = slice(p, cuts[i], cuts[i + 1]);
      const std::vector<std::int64_t> I64(q.I.begin(), q.I.end());
      const std::vector<double> X(q.H.size(), 0.0);
      sp_in<double, moereg::token_major> in{moereg::token_major_view(X.data(), q.T, q.k, q.d),
                                            moereg::topk_view(I64.data(), q.T, q.k),
                                            moereg::mask_view(q.mask.data(), q.T)};
      REQUIRE(loss.stats_size(in) == 1);
      const auto s = loss.local_stats(in);
      reduced[0] += s[0];
    }
    REQUIRE(reduced[0] == static_cast<double>(std::count(p.mask.begin(), p.mask.end(), std::uint8_t(1))));
    double sum_f = 0, sum_d = 0;
    for (int i = 0; i < 3; ++i) {
      const problem q = slice(p, cuts[i], cuts[i + 1]);
      const auto pf = sp_run<float>(loss, q, lay::token_major, run_opts{{}, reduced, 1});
      const auto pd = sp_run<double>(loss, q, lay::token_major, run_opts{{}, reduced, 2});
      sum_f += pf.value;
      sum_d += pd.value;
      const std::size_t off = static_cast<std::size_t>(cuts[i] * p.k * p.d);
      for (std::size_t j = 0; j < pf.grad.size(); ++j) {
        REQUIRE(pf.grad[j] == whole_f.grad[off + j]);
        REQUIRE(pd.grad[j] == whole_d.grad[off + j]);
      }
    }
    REQUIRE(sum_d == Approx(whole_d.value).epsilon(1e-12));
    REQUIRE(sum_f == Approx(whole_f.value).epsilon(1e-5));
  }
}

TEST_CASE("specialization: empty and fully padded batches", "[specialization]") {
  const auto loss = make_loss(1.0, false);
  for (lay L : all_layouts) {
    problem empty = make_problem(1, 0, 4, 8);
    const auto e = sp_run<float>(loss, empty, L);
    REQUIRE(e.value == 0.0);
    REQUIRE(e.untouched);
    problem pad = make_problem(2, 20, 4, 8);
    std::fill(pad.mask.begin(), pad.mask.end(), std::uint8_t(0));
    const auto z = sp_run<float>(loss, pad, L);
    REQUIRE(z.value == 0.0);
    for (double g : z.grad) REQUIRE(g == 0.0);  // written as zeros, not left as poison
    REQUIRE(z.untouched);
    problem zero_d = make_problem(5, 10, 3, 0);  // d = 0: empty vectors, no cosine
    const auto zd = sp_run<float>(loss, zero_d, L);
    REQUIRE(zd.value == 0.0);
    REQUIRE(zd.untouched);
    problem none = make_problem(3, 20, 4, 8);
    std::fill(none.I.begin(), none.I.end(), -1);  // every slot dropped: T_v > 0 but no pair
    const auto n = sp_run<double>(loss, none, L);
    REQUIRE(n.value == 0.0);
    for (double g : n.grad) REQUIRE(g == 0.0);
  }
  // Reduced statistics with T_v = 0 (and local tokens): 0 and zero gradient, never NaN.
  problem p = make_problem(4, 10, 3, 5);
  const auto z = sp_run<double>(loss, p, lay::token_major, run_opts{{}, {0.0}, 1});
  REQUIRE(z.value == 0.0);
  for (double g : z.grad) REQUIRE(g == 0.0);
}

TEST_CASE("specialization: bad input throws and writes nothing", "[specialization]") {
  const long long T = 6, k = 3, d = 4;
  std::vector<float> x(static_cast<std::size_t>(T * k * d), 1.0f);
  std::vector<float> g(x.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<std::int32_t> I = {0, 1, 2, 3, -1, 1, 2, 0, 4, 1, 2, 3, 0, -1, -1, 4, 3, 2};
  const auto loss = make_loss(1.0, false);
  auto check_throws = [&](auto&& call) {
    std::vector<float> before = g;
    REQUIRE_THROWS_AS(call(), moereg::error);
    REQUIRE(std::memcmp(before.data(), g.data(), g.size() * sizeof(float)) == 0);
  };
  using L = moereg::token_major;
  auto in = [&]() {
    return sp_in<float, L>{moereg::token_major_view<const float>(x.data(), T, k, d), moereg::topk_view(I.data(), T, k)};
  };
  auto gv = [&]() { return moereg::token_major_view(g.data(), T, k, d); };
  // A good call works (and is what the bad ones are variations of).
  {
    auto g2 = g;
    REQUIRE_NOTHROW(loss.value_and_grad(in(), moereg::token_major_view(g2.data(), T, k, d)));
  }
  check_throws([&] {  // k above the limit
    std::vector<std::int32_t> wide(static_cast<std::size_t>(T * 17), -1);
    std::vector<float> xw(static_cast<std::size_t>(T * 17 * d));
    sp_in<float, L> w{moereg::token_major_view<const float>(xw.data(), T, 17, d),
                      moereg::topk_view(wide.data(), T, 17)};
    loss.value_and_grad(w, moereg::token_major_view(g.data(), T, 17, d));
  });
  check_throws([&] {  // layout tokens != topk rows
    auto i2 = in();
    i2.acts.layout = L(T + 1, k, d);
    loss.value_and_grad(i2, gv());
  });
  check_throws([&] {  // gradient shape
    loss.value_and_grad(in(), moereg::token_major_view(g.data(), T, k, d - 1));
  });
  check_throws([&] {  // repeated expert
    auto I2 = I;
    I2[4] = 3;
    sp_in<float, L> i2{moereg::token_major_view<const float>(x.data(), T, k, d), moereg::topk_view(I2.data(), T, k)};
    loss.value_and_grad(i2, gv());
  });
  check_throws([&] {  // expert id >= num_experts
    auto i2 = in();
    i2.num_experts = 4;
    loss.value_and_grad(i2, gv());
  });
  check_throws([&] {  // k > num_experts
    auto i2 = in();
    i2.num_experts = 2;
    loss.value_and_grad(i2, gv());
  });
  check_throws([&] {  // null activations
    auto i2 = in();
    i2.acts.data = nullptr;
    loss.value_and_grad(i2, gv());
  });
  check_throws([&] {  // null gradient
    loss.value_and_grad(in(), moereg::activation_view<float, L>{nullptr, L(T, k, d)});
  });
  check_throws([&] {  // mask of the wrong length
    std::vector<std::uint8_t> m(static_cast<std::size_t>(T - 1), 1);
    auto i2 = in();
    i2.mask = moereg::mask_view(m.data(), T - 1);
    loss.value_and_grad(i2, gv());
  });
  check_throws([&] {  // eps <= 0
    auto l2 = loss;
    l2.cfg.eps = 0;
    l2.value_and_grad(in(), gv());
  });
  check_throws([&] {  // reduced statistics of the wrong size
    const double st[2] = {6, 6};
    loss.value_and_grad(in(), gv(), {}, moereg::stats_view{st, 2});
  });
  check_throws([&] {  // negative reduced statistics
    const double st[1] = {-1};
    loss.value_and_grad(in(), gv(), {}, moereg::stats_view{st, 1});
  });
  // Expert-grouped maps: out of range, duplicated, missing for a valid slot.
  using EG = moereg::expert_grouped;
  std::vector<std::int32_t> rows(static_cast<std::size_t>(T * k));
  std::iota(rows.begin(), rows.end(), 0);
  auto eg_call = [&](const std::vector<std::int32_t>& r, index_t nrows) {
    const EG l(moereg::topk_view(r.data(), T, k), nrows, d);
    sp_in<float, EG> i2{{x.data(), l}, moereg::topk_view(I.data(), T, k)};
    loss.value_and_grad(i2, moereg::activation_view<float, EG>{g.data(), l});
  };
  REQUIRE_NOTHROW([&] {
    auto g2 = g;
    const EG l(moereg::topk_view(rows.data(), T, k), T * k, d);
    sp_in<float, EG> i2{{x.data(), l}, moereg::topk_view(I.data(), T, k)};
    loss.value_and_grad(i2, moereg::activation_view<float, EG>{g2.data(), l});
  }());
  check_throws([&] {
    auto r = rows;
    r[5] = static_cast<std::int32_t>(T * k);
    eg_call(r, T * k);
  });
  check_throws([&] {
    auto r = rows;
    r[5] = r[2];
    eg_call(r, T * k);
  });
  check_throws([&] {
    auto r = rows;
    r[0] = -1;  // slot (0, 0) is valid
    eg_call(r, T * k);
  });
  // Capacity-padded: position out of range.
  check_throws([&] {
    std::vector<std::int32_t> pos(static_cast<std::size_t>(T * k), 0);
    for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int32_t>(i / static_cast<std::size_t>(k));
    pos[1] = 99;
    const moereg::capacity_padded l(moereg::topk_view(I.data(), T, k), moereg::topk_view(pos.data(), T, k), 5, T, d);
    sp_in<float, moereg::capacity_padded> i2{{x.data(), l}, moereg::topk_view(I.data(), T, k)};
    loss.value_and_grad(i2, moereg::activation_view<float, moereg::capacity_padded>{g.data(), l});
  });
  // The value-only and statistics entry points validate too.
  REQUIRE_THROWS_AS(loss.value(sp_in<float, L>{{nullptr, L(T, k, d)}, moereg::topk_view(I.data(), T, k)}),
                    moereg::error);
  REQUIRE_THROWS_AS(loss.local_stats(sp_in<float, L>{{nullptr, L(T, k, d)}, moereg::topk_view(I.data(), T, k)}),
                    moereg::error);
}

TEST_CASE("specialization: expert ids are free without num_experts, repeats are not", "[specialization]") {
  std::vector<float> x(2 * 2 * 3, 0.5f), g(x.size());
  x[0] = 2.0f;
  std::vector<std::int64_t> I = {1000, 7, 3, 123456};
  const auto loss = make_loss(1.0, false);
  moereg::specialization_inputs<float, moereg::token_major> in{moereg::token_major_view<const float>(x.data(), 2, 2, 3),
                                                               moereg::topk_view(I.data(), 2, 2)};
  REQUIRE(loss.value_and_grad(in, moereg::token_major_view(g.data(), 2, 2, 3)) > 0.0);
  I[3] = 3;
  REQUIRE_THROWS_AS(loss.value(in), moereg::error);
}
