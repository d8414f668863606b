// CUDA specialization and orthogonality (and the fused Gram entry point) against the CPU
// backend, in every activation layout and storage type, with masks, dropped slots and odd
// sizes; layout-map checks on the device.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "cuda/support.cuh"
#include "support/random.hpp"

using namespace moereg_cuda_test;
using moereg::index_t;

namespace {

enum class lay { token_major, strided, grouped, padded };

/// One problem in the four layouts, on the host and on the device.
template <class T>
struct gram_case {
  long long T_, k, d, E;
  std::vector<std::int64_t> I;
  std::vector<std::uint8_t> m;
  std::vector<double> H;  // logical [T, k, d]
  // grouped: [T, k] row map, [rows, d] rows; padded: [T, k] positions, [E, C, d]
  std::vector<std::int64_t> row_of, pos_of;
  long long rows = 0, C = 1;
  device_buffer<std::int64_t> dI, drow, dpos;
  device_buffer<std::uint8_t> dm;

  gram_case(std::uint64_t seed, long long ntok, long long k_, long long d_, double drop = 0.2, double pad = 0.2)
      : T_(ntok), k(k_), d(d_), E(k_ + 3) {
    moereg_test::rng r(seed);
    H = moereg_test::random_normal(r, static_cast<std::size_t>(ntok * k * d));
    I = moereg_test::random_topk<std::int64_t>(r, ntok, E, k, drop);
    m = moereg_test::random_mask(r, ntok, pad);
    // Grouped: distinct rows for the valid slots, in a shuffled order.
    row_of.assign(I.size(), -1);
    std::vector<std::size_t> valid;
    for (std::size_t i = 0; i < I.size(); ++i)
      if (I[i] >= 0) valid.push_back(i);
    std::vector<std::size_t> perm(valid.size());
    std::iota(perm.begin(), perm.end(), std::size_t(0));
    std::shuffle(perm.begin(), perm.end(), r.gen);
    for (std::size_t j = 0; j < valid.size(); ++j) row_of[valid[j]] = static_cast<std::int64_t>(perm[j]);
    rows = static_cast<long long>(valid.size());
    // Padded: the expert of a slot is its top-k id, its position the count so far.
    pos_of.assign(I.size(), -1);
    std::vector<long long> fill(static_cast<std::size_t>(E), 0);
    for (std::size_t i = 0; i < I.size(); ++i)
      if (I[i] >= 0) pos_of[i] = fill[static_cast<std::size_t>(I[i])]++;
    C = std::max<long long>(1, *std::max_element(fill.begin(), fill.end()));
    upload();
  }
  void upload() {
    dI = device_buffer<std::int64_t>(I);
    drow = device_buffer<std::int64_t>(row_of);
    dpos = device_buffer<std::int64_t>(pos_of);
    dm = device_buffer<std::uint8_t>(m);
  }
  moereg::topk_view topk(bool dev) const { return {dev ? dI.get() : I.data(), T_, k}; }
  moereg::mask_view mask(bool dev) const { return {dev ? dm.get() : m.data(), T_}; }

