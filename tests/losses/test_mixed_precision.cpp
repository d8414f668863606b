// Mixed-precision gradients (a gradient buffer whose storage type is not the input's: a float
// gradient for bfloat16 or half inputs, the layout trainers keep). For every loss family and
// engine (row engine, sequence-scope load balancing, fusion, Gram engine on two layouts,
// coupling in token and batch form), and for the pairs bfloat16/float, half/float,
// float/double and double/float:
// - the value is bitwise the same-type call's;
// - overwrite: the narrower of the two gradients is bitwise the wider one rounded once (the
//   wider holds the engine's accumulator values exactly);
// - accumulate: each element is the caller's value plus the accumulator value, added in the
//   wider of the two accumulator types and rounded once into the gradient's type;
// - the result does not depend on what the buffer held before an overwrite call.
// The same-type gradients are the ones every other test checks against finite differences and
// the naive references.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/fuse.hpp>

#include "support/random.hpp"

using moereg::index_t;
using namespace moereg_test;

namespace {

template <class In, class Grad>
struct storage_pair {
  using input = In;
  using grad = Grad;
};
using pairs = std::tuple<storage_pair<moereg::bfloat16, float>, storage_pair<moereg::half, float>,
                         storage_pair<float, double>, storage_pair<double, float>>;

template <class S>
std::vector<S> stored(const std::vector<double>& v) {
  std::vector<S> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) moereg::store(out[i], v[i]);
  return out;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  static_assert(sizeof(A) == sizeof(B), "compare values of one size");
  return std::memcmp(&a, &b, sizeof(A)) == 0;
}

/// x rounded into storage type S.
template <class S, class X>
S round_to(X x) {
  S s{};
  moereg::store(s, x);
  return s;
}

/// Runs `call(grad_pointer, opts)` (a generic lambda that makes a gradient view of `n`
/// elements of the pointer's storage type and returns the value) with T and U gradients and
/// checks the rules in the file comment.
template <class T, class U, class Call>
void check_mixed(std::size_t n, Call&& call) {
  moereg::grad_options o;
  o.grad_scale = 0.75;
  std::vector<T> gt = stored<T>(std::vector<double>(n, 5.0));
  std::vector<U> gu = stored<U>(std::vector<double>(n, 5.0));
  const double vt = call(gt.data(), o);
  const double vu = call(gu.data(), o);
  CHECK(same_bits(vt, vu));
  CHECK(vt == call(static_cast<T*>(nullptr), o));  // value only: no gradient view

  // overwrite: narrow == round(wide), the wide one holding the accumulator values
  constexpr bool u_wider = sizeof(U) > sizeof(T);
  std::vector<double> acc(n);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (u_wider) {
      acc[i] = static_cast<double>(gu[i]);
      bad += same_bits(round_to<T>(gu[i]), gt[i]) ? 0 : 1;
    } else {
      acc[i] = static_cast<double>(gt[i]);
      bad += same_bits(round_to<U>(gt[i]), gu[i]) ? 0 : 1;
    }
  }
  CHECK(bad == 0);
  double written = 0;
  for (double a : acc) written = std::max(written, std::abs(a));
  CHECK(written > 0);  // the case has a gradient at all

  // overwrite does not read the buffer
  std::vector<U> gu2 = stored<U>(std::vector<double>(n, -3.0));
  (void)call(gu2.data(), o);
  CHECK(std::memcmp(gu2.data(), gu.data(), n * sizeof(U)) == 0);

  // accumulate in U: g0 + a in the wider accumulator type, rounded once
  rng r(99);
  const std::vector<U> g0 = stored<U>(random_normal(r, n, 0.5));
  std::vector<U> g1 = g0;
  moereg::grad_options oa = o;
  oa.accumulate = true;
  CHECK(same_bits(call(g1.data(), oa), vt));
  using W = std::common_type_t<moereg::accumulator_t<T>, moereg::accumulator_t<U>>;
  bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const W expect = static_cast<W>(moereg::load(g0[i])) + static_cast<W>(acc[i]);
    bad += same_bits(round_to<U>(expect), g1[i]) ? 0 : 1;
  }
  CHECK(bad == 0);
}

