// local_stats(in, double* out, be) with a null `out`: before this guard the CPU backend
// dereferenced it (a segfault) and the CUDA backend silently took it as "value only". Every
// loss now refuses it with moereg::error before dispatch, on any backend. The host-memory
// forms (the vector-returning local_stats and stats_bundle::add) are CPU-only at compile time;
// tests/compile_fail checks that they do not compile with another backend.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <moereg/moereg.hpp>

namespace {

using moereg::index_t;

void refused_null(const std::function<void(double*)>& call, index_t expected_size) {
  try {
    call(nullptr);
    FAIL("local_stats accepted a null output buffer");
  } catch (const moereg::error& e) {
    INFO(e.what());
    CHECK(std::string(e.what()).find("::local_stats: out is null but stats_size(in) = " +
                                     std::to_string(expected_size)) != std::string::npos);
  }
  // The same call with a real buffer goes through and writes every entry (no broken fixture).
  std::vector<double> out(static_cast<std::size_t>(expected_size), std::nan(""));
  CHECK_NOTHROW(call(out.data()));
  for (double v : out) CHECK(std::isfinite(v));
}

struct router_data {
  static constexpr index_t T = 7, E = 5, k = 2, d = 3;
  std::vector<float> P, H;
  std::vector<std::int32_t> ids;
  router_data() : P(T * E), H(T * k * d), ids(T * k) {
    for (index_t t = 0; t < T; ++t) {
      float s = 0;
      for (index_t e = 0; e < E; ++e)
        s += P[static_cast<std::size_t>(t * E + e)] = 0.2f + static_cast<float>((t * 3 + e) % E);
      for (index_t e = 0; e < E; ++e) P[static_cast<std::size_t>(t * E + e)] /= s;
      ids[static_cast<std::size_t>(t * k)] = static_cast<std::int32_t>(t % E);
      ids[static_cast<std::size_t>(t * k + 1)] =
          t == 3 ? -1 : static_cast<std::int32_t>((t + 2) % E);  // one dropped slot
    }
    for (std::size_t i = 0; i < H.size(); ++i) H[i] = std::cos(static_cast<float>(i) * 0.9f);
  }
  moereg::routing_view<float> probs() const { return {P.data(), T, E}; }
  moereg::topk_view topk() const { return {ids.data(), T, k}; }
};

}  // namespace

TEST_CASE("local_stats refuses a null output buffer for every loss", "[hardening][stats]") {
  const router_data r;
  using lay = moereg::token_major;
  SECTION("load_balancing") {
    const moereg::load_balancing_loss l{};
    const moereg::load_balancing_inputs<float> in{r.probs(), r.topk()};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
  SECTION("z_loss") {
    const moereg::z_loss l{};
    const moereg::z_loss_inputs<float> in{r.probs()};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
  SECTION("entropy") {
    const moereg::entropy_loss l{};
    const moereg::entropy_inputs<float> in{r.probs()};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
  SECTION("importance") {
    const moereg::importance_loss l{};
    const moereg::importance_inputs<float> in{r.probs()};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
  SECTION("variance") {
    const moereg::variance_loss l{};
    const moereg::variance_inputs<float> in{r.probs()};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
  SECTION("coupling") {
    const moereg::coupling_loss l{};
    const moereg::routing_view<float> pv[2] = {r.probs(), r.probs()};
    const moereg::topk_view tv[2] = {r.topk(), r.topk()};
    const moereg::coupling_inputs<float> in{pv, tv, 2};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
  SECTION("specialization") {
    const moereg::specialization_loss l{};
    const moereg::specialization_inputs<float, lay> in{
        {r.H.data(), lay(router_data::T, router_data::k, router_data::d)}, r.topk()};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
  SECTION("orthogonality") {
    const moereg::orthogonality_loss l{};
    const moereg::orthogonality_inputs<float, lay> in{{r.H.data(), lay(router_data::T, router_data::k, router_data::d)},
                                                      r.topk()};
    refused_null([&](double* o) { l.local_stats(in, o); }, l.stats_size(in));
  }
}
