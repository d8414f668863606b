// One rule for the scalar arguments of every loss (losses/common.hpp, detail::check_scalars):
// a non-finite coefficient, a non-finite grad_scale and a negative cpu::threads are refused by
// every loss and chain helper with moereg::error, before anything is written. Before the rule,
// load_balancing returned NaN for a NaN coefficient, every loss accepted a NaN grad_scale, and
// cpu{-4} silently meant the OpenMP default.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <moereg/moereg.hpp>

namespace {

using moereg::index_t;
constexpr double nan_v = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_v = std::numeric_limits<double>::infinity();

// A call that writes `grad`; it must throw moereg::error mentioning `needle` and leave grad alone.
void refused(const std::function<void()>& call, const std::vector<float>& grad, const std::vector<float>& before,
             const std::string& needle) {
  try {
    call();
    FAIL("the call was accepted; expected an error mentioning \"" << needle << "\"");
  } catch (const moereg::error& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
  CHECK(std::memcmp(grad.data(), before.data(), grad.size() * sizeof(float)) == 0);
}

struct fixture {
  static constexpr index_t T = 6, E = 4, k = 2, d = 5;
  std::vector<float> P, H, g;
  std::vector<std::int32_t> ids;
  fixture() : P(T * E), H(T * k * d), g(T * k * d, 7.0f), ids(T * k) {
    for (index_t t = 0; t < T; ++t) {
      for (index_t e = 0; e < E; ++e)
        P[static_cast<std::size_t>(t * E + e)] = 0.1f + 0.2f * static_cast<float>((t + e) % E);
      float s = 0;
      for (index_t e = 0; e < E; ++e) s += P[static_cast<std::size_t>(t * E + e)];
      for (index_t e = 0; e < E; ++e) P[static_cast<std::size_t>(t * E + e)] /= s;
      ids[static_cast<std::size_t>(t * k)] = static_cast<std::int32_t>(t % E);
      ids[static_cast<std::size_t>(t * k + 1)] = static_cast<std::int32_t>((t + 1) % E);
    }
    for (std::size_t i = 0; i < H.size(); ++i) H[i] = std::sin(static_cast<float>(i) * 0.7f);
  }
  moereg::routing_view<float> probs() const { return {P.data(), T, E}; }
  moereg::matrix_view<float> grad_rows() { return {g.data(), T, E}; }
  moereg::topk_view topk() const { return {ids.data(), T, k}; }
};

// Runs `make_call(coef, opts, backend)` with each bad scalar in turn.
void check_rule(const std::function<void(double, moereg::grad_options, moereg::cpu)>& call, fixture& f) {
  const std::vector<float> before = f.g;
  refused([&] { call(nan_v, {}, {}); }, f.g, before, "coefficient nan is not finite");
  refused([&] { call(inf_v, {}, {}); }, f.g, before, "coefficient inf is not finite");
  refused([&] { call(1e-3, {nan_v, false}, {}); }, f.g, before, "grad_scale = nan is not finite");
  refused([&] { call(1e-3, {-inf_v, true}, {}); }, f.g, before, "grad_scale = -inf is not finite");
  refused([&] { call(1e-3, {}, moereg::cpu{-4}); }, f.g, before, "cpu::threads = -4 is negative");
  // The same call with good scalars goes through (so the refusals above are not a broken fixture).
  CHECK_NOTHROW(call(1e-3, {}, moereg::cpu{1}));
}

}  // namespace

TEST_CASE("scalar rule: every loss refuses a non-finite coefficient or grad_scale and negative threads",
          "[hardening][validation]") {
  fixture f;
  SECTION("load_balancing") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::load_balancing_loss l{};
          l.cfg.coef = c;
          l.backward(moereg::load_balancing_inputs<float>{f.probs(), f.topk()}, f.grad_rows(), o, {}, be);
        },
        f);
  }
  SECTION("z_loss") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::z_loss l{};
          l.cfg.coef = c;
          l.backward(moereg::z_loss_inputs<float>{f.probs()}, f.grad_rows(), o, {}, be);
        },
        f);
  }
  SECTION("entropy") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::entropy_loss l{};
          l.cfg.coef = c;
          l.backward(moereg::entropy_inputs<float>{f.probs()}, f.grad_rows(), o, {}, be);
        },
        f);
  }
  SECTION("importance") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::importance_loss l{};
          l.cfg.coef = c;
          l.backward(moereg::importance_inputs<float>{f.probs()}, f.grad_rows(), o, {}, be);
        },
        f);
  }
  SECTION("variance") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::variance_loss l{};
          l.cfg.coef = c;
          l.backward(moereg::variance_inputs<float>{f.probs()}, f.grad_rows(), o, {}, be);
        },
        f);
  }
  SECTION("coupling") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::coupling_loss l{};
          l.cfg.coef = c;
          const moereg::routing_view<float> pv[2] = {f.probs(), f.probs()};
          const moereg::topk_view tv[2] = {f.topk(), f.topk()};
          const moereg::matrix_view<float> gv[2] = {f.grad_rows(),
                                                    {f.g.data() + fixture::T * fixture::E, fixture::T, fixture::E}};
          l.backward(moereg::coupling_inputs<float>{pv, tv, 2}, gv, o, {}, be);
        },
        f);
  }
  using lay = moereg::token_major;
  SECTION("specialization") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::specialization_loss l{};
          l.cfg.coef = c;
          l.backward(moereg::specialization_inputs<float, lay>{{f.H.data(), lay(fixture::T, fixture::k, fixture::d)},
                                                               f.topk()},
                     {f.g.data(), lay(fixture::T, fixture::k, fixture::d)}, o, {}, be);
        },
        f);
  }
  SECTION("orthogonality") {
    check_rule(
        [&](double c, moereg::grad_options o, moereg::cpu be) {
          moereg::orthogonality_loss l{};
          l.cfg.coef = c;
          l.backward(
              moereg::orthogonality_inputs<float, lay>{{f.H.data(), lay(fixture::T, fixture::k, fixture::d)}, f.topk()},
              {f.g.data(), lay(fixture::T, fixture::k, fixture::d)}, o, {}, be);
        },
        f);
  }
}

TEST_CASE("scalar rule: the chain helpers refuse a non-finite grad_scale and negative threads",
          "[hardening][validation]") {
  fixture f;
  const std::vector<float> before = f.g;
  const moereg::matrix_view<const float> dP(f.P.data(), fixture::T, fixture::E);
  refused(
      [&] {
        moereg::softmax_backward(f.probs(), dP, f.grad_rows(), {nan_v, false});
      },
      f.g, before, "grad_scale = nan is not finite");
  refused([&] { moereg::softmax_backward(f.probs(), dP, f.grad_rows(), {}, moereg::cpu{-1}); }, f.g, before,
          "cpu::threads = -1 is negative");
  refused(
      [&] {
        moereg::sigmoid_norm_backward(f.probs(), dP, f.grad_rows(), {inf_v, false});
      },
      f.g, before, "grad_scale = inf is not finite");
  CHECK_NOTHROW(moereg::softmax_backward(f.probs(), dP, f.grad_rows()));
}
