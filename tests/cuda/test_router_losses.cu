// CUDA entropy, variance and importance against the CPU backend, and the fused router entry
// point against the separate CPU losses.
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/router_case.cuh"
#include "cuda/support.cuh"

using namespace moereg_cuda_test;
using moereg::index_t;

namespace {

/// Runs value_and_grad of `loss` on both backends from the same starting gradient; checks the
/// value and the gradient. hred/dred: the same reduced statistics on the host and the device.
template <class T, class Loss, class Inputs>
void compare(gpu_env& env, const Loss& loss, const Inputs& hin, const Inputs& din, long long rows, long long cols,
             moereg::grad_options opts = {}, std::uint64_t grad_seed = 0, moereg::stats_view hred = {},
             moereg::stats_view dred = {}) {
  grad_pair<T> g(rows, cols, grad_seed);
  const double v = loss.value_and_grad(hin, g.view(false), opts, hred);
  const double ret =
      loss.value_and_grad(din, g.view(true), opts, dred, env.backend(moereg::workspace_size(loss, din), 3));
  CHECK(std::isnan(ret));
  const double vg = env.value();
  INFO("cpu value " << v << " gpu value " << vg);
  CHECK(close(vg, v, value_tol<T>(), 1e-30));
  CHECK(rel_err(g.gpu(), g.cpu()) <= grad_tol<T>());
}

const std::vector<std::tuple<long long, long long>> sizes = {{1, 1}, {7, 5}, {300, 13}, {1000, 70}, {129, 33}};

}  // namespace

