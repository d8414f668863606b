// Optimisation-level matrix, router side: load balancing (micro and sequence scope, with
// cu_seqlens that have empty sequences and a valid last row), z-loss, entropy, importance,
// variance (both axes), coupling (every form), the bias update and the softmax chain helper,
// in double, float and bfloat16, against the float64 reference. Gradient buffers start as NaN.
#include "matrix/matrix_support.hpp"

#include <moereg/chain.hpp>
#include <moereg/losses/bias_update.hpp>
#include <moereg/losses/coupling.hpp>
#include <moereg/losses/entropy.hpp>
#include <moereg/losses/importance.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/variance.hpp>
#include <moereg/losses/z_loss.hpp>

namespace {

using moereg::index_t;
using namespace moereg_matrix;

struct router_case {
  long long T, E, k;
  std::vector<double> P, Z;        // [T, E] probabilities and logits
  std::vector<long long> I;        // [T, k], -1 = dropped
  std::vector<std::int64_t> ids;   // the same, for topk_view
  std::vector<std::uint8_t> mask;  // [T]; the last row is always valid
};

router_case make(std::uint64_t seed, long long T, long long E, long long k) {
  moereg_test::rng r(seed);
  router_case c{T, E, k, moereg_test::random_probs(r, T, E), {}, moereg_test::random_topk(r, T, E, k, 0.2), {}, {}};
  c.Z = moereg_test::random_normal(r, static_cast<std::size_t>(T * E), 3.0);
  c.ids.assign(c.I.begin(), c.I.end());
  c.mask = moereg_test::random_mask(r, T, 0.25);
  if (T > 0) c.mask[static_cast<std::size_t>(T - 1)] = 1;
  return c;
}

template <class T>
void check_router(const router_case& c) {
  const long long T_ = c.T, E = c.E;
  const auto n = static_cast<std::size_t>(T_ * E);
  const std::vector<T> P = to_storage<T>(c.P), Z = to_storage<T>(c.Z);
  const std::vector<double> Pd = to_double(P), Zd = to_double(Z);
  const std::vector<int> mk = moereg_test::to_int_mask(c.mask);
  const moereg::topk_view I(c.ids.data(), T_, c.k);
  const moereg::mask_view m(c.mask.data(), T_);
  const moereg::routing_view<T> Pv(P.data(), T_, E), Zv(Z.data(), T_, E);
  auto grad_view = [&](std::vector<T>& g) { return moereg::matrix_view<T>(g.data(), T_, E); };

  SECTION("load balancing, micro-batch") {
    moereg::load_balancing_loss lb{};
    auto g = nan_buffer<T>(n);
    const double v = lb.value_and_grad(moereg::load_balancing_inputs<T>{Pv, I, m}, grad_view(g));
    const auto want = moereg_ref::load_balancing(Pd, c.I, mk, T_, E, c.k, lb.cfg.coef);
    compare(v, g, want.value, want.grad);
  }
  SECTION("load balancing, sequence scope: cu_seqlens with empty sequences and a valid last row") {
    // Empty sequences at the start, in the middle and at the end; the last row ends the last
    // non-empty sequence.
    const long long a = T_ / 3, b = (2 * T_) / 3;
    const std::vector<std::int64_t> cu{0, 0, a, a, b, T_, T_};
    moereg::load_balancing_loss lb{};
    lb.cfg.scope = moereg::lb_scope::sequence;
    auto g = nan_buffer<T>(n);
    const moereg::offsets_view off(cu.data(), static_cast<index_t>(cu.size()));
    const double v = lb.value_and_grad(moereg::load_balancing_inputs<T>{Pv, I, m, off}, grad_view(g));
    const std::vector<long long> cul(cu.begin(), cu.end());
    const auto want = moereg_ref::load_balancing_seq(Pd, c.I, mk, T_, E, c.k, lb.cfg.coef, cul);
    compare(v, g, want.value, want.grad);
  }
  SECTION("load balancing, sequence scope: one sequence of length T") {
    const std::vector<std::int64_t> cu{0, T_};
    moereg::load_balancing_loss lb{};
    lb.cfg.scope = moereg::lb_scope::sequence;
    auto g = nan_buffer<T>(n);
    const double v =
        lb.value_and_grad(moereg::load_balancing_inputs<T>{Pv, I, m, moereg::offsets_view(cu.data(), 2)}, grad_view(g));
    const auto want = moereg_ref::load_balancing_seq(Pd, c.I, mk, T_, E, c.k, lb.cfg.coef, {0, T_});
    compare(v, g, want.value, want.grad);
  }
  SECTION("z-loss") {
    moereg::z_loss zl{};
    auto g = nan_buffer<T>(n);
    const double v = zl.value_and_grad(moereg::z_loss_inputs<T>{Zv, m}, grad_view(g));
    const auto want = moereg_ref::z_loss(Zd, mk, T_, E, zl.cfg.coef);
    compare(v, g, want.value, want.grad);
  }
  SECTION("entropy") {
    moereg::entropy_loss en{};
    auto g = nan_buffer<T>(n);
    const double v = en.value_and_grad(moereg::entropy_inputs<T>{Pv, m}, grad_view(g));
    const auto want = moereg_ref::entropy(Pd, mk, T_, E, en.cfg.coef);
    compare(v, g, want.value, want.grad);
  }
  SECTION("importance") {
    moereg::importance_loss im{};
    auto g = nan_buffer<T>(n);
    const double v = im.value_and_grad(moereg::importance_inputs<T>{Pv, m}, grad_view(g));
    const auto want = moereg_ref::importance(Pd, mk, T_, E, im.cfg.coef);
    compare(v, g, want.value, want.grad);
  }
  SECTION("variance, both axes") {
    for (auto axis : {moereg::variance_axis::tokens, moereg::variance_axis::experts}) {
      if (axis == moereg::variance_axis::experts && E < 2) continue;
      moereg::variance_loss va{};
      va.cfg.axis = axis;
      auto g = nan_buffer<T>(n);
      const double v = va.value_and_grad(moereg::variance_inputs<T>{Pv, m}, grad_view(g));
      const auto want = moereg_ref::variance(Pd, mk, T_, E, va.cfg.coef,
                                             axis == moereg::variance_axis::tokens ? "tokens" : "experts", false);
      compare(v, g, want.value, want.grad);
    }
  }
  SECTION("coupling, every form, 3 layers") {
    std::vector<std::vector<T>> Ps;
    std::vector<std::vector<double>> Pds;
    std::vector<std::vector<long long>> Is;
    std::vector<std::vector<std::int64_t>> ids;
    moereg_test::rng r(static_cast<std::uint64_t>(T_ * 31 + E));
    for (int l = 0; l < 3; ++l) {
      Ps.push_back(to_storage<T>(moereg_test::random_probs(r, T_, E)));
      Pds.push_back(to_double(Ps.back()));
      Is.push_back(moereg_test::random_topk(r, T_, E, c.k, 0.2));
      ids.emplace_back(Is.back().begin(), Is.back().end());
    }
    std::vector<moereg::routing_view<T>> pv;
    std::vector<moereg::topk_view> tv;
    for (int l = 0; l < 3; ++l) {
      pv.emplace_back(Ps[static_cast<std::size_t>(l)].data(), T_, E);
      tv.emplace_back(ids[static_cast<std::size_t>(l)].data(), T_, c.k);
    }
    for (auto form : {moereg::coupling_form::token, moereg::coupling_form::log, moereg::coupling_form::batch}) {
      moereg::coupling_loss cp{};
      cp.cfg.form = form;
      std::vector<std::vector<T>> gs(3, nan_buffer<T>(n));
      std::vector<moereg::matrix_view<T>> gv;
      for (auto& g : gs) gv.push_back(grad_view(g));
      const double v = cp.value_and_grad(moereg::coupling_inputs<T>{pv.data(), tv.data(), 3, m}, gv.data());
      const char* fname = form == moereg::coupling_form::token ? "token"
                          : form == moereg::coupling_form::log ? "log"
                                                               : "batch";
      const auto want = moereg_ref::coupling(Pds, Is, {c.k, c.k, c.k}, mk, T_, E, cp.cfg.coef, fname, cp.cfg.eps);
      INFO("form " << fname);
      for (int l = 0; l < 3; ++l)
        compare(v, gs[static_cast<std::size_t>(l)], want.first, want.second[static_cast<std::size_t>(l)]);
    }
  }
  SECTION("softmax chain") {
    moereg_test::rng r(7);
    const std::vector<T> dP = to_storage<T>(moereg_test::random_normal(r, n));
    auto dZ = nan_buffer<T>(n);
    moereg::softmax_backward(Pv, moereg::routing_view<T>(dP.data(), T_, E), grad_view(dZ));
    const auto want = moereg_ref::softmax_backward(Pd, to_double(dP), T_, E);
    compare(0.0, dZ, 0.0, want);
  }
}

TEST_CASE("matrix: router losses against the reference", "[matrix][router]") {
  const long long shapes[][3] = {{1, 1, 1}, {37, 5, 2}, {300, 16, 4}, {600, 64, 8}};
  for (const auto& s : shapes) {
    const router_case c = make(static_cast<std::uint64_t>(s[0] * 1000 + s[1]), s[0], s[1], s[2]);
    DYNAMIC_SECTION("T = " << s[0] << ", E = " << s[1] << ", k = " << s[2]) {
      SECTION("double") {
        check_router<double>(c);
      }
      SECTION("float") {
        check_router<float>(c);
      }
      SECTION("bfloat16") {
        check_router<moereg::bfloat16>(c);
      }
    }
  }
}

TEST_CASE("matrix: bias update against the reference", "[matrix][router]") {
  moereg_test::rng r(3);
  for (bool center : {false, true}) {
    const std::vector<double> b = moereg_test::random_normal(r, 13);
    std::vector<double> counts(13);
    for (auto& x : counts) x = static_cast<double>(r.integer(0, 9));
    std::vector<double> got = b;
    moereg::bias_update_config cfg{};
    cfg.center = center;
    moereg::bias_update(cfg, counts, got);
    const auto want = moereg_ref::bias_update(b, counts, cfg.rate, center);
    for (std::size_t e = 0; e < b.size(); ++e) REQUIRE(std::fabs(got[e] - want[e]) <= 1e-15);
  }
}

}  // namespace
