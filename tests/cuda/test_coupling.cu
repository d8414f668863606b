// CUDA cross-layer coupling against the CPU backend: the three forms, storage types,
// accumulate, statistics and reduced statistics, bad indices.
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "cuda/router_case.cuh"
#include "cuda/support.cuh"

using namespace moereg_cuda_test;
using moereg::index_t;

namespace {

/// L layers of routing over the same T tokens (each layer its own P and top-k), one mask.
template <class T>
struct layers_case {
  long long T_, E, L;
  std::vector<std::unique_ptr<router_case<T>>> layer;
  std::vector<std::uint8_t> m;
  device_buffer<std::uint8_t> dm;
  layers_case(std::uint64_t seed, long long rows, long long E_, const std::vector<long long>& ks, double pad = 0.2)
      : T_(rows), E(E_), L(static_cast<long long>(ks.size())) {
    for (std::size_t l = 0; l < ks.size(); ++l)
      layer.push_back(std::make_unique<router_case<T>>(seed + 17 * l, rows, E, ks[l], 0.2, pad));
    m = layer[0]->m;
    dm = device_buffer<std::uint8_t>(m);
  }
  std::vector<moereg::routing_view<T>> probs(bool device) const {
    std::vector<moereg::routing_view<T>> v;
    for (const auto& c : layer) v.push_back(c->probs(device));
    return v;
  }
  std::vector<moereg::topk_view> topk(bool device) const {
    std::vector<moereg::topk_view> v;
    for (const auto& c : layer) v.push_back(c->topk(device));
    return v;
  }
  moereg::mask_view mask(bool device) const { return {device ? dm.get() : m.data(), T_}; }
};

template <class T>
struct layer_grads {
  std::vector<std::unique_ptr<grad_pair<T>>> g;
  layer_grads(long long L, long long rows, long long E, std::uint64_t seed) {
    for (long long l = 0; l < L; ++l)
      g.push_back(std::make_unique<grad_pair<T>>(rows, E, seed == 0 ? 0 : seed + static_cast<std::uint64_t>(l)));
  }
  std::vector<moereg::matrix_view<T>> views(bool device) {
    std::vector<moereg::matrix_view<T>> v;
    for (auto& x : g) v.push_back(x->view(device));
    return v;
  }
  std::vector<double> cpu() const {
    std::vector<double> out;
    for (const auto& x : g) {
      const auto v = x->cpu();
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }
  std::vector<double> gpu() const {
    std::vector<double> out;
    for (const auto& x : g) {
      const auto v = x->gpu();
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }
};

template <class T>
void compare_coupling(gpu_env& env, const moereg::coupling_loss& loss, const layers_case<T>& c,
                      moereg::grad_options opts, std::uint64_t grad_seed) {
  const auto hp = c.probs(false), dp = c.probs(true);
  const auto ht = c.topk(false), dt = c.topk(true);
  const moereg::coupling_inputs<T> hin{hp.data(), ht.data(), c.L, c.mask(false)};
  const moereg::coupling_inputs<T> din{dp.data(), dt.data(), c.L, c.mask(true)};
  layer_grads<T> g(c.L, c.T_, c.E, grad_seed);
  const auto hg = g.views(false), dg = g.views(true);
  const double v = loss.value_and_grad(hin, hg.data(), opts);
  const double ret = loss.value_and_grad(din, dg.data(), opts, {}, env.backend(moereg::workspace_size(loss, din), 5));
  CHECK(std::isnan(ret));
  const double vg = env.value();
  INFO("cpu " << v << " gpu " << vg);
  // The batch form's selection is a discrete choice on sums of products: with random
  // inputs ties are absent, so both backends select the same pairs.
  CHECK(close(vg, v, value_tol<T>(), 1e-30));
  CHECK(rel_err(g.gpu(), g.cpu()) <= grad_tol<T>());
}

}  // namespace

TEMPLATE_TEST_CASE("cuda coupling matches the CPU backend in every form", "[cuda][coupling]", float, double,
                   moereg::half, moereg::bfloat16) {
  gpu_env env;
  for (auto form : {moereg::coupling_form::token, moereg::coupling_form::log, moereg::coupling_form::batch}) {
    for (const auto& ks :
         {std::vector<long long>{2, 2}, std::vector<long long>{1, 3, 2}, std::vector<long long>{4, 4, 4, 4, 4}}) {
      for (auto [T, E] : {std::tuple<long long, long long>{1, 4}, {37, 6}, {700, 40}}) {
        layers_case<TestType> c(static_cast<std::uint64_t>(T * 3 + E + static_cast<long long>(ks.size())), T, E, ks);
        moereg::coupling_loss loss{{0.3, form}};
        INFO("form " << static_cast<int>(form) << " L=" << ks.size() << " T=" << T << " E=" << E);
        compare_coupling(env, loss, c, {}, 0);
        compare_coupling(env, loss, c, {-1.5, true}, 7);
      }
    }
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda coupling handles more layers than one upload chunk", "[cuda][coupling]") {
  gpu_env env;
  layers_case<float> c(3, 200, 8, std::vector<long long>(37, 2));
  for (auto form : {moereg::coupling_form::token, moereg::coupling_form::batch}) {
    moereg::coupling_loss loss{{0.1, form}};
    compare_coupling(env, loss, c, {}, 0);
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda coupling statistics and reduced statistics match the CPU backend", "[cuda][coupling][stats]") {
  gpu_env env;
  layers_case<double> c(9, 500, 12, {3, 2, 3});
  for (auto form : {moereg::coupling_form::token, moereg::coupling_form::log, moereg::coupling_form::batch}) {
    moereg::coupling_loss loss{{0.2, form}};
    const auto hp = c.probs(false), dp = c.probs(true);
    const auto ht = c.topk(false), dt = c.topk(true);
    const moereg::coupling_inputs<double> hin{hp.data(), ht.data(), c.L, c.mask(false)};
    const moereg::coupling_inputs<double> din{dp.data(), dt.data(), c.L, c.mask(true)};
    const auto st = loss.local_stats(hin);
    device_buffer<double> dst(st.size());
    loss.local_stats(din, dst.get(), env.backend(moereg::workspace_size(loss, din)));
    env.sync();
    CHECK(rel_err(dst.download(), st) <= 1e-12);
    // Rows 100..349 with the whole batch's statistics.
    const long long r0 = 100, n = 250;
    std::vector<moereg::routing_view<double>> php, pdp;
    std::vector<moereg::topk_view> pht, pdt;
    for (long long l = 0; l < c.L; ++l) {
      const auto& lc = *c.layer[static_cast<std::size_t>(l)];
      php.emplace_back(lc.P.data() + r0 * c.E, n, c.E);
      pdp.emplace_back(lc.dP.get() + r0 * c.E, n, c.E);
      pht.emplace_back(lc.I.data() + r0 * lc.k, n, lc.k);
      pdt.emplace_back(lc.dI.get() + r0 * lc.k, n, lc.k);
    }
    const moereg::coupling_inputs<double> hpart{php.data(), pht.data(), c.L, {c.m.data() + r0, n}};
    const moereg::coupling_inputs<double> dpart{pdp.data(), pdt.data(), c.L, {c.dm.get() + r0, n}};
    layer_grads<double> g(c.L, n, c.E, 0);
    const auto hg = g.views(false), dg = g.views(true);
    const double v = loss.value_and_grad(hpart, hg.data(), {}, {st.data(), static_cast<index_t>(st.size())});
    (void)loss.value_and_grad(dpart, dg.data(), {}, {dst.get(), static_cast<index_t>(st.size())},
                              env.backend(moereg::workspace_size(loss, dpart)));
    INFO("form " << static_cast<int>(form));
    CHECK(close(env.value(), v, 1e-11));
    CHECK(rel_err(g.gpu(), g.cpu()) <= 1e-11);
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda coupling: fully padded batch and bad top-k indices", "[cuda][coupling][status]") {
  gpu_env env;
  layers_case<float> c(12, 64, 5, {2, 2}, 0.0);
  moereg::coupling_loss loss{{1.0}};
  SECTION("a bad index poisons its token and sets the status") {
    auto& l1 = *c.layer[1];
    l1.I[static_cast<std::size_t>(10 * l1.k)] = 5;  // == E
    l1.upload();
    const auto dp = c.probs(true);
    const auto dt = c.topk(true);
    const moereg::coupling_inputs<float> din{dp.data(), dt.data(), c.L, c.mask(true)};
    layer_grads<float> g(c.L, c.T_, c.E, 0);
    const auto dg = g.views(true);
    (void)loss.value_and_grad(din, dg.data(), {}, {}, env.backend(moereg::workspace_size(loss, din)));
    CHECK(std::isnan(env.value()));
    CHECK(env.read_status() == moereg::cuda_topk_out_of_range);
    // Token 10's selected entries are NaN in layer 0; token 11 is clean.
    const auto g0 = g.g[0]->gpu();
    const auto& l0 = *c.layer[0];
    const auto e10 = l0.I[static_cast<std::size_t>(10 * l0.k)];
    if (e10 >= 0) CHECK(std::isnan(g0[static_cast<std::size_t>(10 * c.E + e10)]));
    for (long long e = 0; e < c.E; ++e) CHECK(std::isfinite(g0[static_cast<std::size_t>(11 * c.E + e)]));
  }
  SECTION("fully padded: 0 and zero gradients") {
    std::fill(c.m.begin(), c.m.end(), std::uint8_t(0));
    c.dm.upload(c.m);
    const auto dp = c.probs(true);
    const auto dt = c.topk(true);
    for (auto form : {moereg::coupling_form::token, moereg::coupling_form::log, moereg::coupling_form::batch}) {
      moereg::coupling_loss l{{1.0, form}};
      const moereg::coupling_inputs<float> din{dp.data(), dt.data(), c.L, c.mask(true)};
      layer_grads<float> g(c.L, c.T_, c.E, 3);
      const auto dg = g.views(true);
      (void)l.value_and_grad(din, dg.data(), {}, {}, env.backend(moereg::workspace_size(l, din)));
      CHECK(env.value() == 0.0);
      CHECK(moereg_test::max_abs(g.gpu()) == 0.0);
    }
    CHECK(env.read_status() == moereg::cuda_ok);
  }
}
