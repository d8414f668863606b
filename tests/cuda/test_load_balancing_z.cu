// CUDA load balancing and z-loss against the CPU backend on the same random inputs: values,
// gradients, statistics, scopes, reduced statistics, storage types, strides, accumulate,
// determinism, and the device status word for bad indices, offsets and statistics.
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda/router_case.cuh"
#include "cuda/support.cuh"

using namespace moereg_cuda_test;
using moereg::index_t;

namespace {

struct lb_out {
  double value;
  std::vector<double> grad;
};

/// Runs `loss` on both backends (same inputs, gradient starting values and options).
template <class T>
std::pair<lb_out, lb_out> run_lb(gpu_env& env, const moereg::load_balancing_loss& loss, const router_case<T>& c,
                                 moereg::offsets_view cu_host, moereg::offsets_view cu_dev, moereg::grad_options opts,
                                 std::uint64_t grad_seed = 0, std::size_t ws_offset = 0) {
  moereg::load_balancing_inputs<T> hin{c.probs(false), c.topk(false), c.mask(false), cu_host};
  moereg::load_balancing_inputs<T> din{c.probs(true), c.topk(true), c.mask(true), cu_dev};
  grad_pair<T> g(c.T_, c.E, grad_seed);
  lb_out cpu_r{loss.value_and_grad(hin, g.view(false), opts), g.cpu()};
  const std::size_t bytes = moereg::workspace_size(loss, din, moereg::cuda{});
  const auto be = env.backend(bytes, ws_offset);
  const double ret = loss.value_and_grad(din, g.view(true), opts, {}, be);
  CHECK(std::isnan(ret));  // the value lives on the device
  lb_out gpu_r{env.value(), g.gpu()};
  return {cpu_r, gpu_r};
}

template <class T>
void check_close(const lb_out& cpu_r, const lb_out& gpu_r) {
  INFO("cpu value " << cpu_r.value << " gpu value " << gpu_r.value);
  CHECK(close(gpu_r.value, cpu_r.value, value_tol<T>(), 1e-30));
  CHECK(rel_err(gpu_r.grad, cpu_r.grad) <= grad_tol<T>());
}

}  // namespace