struct router_data {
  index_t T = 37, E = 11, k = 3;
  std::vector<double> probs, logits;
  std::vector<std::int64_t> topk, cu;
  std::vector<std::uint8_t> mask;
  router_data() {
    rng r(7);
    probs = random_probs(r, T, E);
    logits = random_normal(r, static_cast<std::size_t>(T * E), 3.0);
    topk = random_topk<std::int64_t>(r, T, E, k, 0.2);
    mask = random_mask(r, T, 0.25);
    cu = {0, 5, 5, 20, T};
  }
  std::size_t size() const { return static_cast<std::size_t>(T * E); }
};

}  // namespace

TEMPLATE_LIST_TEST_CASE("mixed precision: router losses on the row engine", "[mixed][row]", pairs) {
  using T = typename TestType::input;
  using U = typename TestType::grad;
  const router_data d;
  const std::vector<T> P = stored<T>(d.probs), Z = stored<T>(d.logits);
  const moereg::routing_view<T> pv(P.data(), d.T, d.E), zv(Z.data(), d.T, d.E);
  const moereg::topk_view I(d.topk.data(), d.T, d.k);
  const moereg::mask_view m(d.mask.data(), d.T);
  // The gradient view of a call: contiguous (in place when it is in the accumulator type).
  const auto grad = [&](auto* g) { return moereg::matrix_view<std::remove_pointer_t<decltype(g)>>(g, d.T, d.E); };
  const auto run = [&](const auto& loss, const auto& in) {
    check_mixed<T, U>(d.size(), [&](auto* g, moereg::grad_options o) {
      return g == nullptr ? loss.value(in) : loss.value_and_grad(in, grad(g), o);
    });
  };
  SECTION("z_loss") {
    run(moereg::z_loss{{0.6}}, moereg::z_loss_inputs<T>{zv, m});
  }
  SECTION("entropy") {
    run(moereg::entropy_loss{}, moereg::entropy_inputs<T>{pv, m});
  }
  SECTION("importance") {
    run(moereg::importance_loss{}, moereg::importance_inputs<T>{pv, m});
  }
  SECTION("variance, both axes") {
    moereg::variance_loss v{};
    run(v, moereg::variance_inputs<T>{pv, m});
    v.cfg.axis = moereg::variance_axis::experts;
    run(v, moereg::variance_inputs<T>{pv, m});
  }
  SECTION("load balancing, micro and global scopes") {
    run(moereg::load_balancing_loss{{0.4, moereg::lb_scope::micro}}, moereg::load_balancing_inputs<T>{pv, I, m});
    run(moereg::load_balancing_loss{{0.4, moereg::lb_scope::global}}, moereg::load_balancing_inputs<T>{pv, I, m});
  }
  SECTION("load balancing, sequence scope (its own engine)") {
    moereg::load_balancing_inputs<T> in{pv, I, m};
    in.cu_seqlens = moereg::offsets_view(d.cu.data(), static_cast<index_t>(d.cu.size()));
    run(moereg::load_balancing_loss{{0.4, moereg::lb_scope::sequence}}, in);
  }
  SECTION("a strided gradient (row stride E + 2, the buffered path)") {
    const index_t rs = d.E + 2;
    const moereg::entropy_loss loss{};
    const moereg::entropy_inputs<T> in{pv, m};
    std::vector<T> gt(static_cast<std::size_t>(d.T * rs), round_to<T>(2.0));
    std::vector<U> gu(gt.size(), round_to<U>(2.0));
    (void)loss.value_and_grad(in, moereg::matrix_view<T>(gt.data(), d.T, d.E, rs));
    (void)loss.value_and_grad(in, moereg::matrix_view<U>(gu.data(), d.T, d.E, rs));
    std::size_t bad = 0;
    for (std::size_t i = 0; i < gt.size(); ++i)
      bad += sizeof(U) > sizeof(T) ? !same_bits(round_to<T>(gu[i]), gt[i]) : !same_bits(round_to<U>(gt[i]), gu[i]);
    CHECK(bad == 0);
    CHECK(gu[static_cast<std::size_t>(d.E)] == U(2.0f));  // the padding is left alone
  }
  SECTION("the call context form") {
    std::vector<T> gt(d.size());
    std::vector<U> gu(d.size());
    const moereg::z_loss loss{};
    const moereg::z_loss_inputs<T> in{zv, m};
    const double a = loss.value_and_grad(in, grad(gu.data()), moereg::on(moereg::cpu{}).with_grad_scale(0.5));
    const double b = loss.value_and_grad(in, grad(gt.data()), moereg::on(moereg::cpu{}).with_grad_scale(0.5));
    CHECK(same_bits(a, b));
    std::vector<U> gu2(d.size());
    loss.backward(in, grad(gu2.data()), moereg::on(moereg::cpu{}).with_grad_scale(0.5));
    CHECK(std::memcmp(gu.data(), gu2.data(), gu.size() * sizeof(U)) == 0);
  }
}