  // Storage size and element offset of h_{t,s}[i] in each layout.
  std::size_t size(lay l) const {
    switch (l) {
      case lay::token_major:
        return static_cast<std::size_t>(T_ * k * d);
      case lay::strided:
        return static_cast<std::size_t>(T_ * k * (2 * d + 1));
      case lay::grouped:
        return static_cast<std::size_t>(std::max<long long>(rows, 1) * d);
      default:
        return static_cast<std::size_t>(E * C * d);
    }
  }
  long long offset(lay l, long long t, long long s) const {
    const std::size_t i = static_cast<std::size_t>(t * k + s);
    switch (l) {
      case lay::token_major:
        return (t * k + s) * d;
      case lay::strided:
        return (t * k + s) * (2 * d + 1);
      case lay::grouped:
        return row_of[i] < 0 ? -1 : row_of[i] * d;
      default:
        return I[i] < 0 ? -1 : (I[i] * C + pos_of[i]) * d;
    }
  }
  long long elem_stride(lay l) const { return l == lay::strided ? 2 : 1; }
  /// The activations stored in layout l (unmapped storage: NaN, which must never be read).
  std::vector<T> store(lay l) const {
    std::vector<T> out(size(l), static_cast<T>(std::nan("")));
    for (long long t = 0; t < T_; ++t)
      for (long long s = 0; s < k; ++s) {
        const long long o = offset(l, t, s);
        if (o < 0) continue;
        for (long long i = 0; i < d; ++i)
          out[static_cast<std::size_t>(o + i * elem_stride(l))] =
              static_cast<T>(H[static_cast<std::size_t>((t * k + s) * d + i)]);
      }
    return out;
  }
  moereg::token_major tm_layout(lay l) const {
    if (l == lay::strided) return {T_, k, d, k * (2 * d + 1), 2 * d + 1, 2};
    return {T_, k, d};
  }
  moereg::expert_grouped grouped_layout(bool dev) const {
    return {moereg::topk_view(dev ? drow.get() : row_of.data(), T_, k), std::max<long long>(rows, 1), d};
  }
  moereg::capacity_padded padded_layout(bool dev) const {
    return {topk(dev), moereg::topk_view(dev ? dpos.get() : pos_of.data(), T_, k), E, C, d};
  }
};

/// Runs `loss` (specialization or orthogonality) on both backends in layout Layout.
template <class T, class Layout, class Loss, class MakeInputs>
void compare_layout(gpu_env& env, const Loss& loss, const gram_case<T>& c, lay l, const Layout& hl, const Layout& dl,
                    MakeInputs make_inputs, moereg::grad_options opts, std::uint64_t grad_seed) {
  const auto X = c.store(l);
  device_buffer<T> dX(X);
  // Gradient buffers start equal: random values where grad_seed != 0, else zeros.
  std::vector<T> gh(X.size(), T(0));
  if (grad_seed != 0) {
    moereg_test::rng r(grad_seed);
    for (auto& x : gh) x = static_cast<T>(r.uniform(-1, 1));
  }
  device_buffer<T> gd(gh);
  const auto hin = make_inputs(moereg::activation_view<const T, Layout>{X.data(), hl}, c.topk(false), c.mask(false));
  const auto din = make_inputs(moereg::activation_view<const T, Layout>{dX.get(), dl}, c.topk(true), c.mask(true));
  const double v = loss.value_and_grad(hin, moereg::activation_view<T, Layout>{gh.data(), hl}, opts);
  const double ret = loss.value_and_grad(din, moereg::activation_view<T, Layout>{gd.get(), dl}, opts, {},
                                         env.backend(moereg::workspace_size(loss, din), 7));
  CHECK(std::isnan(ret));
  const double vg = env.value();
  INFO("cpu " << v << " gpu " << vg);
  CHECK(close(vg, v, value_tol<T>() * 10, 1e-30));
  CHECK(rel_err(to_double(gd.download()), to_double(gh)) <= grad_tol<T>() * 10);
}

template <class Loss>
struct inputs_of;
template <>
struct inputs_of<moereg::specialization_loss> {
  template <class T, class L>
  using type = moereg::specialization_inputs<T, L>;
};
template <>
struct inputs_of<moereg::orthogonality_loss> {
  template <class T, class L>
  using type = moereg::orthogonality_inputs<T, L>;
};

/// Every layout of one problem.
template <class T, class Loss>
void compare_gram(gpu_env& env, const Loss& loss, const gram_case<T>& c, moereg::grad_options opts = {},
                  std::uint64_t grad_seed = 0, bool every_layout = true) {
  auto mk = [&](auto acts, moereg::topk_view I, moereg::mask_view m) {
    using A = decltype(acts);
    using L = std::remove_cv_t<decltype(acts.layout)>;
    using V = std::remove_const_t<std::remove_pointer_t<decltype(acts.data)>>;
    static_assert(std::is_same_v<A, moereg::activation_view<const V, L>>, "activation view");
    return typename inputs_of<Loss>::template type<V, L>{acts, I, m, c.E};
  };
  for (lay l : {lay::token_major, lay::strided, lay::grouped, lay::padded}) {
    if (!every_layout && l != lay::token_major) break;
    INFO("layout " << static_cast<int>(l));
    if (l == lay::token_major || l == lay::strided)
      compare_layout<T>(env, loss, c, l, c.tm_layout(l), c.tm_layout(l), mk, opts, grad_seed);
    else if (l == lay::grouped)
      compare_layout<T>(env, loss, c, l, c.grouped_layout(false), c.grouped_layout(true), mk, opts, grad_seed);
    else
      compare_layout<T>(env, loss, c, l, c.padded_layout(false), c.padded_layout(true), mk, opts, grad_seed);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("cuda specialization matches the CPU backend in every layout", "[cuda][specialization]", float,
                   double, moereg::half, moereg::bfloat16) {
  gpu_env env;
  for (auto [T, k, d] : {std::tuple<long long, long long, long long>{1, 2, 5},
                         {70, 3, 33},
                         {9, 8, 64},
                         {130, 5, 17},
                         {40, 16, 40},
                         {20, 1, 8},
                         {66, 12, 3}}) {
    gram_case<TestType> c(static_cast<std::uint64_t>(T * 100 + k * 10 + d), T, k, d);
    for (auto pairs : {moereg::sp_pairs::sum, moereg::sp_pairs::mean}) {
      moereg::specialization_loss loss{{0.7, 1e-8, pairs}};
      INFO("T=" << T << " k=" << k << " d=" << d << " pairs " << static_cast<int>(pairs));
      compare_gram(env, loss, c);
      compare_gram(env, loss, c, {0.5, true}, 3, false);
    }
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda orthogonality matches the CPU backend in every variant and layout", "[cuda][orthogonality]",
                   float, double, moereg::half, moereg::bfloat16) {
  gpu_env env;
  for (auto [T, k, d] : {std::tuple<long long, long long, long long>{1, 2, 5},
                         {70, 3, 33},
                         {9, 8, 64},
                         {130, 5, 17},
                         {40, 16, 40},
                         {20, 1, 8}}) {
    gram_case<TestType> c(static_cast<std::uint64_t>(T * 101 + k * 11 + d), T, k, d);
    for (auto variant : {moereg::ortho_variant::pairwise, moereg::ortho_variant::subspace})
      for (auto red : {moereg::ortho_reduction::mean, moereg::ortho_reduction::sum}) {
        // eps large enough that the subspace systems are well conditioned in float.
        moereg::orthogonality_loss loss{
            {0.3, 1e-2, variant, red, variant == moereg::ortho_variant::subspace ? k + 1 : 0}};
        INFO("T=" << T << " k=" << k << " d=" << d << " variant " << static_cast<int>(variant) << " reduction "
                  << static_cast<int>(red));
        compare_gram(env, loss, c, {}, 0, red == moereg::ortho_reduction::mean);
        compare_gram(env, loss, c, {-2.0, true}, 9, false);
      }
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda specialization and orthogonality: statistics and reduced statistics", "[cuda][specialization][stats]") {
  gpu_env env;
  gram_case<double> c(5, 300, 4, 24);
  const auto X = c.store(lay::token_major);
  device_buffer<double> dX(X);
  moereg::specialization_loss sp{{0.1}};
  moereg::orthogonality_loss orth{{0.2}};
  const moereg::specialization_inputs<double, moereg::token_major> hin{
      {X.data(), c.tm_layout(lay::token_major)}, c.topk(false), c.mask(false), c.E};
  const moereg::specialization_inputs<double, moereg::token_major> din{
      {dX.get(), c.tm_layout(lay::token_major)}, c.topk(true), c.mask(true), c.E};
  const auto st = sp.local_stats(hin);
  device_buffer<double> dst(1);
  sp.local_stats(din, dst.get(), env.backend(moereg::workspace_size(sp, din)));
  env.sync();
  CHECK(dst.download() == st);
  // Rows 50..199 with the whole batch's T_v.
  const long long r0 = 50, n = 150;
  const moereg::token_major part_layout(n, c.k, c.d);
  const moereg::specialization_inputs<double, moereg::token_major> hp{
      {X.data() + r0 * c.k * c.d, part_layout}, {c.I.data() + r0 * c.k, n, c.k}, {c.m.data() + r0, n}, c.E};
  const moereg::specialization_inputs<double, moereg::token_major> dp{
      {dX.get() + r0 * c.k * c.d, part_layout}, {c.dI.get() + r0 * c.k, n, c.k}, {c.dm.get() + r0, n}, c.E};
  std::vector<double> gh(static_cast<std::size_t>(n * c.k * c.d));
  device_buffer<double> gd(gh.size());
  const double v = sp.value_and_grad(hp, {gh.data(), part_layout}, {}, {st.data(), 1});
  (void)sp.value_and_grad(dp, {gd.get(), part_layout}, {}, {dst.get(), 1}, env.backend(moereg::workspace_size(sp, dp)));
  CHECK(close(env.value(), v, 1e-11));
  CHECK(rel_err(gd.download(), gh) <= 1e-11);
  const moereg::orthogonality_inputs<double, moereg::token_major> ohp{hp.acts, hp.topk, hp.mask, c.E};
  const moereg::orthogonality_inputs<double, moereg::token_major> odp{dp.acts, dp.topk, dp.mask, c.E};
  const double vo = orth.value_and_grad(ohp, {gh.data(), part_layout}, {}, {st.data(), 1});
  (void)orth.value_and_grad(odp, {gd.get(), part_layout}, {}, {dst.get(), 1},
                            env.backend(moereg::workspace_size(orth, odp)));
  CHECK(close(env.value(), vo, 1e-11));
  CHECK(rel_err(gd.download(), gh) <= 1e-11);
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEMPLATE_TEST_CASE("cuda fused specialization + orthogonality equal the two separate CPU losses", "[cuda][fused][gram]",
                   float, double, moereg::bfloat16) {
  gpu_env env;
  gram_case<TestType> c(77, 150, 6, 48);
  const auto X = c.store(lay::token_major);
  device_buffer<TestType> dX(X);
  const auto L = c.tm_layout(lay::token_major);
  const moereg::specialization_loss sp{{0.5, 1e-8, moereg::sp_pairs::mean}};
  const moereg::orthogonality_loss orth{{0.25, 1e-3, moereg::ortho_variant::subspace}};
  const moereg::specialization_inputs<TestType, moereg::token_major> hin{
      {X.data(), L}, c.topk(false), c.mask(false), c.E};
  const moereg::orthogonality_inputs<TestType, moereg::token_major> ohin{
      {X.data(), L}, c.topk(false), c.mask(false), c.E};
  std::vector<TestType> g1(X.size()), g2(X.size());
  const moereg::grad_options opts{0.8, false};
  const double v1 = sp.value_and_grad(hin, {g1.data(), L}, opts);
  const double v2 = orth.value_and_grad(ohin, {g2.data(), L}, opts);
  std::vector<double> sum(X.size());
  for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = static_cast<double>(g1[i]) + static_cast<double>(g2[i]);

  moereg::gram_fused f{&sp, &orth};
  const moereg::gram_fused_inputs<TestType, moereg::token_major> din{{dX.get(), L}, c.topk(true), c.mask(true), c.E};
  device_buffer<TestType> gd(X.size());
  f.value_and_grad(din, {gd.get(), L}, opts, {}, env.backend(f.workspace_size(din)));
  env.sync();
  const auto vals = env.values.download();
  INFO("cpu " << v1 << ", " << v2 << " gpu " << vals[0] << ", " << vals[1] << " status " << env.read_status());
  CHECK(close(vals[0], v1, value_tol<TestType>() * 10));
  CHECK(close(vals[1], v2, value_tol<TestType>() * 10));
  CHECK(rel_err(to_double(gd.download()), sum) <= 20 * grad_tol<TestType>());
  // Statistics of both in one run.
  device_buffer<double> s1(1), s2(1);
  f.local_stats(din, {s1.get(), s2.get()}, env.backend(f.workspace_size(din)));
  env.sync();
  CHECK(s1.download()[0] == sp.local_stats(hin)[0]);
  CHECK(s2.download()[0] == sp.local_stats(hin)[0]);
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda Gram losses check top-k ids and layout maps on the device", "[cuda][specialization][status]") {
  gpu_env env;
  gram_case<float> c(31, 50, 3, 16, 0.0, 0.0);
  moereg::specialization_loss sp{{1.0}};
  const auto I0 = c.I, rows0 = c.row_of;
  auto run_grouped = [&](std::vector<std::int64_t> rows_map, std::vector<std::int64_t> I, std::vector<double>& grad) {
    c.row_of = std::move(rows_map);
    c.I = std::move(I);
    c.upload();
    const auto X = c.store(lay::token_major);  // token-major data reused as [rows, d] rows
    std::vector<float> Xg(static_cast<std::size_t>(c.rows * c.d), 1.0f);
    for (std::size_t i = 0; i < Xg.size() && i < X.size(); ++i) Xg[i] = X[i];
    device_buffer<float> dX(Xg), gd(Xg.size());
    gd.fill_bytes(0);
    const moereg::specialization_inputs<float, moereg::expert_grouped> in{
        {dX.get(), c.grouped_layout(true)}, c.topk(true), c.mask(true), c.E};
    env.clear_status();
    (void)sp.value_and_grad(in, {gd.get(), c.grouped_layout(true)}, {}, {},
                            env.backend(moereg::workspace_size(sp, in)));
    grad = to_double(gd.download());
    return env.read_status();
  };
  std::vector<double> grad;
  SECTION("two slots sharing one row") {
    auto rows_map = rows0;
    rows_map[7] = rows_map[3];
    CHECK(run_grouped(rows_map, I0, grad) == moereg::cuda_layout_repeated);
    CHECK(std::isnan(env.value()));
    // The other slots of the two tokens concerned (1 and 2) are poisoned, other tokens are not;
    // the shared vector itself is never written.
    CHECK(std::isnan(grad[static_cast<std::size_t>(rows0[4] * c.d)]));
    CHECK(std::isnan(grad[static_cast<std::size_t>(rows0[6] * c.d)]));
    CHECK(grad[static_cast<std::size_t>(rows0[3] * c.d)] == 0.0);
    CHECK(std::isfinite(grad[static_cast<std::size_t>(rows0[0] * c.d)]));
  }
  SECTION("a row out of range") {
    auto rows_map = rows0;
    rows_map[4] = c.rows + 5;
    CHECK(run_grouped(rows_map, I0, grad) == moereg::cuda_layout_out_of_range);
    CHECK(std::isnan(env.value()));
  }
  SECTION("a top-k id >= num_experts and a repeated id") {
    auto I = I0;
    I[0] = c.E;
    CHECK(run_grouped(rows0, I, grad) == moereg::cuda_topk_out_of_range);
    I = I0;
    I[5 * 3 + 1] = I[5 * 3 + 0];
    CHECK(run_grouped(rows0, I, grad) == moereg::cuda_topk_repeated);
  }
  SECTION("a clean map passes") {
    CHECK(run_grouped(rows0, I0, grad) == moereg::cuda_ok);
    CHECK(std::isfinite(env.value()));
  }
}
