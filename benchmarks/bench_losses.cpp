// value_and_grad of every moereg loss on the CPU against the memory-bandwidth floor, plus a
// STREAM-like copy kernel and the naive float64 reference (tests/reference/reference.hpp).
//
//   moereg_bench [--smoke] [Google Benchmark flags]
//
// Counters of every loss case:
//   bytes_per_second  the minimum bytes of the case (each input read once, each output written
//                     once) per second of real time
//   pct_copy          that rate as a percentage of the copy bandwidth measured at start-up with
//                     the same number of threads
//   items_per_second  tokens per second (the unit of the reference comparison)
//   ws_MiB, sets      the rotated working set: iterations cycle through `sets` independent
//                     copies of the inputs and gradient buffers, ws_MiB in all
// --smoke (or MOEREG_BENCH_SMOKE=1) shrinks every size and runs one iteration per case.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include <moereg/moereg.hpp>

#include "bench_common.hpp"
#include "reference/reference.hpp"

namespace {

using bench::cfg;

enum class router_kind { load_balancing, z_loss, entropy, importance, variance };
const char* name_of(router_kind k) {
  switch (k) {
    case router_kind::load_balancing:
      return "load_balancing";
    case router_kind::z_loss:
      return "z_loss";
    case router_kind::entropy:
      return "entropy";
    case router_kind::importance:
      return "importance";
    default:
      return "variance";
  }
}

template <class T>
const char* type_name() {
  return sizeof(T) == 4 ? "f32" : "bf16";
}

template <class T>
std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(v[i]);
  return out;
}

constexpr double MiB = 1024.0 * 1024.0;

// Sizes (full / smoke).
long long router_T() {
  return cfg().smoke ? 64 : 16384;
}
long long act_T() {
  return cfg().smoke ? 16 : 4096;
}
long long act_d(long long d) {
  return cfg().smoke ? d / 32 : d;
}
constexpr long long router_k = 8;  // top-k width of the router cases
constexpr long long layers = 4;    // coupling L