TEST_CASE("cuda: a call context's value output replaces be.value", "[cuda][context]") {
  gpu_env env;
  router_case<float> c(17, 300, 13, 1, 0.0, 0.2, false, 2.0);
  moereg::entropy_loss loss{{0.3}};
  moereg::entropy_inputs<float> hin{c.probs(false), c.mask(false)}, din{c.probs(true), c.mask(true)};
  grad_pair<float> g(300, 13, 0);
  const double v = loss.value_and_grad(hin, g.view(false));
  const moereg::cuda be = env.backend(moereg::workspace_size(loss, din), 0, 2);
  const double ret = loss.value_and_grad(din, g.view(true), moereg::on(be).value_into(env.values.get() + 5));
  CHECK(std::isnan(ret));
  CHECK(close(env.value(5), v, value_tol<float>(), 1e-30));
  CHECK(env.value(2) == 0.0);  // be.value was not written
  CHECK(rel_err(g.gpu(), g.cpu()) <= grad_tol<float>());
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda entropy matches the CPU backend", "[cuda][entropy]", float, double, moereg::half,
                   moereg::bfloat16) {
  gpu_env env;
  for (auto [T, E] : sizes) {
    router_case<TestType> c(static_cast<std::uint64_t>(T * 3 + E), T, E, 1, 0.0, 0.2, false, 4.0);
    // Entries at and below tiny take the other branch of the derivative.
    for (std::size_t i = 0; i < c.P.size(); i += 7) c.P[i] = TestType(0);
    c.upload();
    moereg::entropy_loss loss{{0.3}};
    moereg::entropy_inputs<TestType> hin{c.probs(false), c.mask(false)}, din{c.probs(true), c.mask(true)};
    INFO("T=" << T << " E=" << E);
    compare<TestType>(env, loss, hin, din, T, E);
    compare<TestType>(env, loss, hin, din, T, E, {-0.5, true}, 11);
    loss.cfg.tiny = 1e-3;  // a large floor: many entries below it
    compare<TestType>(env, loss, hin, din, T, E);
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda variance matches the CPU backend on both axes and reductions", "[cuda][variance]", float,
                   double, moereg::half, moereg::bfloat16) {
  gpu_env env;
  for (auto [T, E] : sizes) {
    router_case<TestType> c(static_cast<std::uint64_t>(T * 5 + E), T, E, 1, 0.0, 0.3, true, 1.0);
    moereg::variance_inputs<TestType> hin{c.probs(false), c.mask(false)}, din{c.probs(true), c.mask(true)};
    for (auto axis : {moereg::variance_axis::tokens, moereg::variance_axis::experts})
      for (auto red : {moereg::variance_reduction::mean, moereg::variance_reduction::sum}) {
        moereg::variance_loss loss{{0.2, axis, red}};
        INFO("T=" << T << " E=" << E << " axis " << static_cast<int>(axis) << " reduction " << static_cast<int>(red));
        compare<TestType>(env, loss, hin, din, T, E);
        compare<TestType>(env, loss, hin, din, T, E, {2.0, true}, 5);
      }
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda importance matches the CPU backend", "[cuda][importance]", float, double, moereg::half,
                   moereg::bfloat16) {
  gpu_env env;
  for (auto [T, E] : sizes) {
    router_case<TestType> c(static_cast<std::uint64_t>(T * 11 + E), T, E, 1, 0.0, 0.2, false, 2.0);
    moereg::importance_loss loss{{0.05}};
    moereg::importance_inputs<TestType> hin{c.probs(false), c.mask(false)}, din{c.probs(true), c.mask(true)};
    INFO("T=" << T << " E=" << E);
    compare<TestType>(env, loss, hin, din, T, E);
    compare<TestType>(env, loss, hin, din, T, E, {0.5, true}, 2);
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda entropy, variance and importance: statistics and reduced statistics match the CPU backend",
          "[cuda][entropy][variance][importance][stats]") {
  gpu_env env;
  router_case<double> c(41, 800, 24, 1, 0.0, 0.25, false, 2.0);
  const long long r0 = 77, n = 400;
  auto part = [&](bool device) {
    return moereg::routing_view<double>((device ? c.dP.get() : c.P.data()) + r0 * c.E, n, c.E);
  };
  auto part_mask = [&](bool device) { return moereg::mask_view((device ? c.dm.get() : c.m.data()) + r0, n); };
  auto check_loss = [&](const auto& loss, const auto& whole_h, const auto& whole_d, const auto& part_h,
                        const auto& part_d) {
    const auto st = loss.local_stats(whole_h);
    device_buffer<double> dst(st.size());
    dst.fill_bytes(0xFF);
    loss.local_stats(whole_d, dst.get(), env.backend(moereg::workspace_size(loss, whole_d)));
    env.sync();
    CHECK(rel_err(dst.download(), st) <= 1e-12);
    const moereg::stats_view hred{st.data(), static_cast<index_t>(st.size())};
    const moereg::stats_view dred{dst.get(), static_cast<index_t>(st.size())};
    compare<double>(env, loss, part_h, part_d, n, c.E, {}, 0, hred, dred);
  };
  {
    moereg::entropy_loss loss{{0.1}};
    check_loss(loss, moereg::entropy_inputs<double>{c.probs(false), c.mask(false)},
               moereg::entropy_inputs<double>{c.probs(true), c.mask(true)},
               moereg::entropy_inputs<double>{part(false), part_mask(false)},
               moereg::entropy_inputs<double>{part(true), part_mask(true)});
  }
  for (auto axis : {moereg::variance_axis::tokens, moereg::variance_axis::experts}) {
    moereg::variance_loss loss{{0.1, axis}};
    check_loss(loss, moereg::variance_inputs<double>{c.probs(false), c.mask(false)},
               moereg::variance_inputs<double>{c.probs(true), c.mask(true)},
               moereg::variance_inputs<double>{part(false), part_mask(false)},
               moereg::variance_inputs<double>{part(true), part_mask(true)});
  }
  {
    moereg::importance_loss loss{{0.1}};
    check_loss(loss, moereg::importance_inputs<double>{c.probs(false), c.mask(false)},
               moereg::importance_inputs<double>{c.probs(true), c.mask(true)},
               moereg::importance_inputs<double>{part(false), part_mask(false)},
               moereg::importance_inputs<double>{part(true), part_mask(true)});
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda entropy, variance and importance: empty, fully padded and degenerate inputs",
          "[cuda][entropy][variance][importance]") {
  gpu_env env;
  router_case<float> c(43, 50, 1, 1, 0.0, 0.0, true);
  // E = 1 on the experts axis: 0 and a zero gradient.
  moereg::variance_loss ve{{1.0, moereg::variance_axis::experts}};
  compare<float>(env, ve, moereg::variance_inputs<float>{c.probs(false), c.mask(false)},
                 moereg::variance_inputs<float>{c.probs(true), c.mask(true)}, 50, 1, {}, 9);
  CHECK(env.value() == 0.0);
  // Fully padded.
  router_case<float> p(44, 30, 6, 1, 0.0, 0.0);
  std::fill(p.m.begin(), p.m.end(), std::uint8_t(0));
  p.upload();
  grad_pair<float> g(30, 6, 3);
  moereg::entropy_loss ent;
  moereg::importance_loss imp;
  moereg::variance_loss var;
  (void)ent.value_and_grad(moereg::entropy_inputs<float>{p.probs(true), p.mask(true)}, g.view(true), {}, {},
                           env.backend(moereg::workspace_size(ent, moereg::entropy_inputs<float>{p.probs(true)})));
  CHECK(env.value() == 0.0);
  (void)imp.value_and_grad(moereg::importance_inputs<float>{p.probs(true), p.mask(true)}, g.view(true), {1.0, true}, {},
                           env.backend(moereg::workspace_size(imp, moereg::importance_inputs<float>{p.probs(true)})));
  CHECK(env.value() == 0.0);
  (void)var.value_and_grad(moereg::variance_inputs<float>{p.probs(true), p.mask(true)}, g.view(true), {1.0, true}, {},
                           env.backend(moereg::workspace_size(var, moereg::variance_inputs<float>{p.probs(true)})));
  CHECK(env.value() == 0.0);
  CHECK(moereg_test::max_abs(g.gpu()) == 0.0);
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda router losses report bad reduced statistics", "[cuda][status]") {
  gpu_env env;
  router_case<float> c(45, 64, 4, 1, 0.0, 0.0);  // every token valid: every gradient entry is poisoned
  std::vector<double> bad{-1.0, 1.0, 1.0, 1.0, 1.0};
  device_buffer<double> dbad(bad);
  grad_pair<float> g(64, 4);
  moereg::entropy_loss ent;
  (void)ent.value_and_grad(moereg::entropy_inputs<float>{c.probs(true), c.mask(true)}, g.view(true), {},
                           {dbad.get(), 1},
                           env.backend(moereg::workspace_size(ent, moereg::entropy_inputs<float>{c.probs(true)})));
  CHECK(std::isnan(env.value()));
  CHECK(env.read_status() == moereg::cuda_bad_stats);
  CHECK(all_nan(g.gpu()));
  env.clear_status();
  // Importance accepts negative sums (scores need not be probabilities) but not NaN.
  std::vector<double> neg{-1.0, 2.0, 3.0, 4.0};
  device_buffer<double> dneg(neg);
  moereg::importance_loss imp;
  (void)imp.value(moereg::importance_inputs<float>{c.probs(true), c.mask(true)}, {dneg.get(), 4},
                  env.backend(moereg::workspace_size(imp, moereg::importance_inputs<float>{c.probs(true)})));
  CHECK(env.read_status() == moereg::cuda_ok);
  neg[2] = std::nan("");
  dneg.upload(neg);
  (void)imp.value(moereg::importance_inputs<float>{c.probs(true), c.mask(true)}, {dneg.get(), 4},
                  env.backend(moereg::workspace_size(imp, moereg::importance_inputs<float>{c.probs(true)})));
  CHECK(env.read_status() == moereg::cuda_bad_stats);
  CHECK(std::isnan(env.value()));
}

TEMPLATE_TEST_CASE("cuda fused router losses equal the separate CPU losses", "[cuda][fused]", float, double,
                   moereg::bfloat16) {
  gpu_env env;
  for (auto [T, E, k] : {std::tuple<long long, long long, long long>{9, 6, 2}, {777, 40, 4}, {300, 64, 8}}) {
    router_case<TestType> c(static_cast<std::uint64_t>(T + E), T, E, k);
    router_case<TestType> z(static_cast<std::uint64_t>(T + E + 1), T, E, 1, 0.0, 0.0, true, 2.0);
    const moereg::load_balancing_loss lb{{0.01, moereg::lb_scope::global}};
    const moereg::z_loss zl{{0.001}};
    const moereg::entropy_loss ent{{0.02}};
    const moereg::variance_loss var{{0.03, moereg::variance_axis::experts}};
    const moereg::importance_loss imp{{0.04}};
    const moereg::grad_options opts{0.75, false};
    // CPU: one call per loss, gradients summed in double.
    std::vector<double> dP(c.size(), 0.0), dZ(c.size(), 0.0), values(5);
    auto add = [](std::vector<double>& acc, const grad_pair<TestType>& g) {
      const auto v = g.cpu();
      for (std::size_t i = 0; i < acc.size(); ++i) acc[i] += v[i];
    };
    {
      grad_pair<TestType> g(T, E);
      values[0] = lb.value_and_grad(
          moereg::load_balancing_inputs<TestType>{c.probs(false), c.topk(false), c.mask(false)}, g.view(false), opts);
      add(dP, g);
    }
    {
      grad_pair<TestType> g(T, E);
      values[1] =
          zl.value_and_grad(moereg::z_loss_inputs<TestType>{z.probs(false), c.mask(false)}, g.view(false), opts);
      add(dZ, g);
    }
    {
      grad_pair<TestType> g(T, E);
      values[2] =
          ent.value_and_grad(moereg::entropy_inputs<TestType>{c.probs(false), c.mask(false)}, g.view(false), opts);
      add(dP, g);
    }
    {
      grad_pair<TestType> g(T, E);
      values[3] =
          var.value_and_grad(moereg::variance_inputs<TestType>{c.probs(false), c.mask(false)}, g.view(false), opts);
      add(dP, g);
    }
    {
      grad_pair<TestType> g(T, E);
      values[4] =
          imp.value_and_grad(moereg::importance_inputs<TestType>{c.probs(false), c.mask(false)}, g.view(false), opts);
      add(dP, g);
    }
    // GPU: one fused call.
    moereg::router_fused f;
    f.load_balancing = &lb;
    f.z = &zl;
    f.entropy = &ent;
    f.variance = &var;
    f.importance = &imp;
    const moereg::router_fused_inputs<TestType> in{c.probs(true), z.probs(true), c.topk(true), c.mask(true)};
    grad_pair<TestType> gp(T, E), gz(T, E);
    f.value_and_grad(in, gp.view(true), gz.view(true), opts, {}, env.backend(f.workspace_size(in)));
    env.sync();
    const auto vg = env.values.download();
    INFO("T=" << T << " E=" << E);
    for (int i = 0; i < 5; ++i) {
      INFO("slot " << i << " cpu " << values[static_cast<std::size_t>(i)] << " gpu "
                   << vg[static_cast<std::size_t>(i)]);
      CHECK(close(vg[static_cast<std::size_t>(i)], values[static_cast<std::size_t>(i)], value_tol<TestType>()));
    }
    // The fused gradient rounds the sum once, the CPU reference rounds each term: allow one
    // storage ulp per loss.
    CHECK(rel_err(gp.gpu(), dP) <= 4 * grad_tol<TestType>());
    CHECK(rel_err(gz.gpu(), dZ) <= grad_tol<TestType>());
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda fused router statistics and reduced statistics match the separate CPU losses", "[cuda][fused][stats]") {
  gpu_env env;
  router_case<double> c(51, 600, 16, 3);
  const moereg::load_balancing_loss lb{{0.01}};
  const moereg::entropy_loss ent{{0.02}};
  const moereg::variance_loss var{{0.03}};
  const moereg::importance_loss imp{{0.04}};
  moereg::router_fused f;
  f.load_balancing = &lb;
  f.entropy = &ent;
  f.variance = &var;
  f.importance = &imp;
  const moereg::router_fused_inputs<double> in{c.probs(true), {}, c.topk(true), c.mask(true)};
  const auto s_lb = lb.local_stats(moereg::load_balancing_inputs<double>{c.probs(false), c.topk(false), c.mask(false)});
  const auto s_ent = ent.local_stats(moereg::entropy_inputs<double>{c.probs(false), c.mask(false)});
  const auto s_var = var.local_stats(moereg::variance_inputs<double>{c.probs(false), c.mask(false)});
  const auto s_imp = imp.local_stats(moereg::importance_inputs<double>{c.probs(false), c.mask(false)});
  device_buffer<double> d_lb(s_lb.size()), d_ent(s_ent.size()), d_var(s_var.size()), d_imp(s_imp.size());
  f.local_stats(in, {d_lb.get(), nullptr, d_ent.get(), d_var.get(), d_imp.get()}, env.backend(f.workspace_size(in)));
  env.sync();
  CHECK(d_lb.download() == s_lb);
  CHECK(d_ent.download() == s_ent);
  CHECK(rel_err(d_var.download(), s_var) <= 1e-12);
  CHECK(rel_err(d_imp.download(), s_imp) <= 1e-12);

  // A part of the batch with the whole batch's statistics, fused on the GPU, separate on the CPU.
  const long long r0 = 100, n = 250;
  const moereg::routing_view<double> hp(c.P.data() + r0 * c.E, n, c.E), dp(c.dP.get() + r0 * c.E, n, c.E);
  const moereg::topk_view hI(c.I.data() + r0 * c.k, n, c.k), dI(c.dI.get() + r0 * c.k, n, c.k);
  const moereg::mask_view hm(c.m.data() + r0, n), dm(c.dm.get() + r0, n);
  auto sv = [](const std::vector<double>& s) { return moereg::stats_view{s.data(), static_cast<index_t>(s.size())}; };
  auto dv = [](const device_buffer<double>& s) { return moereg::stats_view{s.get(), static_cast<index_t>(s.size())}; };
  std::vector<double> dP(static_cast<std::size_t>(n * c.E), 0.0), values(5, 0.0);
  auto add = [&](const std::vector<double>& g) {
    for (std::size_t i = 0; i < dP.size(); ++i) dP[i] += g[i];
  };
  std::vector<double> g(dP.size());
  const moereg::matrix_view<double> gv(g.data(), n, c.E);
  values[0] = lb.value_and_grad(moereg::load_balancing_inputs<double>{hp, hI, hm}, gv, {}, sv(s_lb));
  add(g);
  values[2] = ent.value_and_grad(moereg::entropy_inputs<double>{hp, hm}, gv, {}, sv(s_ent));
  add(g);
  values[3] = var.value_and_grad(moereg::variance_inputs<double>{hp, hm}, gv, {}, sv(s_var));
  add(g);
  values[4] = imp.value_and_grad(moereg::importance_inputs<double>{hp, hm}, gv, {}, sv(s_imp));
  add(g);
  const moereg::router_fused_inputs<double> pin{dp, {}, dI, dm};
  device_buffer<double> gd(dP.size());
  f.value_and_grad(pin, moereg::matrix_view<double>(gd.get(), n, c.E), moereg::matrix_view<double>{}, {},
                   {dv(d_lb), {}, dv(d_ent), dv(d_var), dv(d_imp)}, env.backend(f.workspace_size(pin)));
  env.sync();
  const auto vg = env.values.download();
  for (int i : {0, 2, 3, 4}) CHECK(close(vg[static_cast<std::size_t>(i)], values[static_cast<std::size_t>(i)], 1e-11));
  CHECK(rel_err(gd.download(), dP) <= 1e-11);
  CHECK(env.read_status() == moereg::cuda_ok);
}