TEMPLATE_TEST_CASE("cuda load balancing matches the CPU backend (micro and global scopes)", "[cuda][load_balancing]",
                   float, double, moereg::half, moereg::bfloat16) {
  gpu_env env;
  for (auto [T, E, k] : {std::tuple<long long, long long, long long>{1, 1, 1},
                         {7, 5, 2},
                         {300, 13, 3},
                         {1000, 70, 8},
                         {513, 33, 4},
                         {256, 64, 6}}) {
    router_case<TestType> c(static_cast<std::uint64_t>(T * 7 + E), T, E, k);
    for (auto scope : {moereg::lb_scope::micro, moereg::lb_scope::global}) {
      moereg::load_balancing_loss loss{{0.7, scope}};
      INFO("T=" << T << " E=" << E << " k=" << k << " scope=" << static_cast<int>(scope));
      auto [cr, gr] = run_lb(env, loss, c, {}, {}, {});
      check_close<TestType>(cr, gr);
      // grad_scale, accumulate into non-zero gradients, config k wider than the topk.
      loss.cfg.k = std::min<long long>(E, k + 1);
      auto [cr2, gr2] = run_lb(env, loss, c, {}, {}, {0.5, true}, 99);
      check_close<TestType>(cr2, gr2);
    }
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda load balancing matches the CPU backend (sequence scope)", "[cuda][load_balancing]", float,
                   double, moereg::half) {
  gpu_env env;
  {  // fixed length, including a fully padded sequence and sequences longer than a block
    router_case<TestType> c(3, 600, 9, 2);
    for (long long t = 300; t < 400; ++t) c.m[static_cast<std::size_t>(t)] = 0;
    c.upload();
    for (long long S : {3LL, 300LL, 600LL}) {
      moereg::load_balancing_loss loss{{0.3, moereg::lb_scope::sequence, S}};
      INFO("S=" << S);
      auto [cr, gr] = run_lb(env, loss, c, {}, {}, {});
      check_close<TestType>(cr, gr);
    }
  }
  {  // packed offsets with an empty sequence; int32 and int64 offsets
    router_case<TestType> c(4, 700, 12, 3);
    const std::vector<std::int64_t> off64 = {0, 5, 5, 300, 301, 700};
    const std::vector<std::int32_t> off32(off64.begin(), off64.end());
    device_buffer<std::int64_t> d64(off64);
    device_buffer<std::int32_t> d32(off32);
    moereg::load_balancing_loss loss{{0.3, moereg::lb_scope::sequence}};
    auto [cr, gr] = run_lb(env, loss, c, {off64.data(), 6}, {d64.get(), 6}, {});
    check_close<TestType>(cr, gr);
    auto [cr2, gr2] = run_lb(env, loss, c, {off32.data(), 6}, {d32.get(), 6}, {2.0, true}, 5);
    check_close<TestType>(cr2, gr2);
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda load balancing statistics and reduced statistics match the CPU backend",
          "[cuda][load_balancing][stats]") {
  gpu_env env;
  router_case<float> c(21, 900, 16, 4);
  for (auto scope : {moereg::lb_scope::micro, moereg::lb_scope::global}) {
    moereg::load_balancing_loss loss{{0.05, scope}};
    moereg::load_balancing_inputs<float> hin{c.probs(false), c.topk(false), c.mask(false)};
    moereg::load_balancing_inputs<float> din{c.probs(true), c.topk(true), c.mask(true)};
    const auto whole = loss.local_stats(hin);
    device_buffer<double> dstats(whole.size());
    dstats.fill_bytes(0xFF);
    const std::size_t bytes = moereg::workspace_size(loss, din);
    loss.local_stats(din, dstats.get(), env.backend(bytes));
    env.sync();
    CHECK(dstats.download() == whole);  // integer counts: exact

    // A part (rows 100..599) with the whole batch's statistics, on both backends.
    const long long r0 = 100, n = 500;
    moereg::load_balancing_inputs<float> hpart{
        {c.P.data() + r0 * c.E, n, c.E}, {c.I.data() + r0 * c.k, n, c.k}, {c.m.data() + r0, n}};
    moereg::load_balancing_inputs<float> dpart{
        {c.dP.get() + r0 * c.E, n, c.E}, {c.dI.get() + r0 * c.k, n, c.k}, {c.dm.get() + r0, n}};
    grad_pair<float> g(n, c.E);
    const moereg::stats_view hred{whole.data(), static_cast<index_t>(whole.size())};
    const moereg::stats_view dred{dstats.get(), static_cast<index_t>(whole.size())};
    const double v_cpu = loss.value_and_grad(hpart, g.view(false), {}, hred);
    (void)loss.value_and_grad(dpart, g.view(true), {}, dred, env.backend(moereg::workspace_size(loss, dpart)));
    CHECK(close(env.value(), v_cpu, 2e-5));
    CHECK(rel_err(g.gpu(), g.cpu()) <= 2e-5);
  }
  {  // sequence scope: [B]
    moereg::load_balancing_loss loss{{0.05, moereg::lb_scope::sequence, 100}};
    moereg::load_balancing_inputs<float> din{c.probs(true), c.topk(true), c.mask(true)};
    device_buffer<double> dstats(1);
    loss.local_stats(din, dstats.get(), env.backend(moereg::workspace_size(loss, din)));
    env.sync();
    CHECK(dstats.download()[0] == 9.0);
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda load balancing reads strided and column-major views", "[cuda][load_balancing][views]") {
  gpu_env env;
  const long long T = 333, E = 10, k = 3, pad = 3;
  router_case<double> c(8, T, E, k);
  // P with padded rows, gradient column-major.
  std::vector<double> Ppad(static_cast<std::size_t>(T * (E + pad)), std::nan(""));
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < E; ++e)
      Ppad[static_cast<std::size_t>(t * (E + pad) + e)] = c.P[static_cast<std::size_t>(t * E + e)];
  device_buffer<double> dPpad(Ppad);
  moereg::load_balancing_loss loss{{0.2}};
  moereg::load_balancing_inputs<double> hin{c.probs(false), c.topk(false), c.mask(false)};
  moereg::load_balancing_inputs<double> din{{dPpad.get(), T, E, E + pad}, c.topk(true), c.mask(true)};
  std::vector<double> gh(static_cast<std::size_t>(T * E));
  const double v = loss.value_and_grad(hin, moereg::matrix_view<double>(gh.data(), T, E), {});
  device_buffer<double> gd(static_cast<std::size_t>(T * E));
  (void)loss.value_and_grad(din, moereg::matrix_view<double>(gd.get(), T, E, 1, T), {}, {},
                            env.backend(moereg::workspace_size(loss, din)));
  CHECK(close(env.value(), v, 1e-12));
  const auto gcm = gd.download();
  std::vector<double> g(gcm.size());
  for (long long t = 0; t < T; ++t)
    for (long long e = 0; e < E; ++e) g[static_cast<std::size_t>(t * E + e)] = gcm[static_cast<std::size_t>(e * T + t)];
  CHECK(rel_err(g, gh) <= 1e-12);
}

TEST_CASE("cuda load balancing and z-loss: empty and fully padded batches give 0 and a zero gradient",
          "[cuda][load_balancing][z_loss]") {
  gpu_env env;
  router_case<float> c(9, 40, 6, 2);
  std::fill(c.m.begin(), c.m.end(), std::uint8_t(0));
  c.upload();
  grad_pair<float> g(40, 6, 17);
  for (auto scope : {moereg::lb_scope::micro, moereg::lb_scope::global, moereg::lb_scope::sequence}) {
    moereg::load_balancing_loss loss{{1.0, scope, scope == moereg::lb_scope::sequence ? 8 : 0}};
    moereg::load_balancing_inputs<float> din{c.probs(true), c.topk(true), c.mask(true)};
    (void)loss.value_and_grad(din, g.view(true), {}, {}, env.backend(moereg::workspace_size(loss, din)));
    CHECK(env.value() == 0.0);
    CHECK(moereg_test::max_abs(g.gpu()) == 0.0);
    g.dev.upload(g.host);
  }
  moereg::z_loss z{{1.0}};
  moereg::z_loss_inputs<float> zin{c.probs(true), c.mask(true)};
  (void)z.value_and_grad(zin, g.view(true), {}, {}, env.backend(moereg::workspace_size(z, zin)));
  CHECK(env.value() == 0.0);
  CHECK(moereg_test::max_abs(g.gpu()) == 0.0);
  // T = 0: no rows at all.
  moereg::load_balancing_loss lb{{1.0}};
  moereg::load_balancing_inputs<float> empty{{nullptr, 0, 6}, {static_cast<const std::int64_t*>(nullptr), 0, 2}};
  (void)lb.value(empty, {}, env.backend(moereg::workspace_size(lb, empty)));
  CHECK(env.value() == 0.0);
  moereg::z_loss_inputs<float> zempty{{nullptr, 0, 6}};
  (void)z.value(zempty, {}, env.backend(moereg::workspace_size(z, zempty)));
  CHECK(env.value() == 0.0);
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda z-loss matches the CPU backend", "[cuda][z_loss]", float, double, moereg::half,
                   moereg::bfloat16) {
  gpu_env env;
  for (auto [T, E, scale] : {std::tuple<long long, long long, double>{1, 1, 1.0},
                             {7, 5, 3.0},
                             {300, 13, 1.0},
                             {1000, 70, 5.0},
                             {129, 33, 0.5}}) {
    router_case<TestType> c(static_cast<std::uint64_t>(T + 31 * E), T, E, 1, 0.0, 0.25, true, scale);
    moereg::z_loss loss{{0.01}};
    for (int variant = 0; variant < 2; ++variant) {
      const moereg::grad_options opts = variant == 0 ? moereg::grad_options{} : moereg::grad_options{0.25, true};
      moereg::z_loss_inputs<TestType> hin{c.probs(false), c.mask(false)};
      moereg::z_loss_inputs<TestType> din{c.probs(true), c.mask(true)};
      grad_pair<TestType> g(T, E, variant == 0 ? 0 : 3);
      const double v = loss.value_and_grad(hin, g.view(false), opts);
      (void)loss.value_and_grad(din, g.view(true), opts, {}, env.backend(moereg::workspace_size(loss, din), 1));
      INFO("T=" << T << " E=" << E << " variant " << variant);
      CHECK(close(env.value(), v, value_tol<TestType>()));
      CHECK(rel_err(g.gpu(), g.cpu()) <= grad_tol<TestType>());
    }
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda z-loss stays finite for logits of magnitude 1e4", "[cuda][z_loss][edge]", float,
                   moereg::bfloat16) {
  gpu_env env;
  router_case<TestType> c(77, 64, 16, 1, 0.0, 0.0, true, 1.0);
  for (std::size_t i = 0; i < c.P.size(); ++i)
    c.P[i] = static_cast<TestType>(i % 3 == 0 ? 1e4 : -1e4 + 3.0 * double(i % 5));
  c.upload();
  moereg::z_loss loss{{1e-3}};
  moereg::z_loss_inputs<TestType> hin{c.probs(false), c.mask(false)};
  moereg::z_loss_inputs<TestType> din{c.probs(true), c.mask(true)};
  grad_pair<TestType> g(64, 16);
  const double v = loss.value_and_grad(hin, g.view(false));
  (void)loss.value_and_grad(din, g.view(true), {}, {}, env.backend(moereg::workspace_size(loss, din)));
  const double vg = env.value();
  CHECK(std::isfinite(vg));
  CHECK(close(vg, v, value_tol<TestType>()));
  const auto gg = g.gpu();
  CHECK(std::all_of(gg.begin(), gg.end(), [](double x) { return std::isfinite(x); }));
  CHECK(rel_err(gg, g.cpu()) <= grad_tol<TestType>());
}

TEST_CASE("cuda z-loss statistics and reduced statistics match the CPU backend", "[cuda][z_loss][stats]") {
  gpu_env env;
  router_case<float> c(5, 500, 20, 1, 0.0, 0.3, true);
  moereg::z_loss loss{{0.02}};
  moereg::z_loss_inputs<float> hin{c.probs(false), c.mask(false)};
  moereg::z_loss_inputs<float> din{c.probs(true), c.mask(true)};
  const auto whole = loss.local_stats(hin);
  device_buffer<double> ds(1);
  loss.local_stats(din, ds.get(), env.backend(moereg::workspace_size(loss, din)));
  env.sync();
  CHECK(ds.download() == whole);
  const long long r0 = 123, n = 200;
  moereg::z_loss_inputs<float> hpart{{c.P.data() + r0 * c.E, n, c.E}, {c.m.data() + r0, n}};
  moereg::z_loss_inputs<float> dpart{{c.dP.get() + r0 * c.E, n, c.E}, {c.dm.get() + r0, n}};
  grad_pair<float> g(n, c.E);
  const double v = loss.value_and_grad(hpart, g.view(false), {}, {whole.data(), 1});
  (void)loss.value_and_grad(dpart, g.view(true), {}, {ds.get(), 1}, env.backend(moereg::workspace_size(loss, dpart)));
  CHECK(close(env.value(), v, 2e-5));
  CHECK(rel_err(g.gpu(), g.cpu()) <= 2e-5);
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda load balancing and z-loss are bitwise deterministic across runs and workspace offsets",
          "[cuda][load_balancing][z_loss][determinism]") {
  gpu_env env;
  router_case<float> c(13, 5000, 64, 8);
  moereg::load_balancing_loss lb{{0.01}};
  moereg::z_loss z{{0.001}};
  moereg::load_balancing_inputs<float> lin{c.probs(true), c.topk(true), c.mask(true)};
  moereg::z_loss_inputs<float> zin{c.probs(true), c.mask(true)};
  std::vector<double> values;
  std::vector<std::vector<float>> grads;
  for (std::size_t offset : {0, 1, 8, 255}) {
    for (int rep = 0; rep < 2; ++rep) {
      device_buffer<float> g(c.size());
      (void)lb.value_and_grad(lin, moereg::matrix_view<float>(g.get(), c.T_, c.E), {}, {},
                              env.backend(moereg::workspace_size(lb, lin), offset, 0));
      (void)z.value_and_grad(zin, moereg::matrix_view<float>(g.get(), c.T_, c.E), {1.0, true}, {},
                             env.backend(moereg::workspace_size(z, zin), offset, 1));
      env.sync();
      const auto v = env.values.download();
      values.push_back(v[0]);
      values.push_back(v[1]);
      grads.push_back(g.download());
    }
  }
  for (std::size_t i = 2; i < values.size(); ++i) CHECK(same_bits(values[i], values[i % 2]));
  for (std::size_t i = 1; i < grads.size(); ++i) CHECK(same_bits(grads[i], grads[0]));
}

TEST_CASE("cuda load balancing reports bad top-k indices, offsets and statistics through the status word",
          "[cuda][load_balancing][status]") {
  gpu_env env;
  router_case<float> c(31, 300, 8, 2, 0.0, 0.0);
  moereg::load_balancing_loss loss{{0.1}};
  auto run_status = [&](const moereg::load_balancing_loss& l, const moereg::load_balancing_inputs<float>& in,
                        moereg::stats_view red, std::vector<double>& grad_out) {
    env.clear_status();
    device_buffer<float> g(c.size());
    g.fill_bytes(0);
    (void)l.value_and_grad(in, moereg::matrix_view<float>(g.get(), c.T_, c.E), {}, red,
                           env.backend(moereg::workspace_size(l, in)));
    grad_out = to_double(g.download());
    return env.read_status();
  };
  std::vector<double> grad;
  SECTION("an index >= E") {
    c.I[2 * 2 + 1] = 8;
    c.upload();
    moereg::load_balancing_inputs<float> in{c.probs(true), c.topk(true), c.mask(true)};
    CHECK(run_status(loss, in, {}, grad) == moereg::cuda_topk_out_of_range);
    CHECK(std::isnan(env.value()));
    CHECK(all_nan(grad));
  }
  SECTION("a repeated index") {
    c.I[5 * 2 + 1] = c.I[5 * 2 + 0] = 3;
    c.upload();
    moereg::load_balancing_inputs<float> in{c.probs(true), c.topk(true), c.mask(true)};
    CHECK(run_status(loss, in, {}, grad) == moereg::cuda_topk_repeated);
    CHECK(std::isnan(env.value()));
    CHECK(all_nan(grad));
  }
  SECTION("a huge index in int32 storage, sequence scope: only that sequence's rows are poisoned") {
    std::vector<std::int32_t> I32(c.I.begin(), c.I.end());
    I32[250 * 2] = std::numeric_limits<std::int32_t>::max();
    device_buffer<std::int32_t> dI32(I32);
    moereg::load_balancing_loss seq{{0.1, moereg::lb_scope::sequence, 100}};
    moereg::load_balancing_inputs<float> in{c.probs(true), {dI32.get(), c.T_, c.k}, c.mask(true)};
    CHECK(run_status(seq, in, {}, grad) == moereg::cuda_topk_out_of_range);
    CHECK(std::isnan(env.value()));
    for (long long t = 0; t < c.T_; ++t) {
      const bool poisoned = std::isnan(grad[static_cast<std::size_t>(t * c.E)]);
      CHECK(poisoned == (t >= 200));
    }
  }
  SECTION("cu_seqlens that decrease or do not end at T") {
    for (const auto& off : {std::vector<std::int64_t>{0, 50, 20, 300}, std::vector<std::int64_t>{0, 50, 299},
                            std::vector<std::int64_t>{1, 50, 300}}) {
      device_buffer<std::int64_t> doff(off);
      moereg::load_balancing_loss seq{{0.1, moereg::lb_scope::sequence}};
      moereg::load_balancing_inputs<float> in{
          c.probs(true), c.topk(true), c.mask(true), {doff.get(), static_cast<index_t>(off.size())}};
      CHECK(run_status(seq, in, {}, grad) == moereg::cuda_bad_offsets);
      CHECK(std::isnan(env.value()));
    }
  }
  SECTION("negative or NaN reduced statistics") {
    moereg::load_balancing_inputs<float> in{c.probs(true), c.topk(true), c.mask(true)};
    std::vector<double> red(9, 10.0);
    red[3] = -1.0;
    device_buffer<double> dred(red);
    CHECK(run_status(loss, in, {dred.get(), 9}, grad) == moereg::cuda_bad_stats);
    CHECK(std::isnan(env.value()));
    red[3] = std::nan("");
    dred.upload(red);
    CHECK(run_status(loss, in, {dred.get(), 9}, grad) == moereg::cuda_bad_stats);
  }
  SECTION("the status word collects several calls until cleared") {
    c.I[0] = 9;
    c.upload();
    moereg::load_balancing_inputs<float> in{c.probs(true), c.topk(true), c.mask(true)};
    env.clear_status();
    (void)loss.value(in, {}, env.backend(moereg::workspace_size(loss, in)));
    moereg::z_loss z;
    moereg::z_loss_inputs<float> zin{c.probs(true), c.mask(true)};
    std::vector<double> red{-2.0};
    device_buffer<double> dred(red);
    (void)z.value(zin, {dred.get(), 1}, env.backend(moereg::workspace_size(z, zin)));
    CHECK(env.read_status() == (moereg::cuda_topk_out_of_range | moereg::cuda_bad_stats));
    CHECK(moereg::cuda_read_status(env.backend(0)) == (moereg::cuda_topk_out_of_range | moereg::cuda_bad_stats));
    moereg::cuda_clear_status(env.backend(0));
    CHECK(env.read_status() == moereg::cuda_ok);
  }
}

TEST_CASE("cuda backend refuses host buffers and too little workspace before launching", "[cuda][errors]") {
  gpu_env env;
  router_case<float> c(2, 50, 4, 2);
  moereg::load_balancing_loss loss;
  moereg::load_balancing_inputs<float> din{c.probs(true), c.topk(true), c.mask(true)};
  const std::size_t bytes = moereg::workspace_size(loss, din);
  REQUIRE(bytes > 0);
  CHECK_THROWS_AS(loss.value(din, {}, env.backend(bytes - 1)), moereg::error);
  // Host memory is refused unless the GPU can read pageable host memory (HMM / ATS systems).
  int dev = 0, pageable = 0;
  MOEREG_CUDA_REQUIRE(cudaGetDevice(&dev));
  MOEREG_CUDA_REQUIRE(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, dev));
  if (pageable == 0) {
    moereg::load_balancing_inputs<float> host_probs{c.probs(false), c.topk(true), c.mask(true)};
    CHECK_THROWS_AS(loss.value(host_probs, {}, env.backend(bytes)), moereg::error);
    std::vector<double> host_stats(5);
    CHECK_THROWS_AS(loss.local_stats(din, host_stats.data(), env.backend(bytes)), moereg::error);
  }
  env.sync();
  CHECK(env.read_status() == moereg::cuda_ok);
}