// Common counters; `min_bytes` per iteration.
void set_counters(benchmark::State& st, int threads, double min_bytes, long long tokens, double ws_bytes, int sets) {
  const auto it = static_cast<std::int64_t>(st.iterations());
  st.SetBytesProcessed(static_cast<std::int64_t>(min_bytes) * it);
  st.SetItemsProcessed(tokens * it);
  const double bw = bench::copy_bandwidth(threads);
  st.counters["pct_copy"] =
      benchmark::Counter(bw > 0 ? 100.0 * min_bytes / bw : 0.0, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["ws_MiB"] = ws_bytes / MiB;
  st.counters["sets"] = sets;
}

// ---------------------------------------------------------------------------------------------
// Router losses: one [T, E] input (and topk for load balancing), one [T, E] gradient.

template <class T>
void bm_router(benchmark::State& st, router_kind kind, long long E, int threads) {
  const long long Tn = router_T(), k = router_k;
  const bool uses_topk = kind == router_kind::load_balancing;
  const double sz = sizeof(T), idx_bytes = static_cast<double>(Tn * k) * 4.0;
  const double in_bytes = static_cast<double>(Tn * E) * sz + (uses_topk ? idx_bytes : 0.0);
  const double out_bytes = static_cast<double>(Tn * E) * sz;
  const double set_bytes = in_bytes + out_bytes + (uses_topk ? 0.0 : idx_bytes);
  const int nsets = bench::rotation_sets(set_bytes);
  const std::vector<T> P0 = convert<T>(bench::make_probs(Tn, E, 1));
  const std::vector<std::int32_t> I0 = bench::make_topk(Tn, k, E, 2);
  std::vector<std::vector<T>> P(nsets, P0), G(nsets, std::vector<T>(P0.size()));
  std::vector<std::vector<std::int32_t>> I(nsets, I0);
  const moereg::cpu be{threads};
  int s = 0;
  double last = 0;
  for (auto _ : st) {
    const moereg::routing_view<T> pv(P[s].data(), Tn, E);
    const moereg::matrix_view<T> gv(G[s].data(), Tn, E);
    const moereg::topk_view iv(I[s].data(), Tn, k);
    double v = 0;
    switch (kind) {
      case router_kind::load_balancing:
        v = moereg::load_balancing_loss{}.value_and_grad(moereg::load_balancing_inputs<T>{pv, iv}, gv, {}, {}, be);
        break;
      case router_kind::z_loss:
        v = moereg::z_loss{}.value_and_grad(moereg::z_loss_inputs<T>{pv}, gv, {}, {}, be);
        break;
      case router_kind::entropy:
        v = moereg::entropy_loss{}.value_and_grad(moereg::entropy_inputs<T>{pv}, gv, {}, {}, be);
        break;
      case router_kind::importance:
        v = moereg::importance_loss{}.value_and_grad(moereg::importance_inputs<T>{pv}, gv, {}, {}, be);
        break;
      case router_kind::variance:
        v = moereg::variance_loss{}.value_and_grad(moereg::variance_inputs<T>{pv}, gv, {}, {}, be);
        break;
    }
    benchmark::DoNotOptimize(v);
    benchmark::ClobberMemory();
    last = v;
    s = (s + 1) % nsets;
  }
  set_counters(st, threads, in_bytes + out_bytes, Tn, set_bytes * nsets, nsets);
  st.counters["value"] = last;
}

// ---------------------------------------------------------------------------------------------
// Five router losses on one batch, as a trainer calls them: load balancing, entropy,
// importance and variance on P (one shared gradient), the z-loss on the logits Z (its own).
// `fused`: one moereg::fuse call (P read once, its gradient written once); otherwise five
// value_and_grad calls, the later ones accumulating into P's gradient.

template <class T>
void bm_router5(benchmark::State& st, bool fused, long long E, int threads) {
  const long long Tn = router_T(), k = router_k;
  const double sz = sizeof(T), idx_bytes = static_cast<double>(Tn * k) * 4.0;
  const double mat = static_cast<double>(Tn * E) * sz;
  const double min_bytes = 2 * mat + idx_bytes + 2 * mat;  // P, Z, topk read; two gradients written
  const int nsets = bench::rotation_sets(min_bytes);
  const std::vector<T> P0 = convert<T>(bench::make_probs(Tn, E, 1)), Z0 = convert<T>(bench::make_probs(Tn, E, 3));
  const std::vector<std::int32_t> I0 = bench::make_topk(Tn, k, E, 2);
  std::vector<std::vector<T>> P(nsets, P0), Z(nsets, Z0), GP(nsets, std::vector<T>(P0.size())), GZ = GP;
  std::vector<std::vector<std::int32_t>> I(nsets, I0);
  const moereg::cpu be{threads};
  const moereg::load_balancing_loss lb{};
  const moereg::z_loss zl{};
  const moereg::entropy_loss ent{};
  const moereg::importance_loss imp{};
  const moereg::variance_loss var{};
  const auto f = moereg::fuse(lb, zl, ent, imp, var);
  const moereg::grad_options acc{1.0, true};
  int s = 0;
  double last = 0;
  for (auto _ : st) {
    const moereg::routing_view<T> pv(P[s].data(), Tn, E), zv(Z[s].data(), Tn, E);
    const moereg::matrix_view<T> gp(GP[s].data(), Tn, E), gz(GZ[s].data(), Tn, E);
    const moereg::load_balancing_inputs<T> lb_in{pv, moereg::topk_view(I[s].data(), Tn, k)};
    const moereg::z_loss_inputs<T> z_in{zv};
    const moereg::entropy_inputs<T> ent_in{pv};
    const moereg::importance_inputs<T> imp_in{pv};
    const moereg::variance_inputs<T> var_in{pv};
    double v = 0;
    if (fused) {
      const auto r = f.value_and_grad(std::tie(lb_in, z_in, ent_in, imp_in, var_in),
                                      std::make_tuple(gp, gz, gp, gp, gp), {}, {}, be);
      v = r[0] + r[1] + r[2] + r[3] + r[4];
    } else {
      v = lb.value_and_grad(lb_in, gp, {}, {}, be) + zl.value_and_grad(z_in, gz, {}, {}, be) +
          ent.value_and_grad(ent_in, gp, acc, {}, be) + imp.value_and_grad(imp_in, gp, acc, {}, be) +
          var.value_and_grad(var_in, gp, acc, {}, be);
    }
    benchmark::DoNotOptimize(v);
    benchmark::ClobberMemory();
    last = v;
    s = (s + 1) % nsets;
  }
  set_counters(st, threads, min_bytes, Tn, min_bytes * nsets, nsets);
  st.counters["value"] = last;
}

// ---------------------------------------------------------------------------------------------
// Coupling: L layers of P [T, E], topk [T, k] and gradients [T, E].

template <class T>
void bm_coupling(benchmark::State& st, moereg::coupling_form form, long long E, int threads) {
  const long long Tn = router_T(), k = router_k, L = layers;
  const bool uses_topk = form != moereg::coupling_form::batch;  // batch reads only the width
  const double sz = sizeof(T), mat = static_cast<double>(Tn * E) * sz, idx = static_cast<double>(Tn * k) * 4.0;
  const double in_bytes = static_cast<double>(L) * (mat + (uses_topk ? idx : 0.0));
  const double out_bytes = static_cast<double>(L) * mat;
  const double set_bytes = static_cast<double>(L) * (2.0 * mat + idx);
  const int nsets = bench::rotation_sets(set_bytes);
  struct set {
    std::vector<std::vector<T>> P, G;
    std::vector<std::vector<std::int32_t>> I;
  };
  std::vector<set> sets(1);
  for (long long l = 0; l < L; ++l) {
    sets[0].P.push_back(convert<T>(bench::make_probs(Tn, E, 10 + static_cast<std::uint64_t>(l))));
    sets[0].I.push_back(bench::make_topk(Tn, k, E, 20 + static_cast<std::uint64_t>(l)));
    sets[0].G.emplace_back(static_cast<std::size_t>(Tn * E));
  }
  const set first = sets[0];
  sets.resize(static_cast<std::size_t>(nsets), first);
  std::vector<std::vector<moereg::routing_view<T>>> pv(nsets);
  std::vector<std::vector<moereg::topk_view>> iv(nsets);
  std::vector<std::vector<moereg::matrix_view<T>>> gv(nsets);
  for (int s = 0; s < nsets; ++s)
    for (long long l = 0; l < L; ++l) {
      pv[s].emplace_back(sets[s].P[l].data(), Tn, E);
      iv[s].emplace_back(sets[s].I[l].data(), Tn, k);
      gv[s].emplace_back(sets[s].G[l].data(), Tn, E);
    }
  moereg::coupling_loss loss;
  loss.cfg.form = form;
  const moereg::cpu be{threads};
  int s = 0;
  double last = 0;
  for (auto _ : st) {
    const moereg::coupling_inputs<T> in{pv[s].data(), iv[s].data(), L};
    double v = loss.value_and_grad(in, gv[s].data(), {}, {}, be);
    benchmark::DoNotOptimize(v);
    benchmark::ClobberMemory();
    last = v;
    s = (s + 1) % nsets;
  }
  set_counters(st, threads, in_bytes + out_bytes, Tn, set_bytes * nsets, nsets);
  st.counters["value"] = last;
}

// ---------------------------------------------------------------------------------------------
// Activation losses: h [T, k, d] token-major, topk [T, k], gradient [T, k, d].

enum class act_kind { specialization, orthogonality };

template <class T>
void bm_activation(benchmark::State& st, act_kind kind, long long k, long long d_full, int threads) {
  const long long Tn = act_T(), d = act_d(d_full), E = 64;
  const double in_bytes = static_cast<double>(Tn * k * d) * sizeof(T) + static_cast<double>(Tn * k) * 4.0;
  const double out_bytes = static_cast<double>(Tn * k * d) * sizeof(T);
  const double set_bytes = in_bytes + out_bytes;
  const int nsets = bench::rotation_sets(set_bytes);
  std::vector<std::vector<T>> H(static_cast<std::size_t>(nsets), convert<T>(bench::make_acts(Tn, k, d, 3)));
  std::vector<std::vector<T>> G(static_cast<std::size_t>(nsets), std::vector<T>(H[0].size()));
  std::vector<std::vector<std::int32_t>> I(static_cast<std::size_t>(nsets), bench::make_topk(Tn, k, E, 4));
  const moereg::cpu be{threads};
  int s = 0;
  double last = 0;
  for (auto _ : st) {
    const auto hv = moereg::token_major_view<const T>(H[s].data(), Tn, k, d);
    const auto gv = moereg::token_major_view<T>(G[s].data(), Tn, k, d);
    const moereg::topk_view iv(I[s].data(), Tn, k);
    double v = 0;
    if (kind == act_kind::specialization)
      v = moereg::specialization_loss{}.value_and_grad(moereg::specialization_inputs<T, moereg::token_major>{hv, iv},
                                                       gv, {}, {}, be);
    else
      v = moereg::orthogonality_loss{}.value_and_grad(moereg::orthogonality_inputs<T, moereg::token_major>{hv, iv}, gv,
                                                      {}, {}, be);
    benchmark::DoNotOptimize(v);
    benchmark::ClobberMemory();
    last = v;
    s = (s + 1) % nsets;
  }
  set_counters(st, threads, in_bytes + out_bytes, Tn, set_bytes * nsets, nsets);
  st.counters["value"] = last;
}

// ---------------------------------------------------------------------------------------------
// Copy kernel as a benchmark of its own (the same kernel the start-up measurement uses).

void bm_copy(benchmark::State& st, int threads) {
  const long long n = bench::copy_elems();
  std::vector<float> a(static_cast<std::size_t>(n), 1.0f), b(static_cast<std::size_t>(n), 0.0f);
  for (auto _ : st) {
    bench::copy_kernel(a.data(), b.data(), n, threads);
    benchmark::ClobberMemory();
  }
  const double bytes = 2.0 * static_cast<double>(n) * sizeof(float);
  set_counters(st, threads, bytes, 0, bytes, 1);
}

// ---------------------------------------------------------------------------------------------
// Naive float64 reference, serial, at a reduced token count (compare per token).

long long ref_router_T() {
  return cfg().smoke ? 32 : 2048;
}
long long ref_act_T() {
  return cfg().smoke ? 8 : 256;
}

std::vector<long long> to_ll(const std::vector<std::int32_t>& v) {
  return {v.begin(), v.end()};
}
std::vector<double> to_d(const std::vector<float>& v) {
  return {v.begin(), v.end()};
}

void bm_ref_router(benchmark::State& st, router_kind kind, long long E) {
  const long long Tn = ref_router_T(), k = router_k;
  const auto P = to_d(bench::make_probs(Tn, E, 1));
  const auto I = to_ll(bench::make_topk(Tn, k, E, 2));
  const std::vector<int> mask;
  for (auto _ : st) {
    moereg_ref::result r;
    switch (kind) {
      case router_kind::load_balancing:
        r = moereg_ref::load_balancing(P, I, mask, Tn, E, k, 1e-2);
        break;
      case router_kind::z_loss:
        r = moereg_ref::z_loss(P, mask, Tn, E, 1e-3);
        break;
      case router_kind::entropy:
        r = moereg_ref::entropy(P, mask, Tn, E, 1e-3);
        break;
      case router_kind::importance:
        r = moereg_ref::importance(P, mask, Tn, E, 1e-2);
        break;
      case router_kind::variance:
        r = moereg_ref::variance(P, mask, Tn, E, 1e-3, "tokens", false);
        break;
    }
    benchmark::DoNotOptimize(r.value);
    benchmark::DoNotOptimize(r.grad.data());
  }
  st.SetItemsProcessed(Tn * static_cast<std::int64_t>(st.iterations()));
}

void bm_ref_coupling(benchmark::State& st, const std::string& form, long long E) {
  const long long Tn = ref_router_T(), k = router_k;
  std::vector<std::vector<double>> P;
  std::vector<std::vector<long long>> I;
  for (long long l = 0; l < layers; ++l) {
    P.push_back(to_d(bench::make_probs(Tn, E, 10 + static_cast<std::uint64_t>(l))));
    I.push_back(to_ll(bench::make_topk(Tn, k, E, 20 + static_cast<std::uint64_t>(l))));
  }
  const std::vector<long long> ks(static_cast<std::size_t>(layers), k);
  for (auto _ : st) {
    auto r = moereg_ref::coupling(P, I, ks, {}, Tn, E, 1e-3, form, 1e-12);
    benchmark::DoNotOptimize(r.first);
    benchmark::DoNotOptimize(r.second.data());
  }
  st.SetItemsProcessed(Tn * static_cast<std::int64_t>(st.iterations()));
}

void bm_ref_activation(benchmark::State& st, act_kind kind, long long k, long long d_full) {
  const long long Tn = ref_act_T(), d = act_d(d_full);
  const auto H = to_d(bench::make_acts(Tn, k, d, 3));
  const auto I = to_ll(bench::make_topk(Tn, k, 64, 4));
  for (auto _ : st) {
    moereg_ref::result r = kind == act_kind::specialization
                               ? moereg_ref::specialization(H, I, {}, Tn, k, d, 2e-3, false, 1e-8)
                               : moereg_ref::orthogonality(H, I, {}, Tn, k, d, 1e-4, false, "pairwise", 1e-6);
    benchmark::DoNotOptimize(r.value);
    benchmark::DoNotOptimize(r.grad.data());
  }
  st.SetItemsProcessed(Tn * static_cast<std::int64_t>(st.iterations()));
}

// ---------------------------------------------------------------------------------------------

void finish(benchmark::internal::Benchmark* b) {
  b->UseRealTime()->Unit(benchmark::kMillisecond);
  if (cfg().smoke) b->Iterations(1);
}

template <class T>
void register_typed() {
  const std::string tn = type_name<T>();
  for (int th : {1, 2}) {
    const std::string ts = "/threads:" + std::to_string(th);
    for (router_kind kind : {router_kind::load_balancing, router_kind::z_loss, router_kind::entropy,
                             router_kind::importance, router_kind::variance})
      for (long long E : {64ll, 256ll})
        finish(benchmark::RegisterBenchmark((std::string(name_of(kind)) + "/" + tn +
                                             "/T:" + std::to_string(router_T()) + "/E:" + std::to_string(E) + ts)
                                                .c_str(),
                                            [=](benchmark::State& st) { bm_router<T>(st, kind, E, th); }));
    for (bool fused : {false, true})
      for (long long E : {64ll, 256ll})
        finish(benchmark::RegisterBenchmark((std::string(fused ? "router5_fused" : "router5_separate") + "/" + tn +
                                             "/T:" + std::to_string(router_T()) + "/E:" + std::to_string(E) + ts)
                                                .c_str(),
                                            [=](benchmark::State& st) { bm_router5<T>(st, fused, E, th); }));
    for (auto form : {moereg::coupling_form::token, moereg::coupling_form::batch})
      for (long long E : {64ll, 256ll})
        finish(benchmark::RegisterBenchmark(
            (std::string(form == moereg::coupling_form::token ? "coupling_token" : "coupling_batch") + "/" + tn +
             "/T:" + std::to_string(router_T()) + "/E:" + std::to_string(E) + "/L:4" + ts)
                .c_str(),
            [=](benchmark::State& st) { bm_coupling<T>(st, form, E, th); }));
    for (act_kind kind : {act_kind::specialization, act_kind::orthogonality})
      for (long long k : {2ll, 8ll})
        for (long long d : {1024ll, 2048ll})
          finish(benchmark::RegisterBenchmark(
              (std::string(kind == act_kind::specialization ? "specialization" : "orthogonality") + "/" + tn +
               "/T:" + std::to_string(act_T()) + "/k:" + std::to_string(k) + "/d:" + std::to_string(act_d(d)) + ts)
                  .c_str(),
              [=](benchmark::State& st) { bm_activation<T>(st, kind, k, d, th); }));
  }
}

void register_all() {
  for (int th : {1, 2})
    finish(benchmark::RegisterBenchmark(
        ("copy/f32/MiB:" + std::to_string(bench::copy_elems() * 4 / (1 << 20)) + "/threads:" + std::to_string(th))
            .c_str(),
        [=](benchmark::State& st) { bm_copy(st, th); }));
  register_typed<float>();
  register_typed<moereg::bfloat16>();
  for (router_kind kind : {router_kind::load_balancing, router_kind::z_loss, router_kind::entropy,
                           router_kind::importance, router_kind::variance})
    for (long long E : {64ll, 256ll})
      finish(benchmark::RegisterBenchmark(
          (std::string("ref_") + name_of(kind) + "/f64/T:" + std::to_string(ref_router_T()) + "/E:" + std::to_string(E))
              .c_str(),
          [=](benchmark::State& st) { bm_ref_router(st, kind, E); }));
  for (const char* form : {"token", "batch"})
    for (long long E : {64ll, 256ll})
      finish(benchmark::RegisterBenchmark((std::string("ref_coupling_") + form + "/f64/T:" +
                                           std::to_string(ref_router_T()) + "/E:" + std::to_string(E) + "/L:4")
                                              .c_str(),
                                          [=](benchmark::State& st) { bm_ref_coupling(st, form, E); }));
  for (act_kind kind : {act_kind::specialization, act_kind::orthogonality})
    for (long long k : {2ll, 8ll})
      for (long long d : {1024ll, 2048ll})
        finish(benchmark::RegisterBenchmark(
            (std::string(kind == act_kind::specialization ? "ref_specialization" : "ref_orthogonality") +
             "/f64/T:" + std::to_string(ref_act_T()) + "/k:" + std::to_string(k) + "/d:" + std::to_string(act_d(d)))
                .c_str(),
            [=](benchmark::State& st) { bm_ref_activation(st, kind, k, d); }));
}

}  // namespace

int main(int argc, char** argv) {
  bench::parse_smoke(argc, argv);
  for (int th : {1, 2}) {
    bench::copy_bandwidth(th) = bench::measure_copy_bandwidth(th);
    benchmark::AddCustomContext("copy_GBps_threads_" + std::to_string(th),
                                std::to_string(bench::copy_bandwidth(th) * 1e-9));
  }
  benchmark::AddCustomContext("smoke", cfg().smoke ? "1" : "0");
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