TEMPLATE_LIST_TEST_CASE("mixed precision: fused router losses, one gradient shared", "[mixed][fuse]", pairs) {
  using T = typename TestType::input;
  using U = typename TestType::grad;
  const router_data d;
  const std::vector<T> P = stored<T>(d.probs);
  const moereg::routing_view<T> pv(P.data(), d.T, d.E);
  const moereg::load_balancing_inputs<T> lb_in{pv, moereg::topk_view(d.topk.data(), d.T, d.k),
                                               moereg::mask_view(d.mask.data(), d.T)};
  const moereg::entropy_inputs<T> ent_in{pv, moereg::mask_view(d.mask.data(), d.T)};
  const moereg::variance_inputs<T> var_in{pv, moereg::mask_view(d.mask.data(), d.T)};
  const auto f = moereg::fuse(moereg::load_balancing_loss{}, moereg::entropy_loss{}, moereg::variance_loss{});
  check_mixed<T, U>(d.size(), [&](auto* g, moereg::grad_options o) {
    using S = std::remove_pointer_t<decltype(g)>;
    const auto in = std::tie(lb_in, ent_in, var_in);
    if (g == nullptr) return f.value(in)[0];
    const moereg::matrix_view<S> gv(g, d.T, d.E);                    // every loss adds into the same view
    return f.value_and_grad(in, std::make_tuple(gv, gv, gv), o)[0];  // the others are checked below
  });
  // every value of the fused call is the same-type call's
  std::vector<T> gt(d.size());
  std::vector<U> gu(d.size());
  const auto in = std::tie(lb_in, ent_in, var_in);
  const moereg::matrix_view<T> gtv(gt.data(), d.T, d.E);
  const moereg::matrix_view<U> guv(gu.data(), d.T, d.E);
  const auto vt = f.value_and_grad(in, std::make_tuple(gtv, gtv, gtv));
  const auto vu = f.value_and_grad(in, std::make_tuple(guv, guv, guv));
  for (int i = 0; i < 3; ++i) CHECK(same_bits(vt[i], vu[i]));
}

TEMPLATE_LIST_TEST_CASE("mixed precision: Gram losses, token-major and expert-grouped", "[mixed][gram]", pairs) {
  using T = typename TestType::input;
  using U = typename TestType::grad;
  const index_t ntok = 23, E = 9;
  rng r(3);
  for (const index_t k : {index_t(3), index_t(5)})
    for (const index_t dim : {index_t(13), index_t(37)}) {
      CAPTURE(k, dim);
      const std::size_t n = static_cast<std::size_t>(ntok * k * dim);
      const std::vector<T> H = stored<T>(random_normal(r, n));
      const std::vector<std::int64_t> topk = random_topk<std::int64_t>(r, ntok, E, k, 0.2);
      const std::vector<std::uint8_t> mask = random_mask(r, ntok, 0.2);
      const moereg::topk_view I(topk.data(), ntok, k);
      const moereg::mask_view m(mask.data(), ntok);
      const moereg::activation_view<const T, moereg::token_major> tm(H.data(), moereg::token_major(ntok, k, dim));
      // expert-grouped: the (token, slot) vectors in reverse order, one row each
      std::vector<std::int64_t> row_map(static_cast<std::size_t>(ntok * k));
      for (std::size_t i = 0; i < row_map.size(); ++i) row_map[i] = static_cast<std::int64_t>(row_map.size() - 1 - i);
      const moereg::topk_view R(row_map.data(), ntok, k);
      const index_t rows = ntok * k;
      const moereg::activation_view<const T, moereg::expert_grouped> eg(H.data(), moereg::expert_grouped(R, rows, dim));
      const auto gram_run = [&](const auto& loss, const auto& in, auto layout) {
        check_mixed<T, U>(n, [&](auto* g, moereg::grad_options o) {
          using S = std::remove_pointer_t<decltype(g)>;
          if (g == nullptr) return loss.value(in);
          return loss.value_and_grad(in, moereg::activation_view<S, decltype(layout)>(g, layout), o);
        });
      };
      moereg::specialization_loss sp{};
      sp.cfg.coef = 0.4;
      moereg::orthogonality_loss orth{};
      orth.cfg.coef = 0.3;
      gram_run(sp, moereg::specialization_inputs<T, moereg::token_major>{tm, I, m, E}, tm.layout);
      gram_run(sp, moereg::specialization_inputs<T, moereg::expert_grouped>{eg, I, m, E}, eg.layout);
      gram_run(orth, moereg::orthogonality_inputs<T, moereg::token_major>{tm, I, m, E}, tm.layout);
      gram_run(orth, moereg::orthogonality_inputs<T, moereg::expert_grouped>{eg, I, m, E}, eg.layout);
    }
}

TEMPLATE_LIST_TEST_CASE("mixed precision: coupling, token and batch forms", "[mixed][coupling]", pairs) {
  using T = typename TestType::input;
  using U = typename TestType::grad;
  const index_t ntok = 29, E = 7, k = 2, L = 3;
  rng r(5);
  std::vector<std::vector<T>> P;
  std::vector<std::vector<std::int64_t>> topk;
  std::vector<moereg::routing_view<T>> pv;
  std::vector<moereg::topk_view> iv;
  for (index_t l = 0; l < L; ++l) {
    P.push_back(stored<T>(random_probs(r, ntok, E)));
    topk.push_back(random_topk<std::int64_t>(r, ntok, E, k, 0.2));
  }
  for (index_t l = 0; l < L; ++l) {
    pv.emplace_back(P[static_cast<std::size_t>(l)].data(), ntok, E);
    iv.emplace_back(topk[static_cast<std::size_t>(l)].data(), ntok, k);
  }
  const std::vector<std::uint8_t> mask = random_mask(r, ntok, 0.2);
  const moereg::coupling_inputs<T> in{pv.data(), iv.data(), L, moereg::mask_view(mask.data(), ntok)};
  for (const auto form : {moereg::coupling_form::token, moereg::coupling_form::log, moereg::coupling_form::batch}) {
    CAPTURE(static_cast<int>(form));
    moereg::coupling_loss loss{};
    loss.cfg.coef = 0.5;
    loss.cfg.form = form;
    check_mixed<T, U>(static_cast<std::size_t>(L * ntok * E), [&](auto* g, moereg::grad_options o) {
      using S = std::remove_pointer_t<decltype(g)>;
      if (g == nullptr) return loss.value(in);
      std::vector<moereg::matrix_view<S>> gv;
      for (index_t l = 0; l < L; ++l) gv.emplace_back(g + l * ntok * E, ntok, E);
      return loss.value_and_grad(in, gv.data(), o);
    });
  }
}
