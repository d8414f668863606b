// LibTorch autograd of the same formulas as moereg's losses (forward + backward through
// autograd), at the same sizes as moereg_bench, float32, 1 and 2 intra-op threads. The
// baseline for the speedups in RESULTS.md; built only when find_package(Torch) succeeds.
//
//   moereg_bench_torch [--smoke] [Google Benchmark flags]
//
// Counters: bytes_per_second (the same minimum bytes as moereg_bench), items_per_second
// (tokens per second). Inputs rotate through the same number of sets as moereg_bench uses.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace {

using bench::cfg;

long long router_T() {
  return cfg().smoke ? 64 : 16384;
}
long long act_T() {
  return cfg().smoke ? 16 : 4096;
}
long long act_d(long long d) {
  return cfg().smoke ? d / 32 : d;
}
constexpr long long router_k = 8;
constexpr long long layers = 4;

torch::Tensor from(const std::vector<float>& v, std::vector<int64_t> shape) {
  return torch::from_blob(const_cast<float*>(v.data()), shape, torch::kFloat32).clone();
}
torch::Tensor from_idx(const std::vector<std::int32_t>& v, std::vector<int64_t> shape) {
  return torch::from_blob(const_cast<std::int32_t*>(v.data()), shape, torch::kInt32).to(torch::kInt64);
}

void counters(benchmark::State& st, double min_bytes, long long tokens, int sets) {
  const auto it = static_cast<std::int64_t>(st.iterations());
  st.SetBytesProcessed(static_cast<std::int64_t>(min_bytes) * it);
  st.SetItemsProcessed(tokens * it);
  st.counters["sets"] = sets;
}

// --- router losses -----------------------------------------------------------------------------

torch::Tensor router_loss(const std::string& name, const torch::Tensor& P, const torch::Tensor& I, long long E) {
  const double Tn = static_cast<double>(P.size(0));
  if (name == "load_balancing") {
    auto f = torch::bincount(I.flatten(), {}, E).to(torch::kFloat32) / (static_cast<double>(router_k) * Tn);
    return 1e-2 * static_cast<double>(E) * (f * P.mean(0)).sum();
  }
  if (name == "z_loss") return 1e-3 * torch::logsumexp(P, 1).pow(2).mean();
  if (name == "entropy") return 1e-3 * (-(P * torch::log(P.clamp_min(1e-30))).sum(1)).mean();
  if (name == "importance") {
    auto imp = P.sum(0);
    return 1e-2 * imp.var(/*unbiased=*/false) / imp.mean().pow(2);
  }
  // variance, tokens axis, mean reduction
  return -1e-3 / static_cast<double>(E) * (P - P.mean(0)).pow(2).sum(1).mean();
}

void bm_router(benchmark::State& st, const std::string& name, long long E, int threads) {
  torch::set_num_threads(threads);
  const long long Tn = router_T(), k = router_k;
  const double bytes = 2.0 * Tn * E * 4.0 + (name == "load_balancing" ? Tn * k * 4.0 : 0.0);
  const int nsets = bench::rotation_sets(bytes);
  const auto P0 = from(bench::make_probs(Tn, E, 1), {Tn, E});
  const auto I = from_idx(bench::make_topk(Tn, k, E, 2), {Tn, k});
  std::vector<torch::Tensor> P;
  for (int s = 0; s < nsets; ++s) P.push_back(P0.clone().requires_grad_(true));
  int s = 0;
  double last = 0;
  for (auto _ : st) {
    auto L = router_loss(name, P[s], I, E);
    L.backward();
    last = L.item<double>();
    benchmark::DoNotOptimize(P[s].grad().data_ptr());
    P[s].mutable_grad() = torch::Tensor();
    s = (s + 1) % nsets;
  }
  counters(st, bytes, Tn, nsets);
  st.counters["value"] = last;
}

void bm_coupling(benchmark::State& st, const std::string& form, long long E, int threads) {
  torch::set_num_threads(threads);
  const long long Tn = router_T(), k = router_k, L = layers;
  const double bytes = static_cast<double>(L) * (2.0 * Tn * E * 4.0 + (form == "token" ? Tn * k * 4.0 : 0.0));
  const int nsets = bench::rotation_sets(bytes);
  std::vector<std::vector<torch::Tensor>> P(static_cast<std::size_t>(nsets));
  std::vector<torch::Tensor> I;
  for (long long l = 0; l < L; ++l) {
    const auto p = from(bench::make_probs(Tn, E, 10 + static_cast<std::uint64_t>(l)), {Tn, E});
    for (int s = 0; s < nsets; ++s) P[s].push_back(p.clone().requires_grad_(true));
    I.push_back(from_idx(bench::make_topk(Tn, k, E, 20 + static_cast<std::uint64_t>(l)), {Tn, k}));
  }
  int s = 0;
  double last = 0;
  for (auto _ : st) {
    torch::Tensor loss = torch::zeros({}, torch::kFloat32);
    if (form == "token") {
      std::vector<torch::Tensor> M;
      for (long long l = 0; l < L; ++l) M.push_back(P[s][l].gather(1, I[l]).sum(1));
      for (long long l = 0; l + 1 < L; ++l) loss = loss + (M[l] * M[l + 1]).mean();
      loss = -1e-3 * loss;
    } else {
      for (long long l = 0; l + 1 < L; ++l) {
        auto J = torch::matmul(P[s][l].t(), P[s][l + 1]) / static_cast<double>(Tn);
        loss = loss + std::get<0>(J.topk(k, 1)).sum();
      }
      loss = -1e-3 * loss;
    }
    loss.backward();
    last = loss.item<double>();
    for (long long l = 0; l < L; ++l) {
      benchmark::DoNotOptimize(P[s][l].grad().data_ptr());
      P[s][l].mutable_grad() = torch::Tensor();
    }
    s = (s + 1) % nsets;
  }
  counters(st, bytes, Tn, nsets);
  st.counters["value"] = last;
}

// --- activation losses -------------------------------------------------------------------------

void bm_activation(benchmark::State& st, bool specialization, long long k, long long d_full, int threads) {
  torch::set_num_threads(threads);
  const long long Tn = act_T(), d = act_d(d_full);
  const double bytes = 2.0 * Tn * k * d * 4.0 + Tn * k * 4.0;
  const int nsets = bench::rotation_sets(bytes);
  const auto H0 = from(bench::make_acts(Tn, k, d, 3), {Tn, k, d});
  std::vector<torch::Tensor> H;
  for (int s = 0; s < nsets; ++s) H.push_back(H0.clone().requires_grad_(true));
  int s = 0;
  double last = 0;
  for (auto _ : st) {
    const auto& h = H[s];
    torch::Tensor loss;
    if (specialization) {
      // c = <h_s, h_r> / (max(||h_s||, eps) max(||h_r||, eps)), sum over s != r of c^2
      auto n = h.norm(2, {2}, /*keepdim=*/true).clamp_min(1e-8);
      auto hn = h / n;
      auto C = torch::bmm(hn, hn.transpose(1, 2));
      loss = 2e-3 / static_cast<double>(Tn) * (C.pow(2).sum() - torch::diagonal(C, 0, 1, 2).pow(2).sum());
    } else {
      // term_{j,s} = <h_j, h_s>^2 ||h_s||^2 / (||h_s||^2 + eps)^2, j != s
      auto G = torch::bmm(h, h.transpose(1, 2));
      auto sq = torch::diagonal(G, 0, 1, 2);            // [T, k]
      auto w = (sq / (sq + 1e-6).pow(2)).unsqueeze(1);  // over s (the last index)
      auto terms = G.pow(2) * w;
      loss = 1e-4 / static_cast<double>(Tn) * (terms.sum() - torch::diagonal(terms, 0, 1, 2).sum());
    }
    loss.backward();
    last = loss.item<double>();
    benchmark::DoNotOptimize(h.grad().data_ptr());
    H[s].mutable_grad() = torch::Tensor();
    s = (s + 1) % nsets;
  }
  counters(st, bytes, Tn, nsets);
  st.counters["value"] = last;
}

void finish(benchmark::internal::Benchmark* b) {
  b->UseRealTime()->Unit(benchmark::kMillisecond);
  if (cfg().smoke) b->Iterations(1);
}

void register_all() {
  for (int th : {1, 2}) {
    const std::string ts = "/threads:" + std::to_string(th);
    for (const char* name : {"load_balancing", "z_loss", "entropy", "importance", "variance"})
      for (long long E : {64ll, 256ll})
        finish(benchmark::RegisterBenchmark(
            (std::string("torch_") + name + "/f32/T:" + std::to_string(router_T()) + "/E:" + std::to_string(E) + ts)
                .c_str(),
            [=](benchmark::State& st) { bm_router(st, name, E, th); }));
    for (const char* form : {"token", "batch"})
      for (long long E : {64ll, 256ll})
        finish(benchmark::RegisterBenchmark((std::string("torch_coupling_") + form + "/f32/T:" +
                                             std::to_string(router_T()) + "/E:" + std::to_string(E) + "/L:4" + ts)
                                                .c_str(),
                                            [=](benchmark::State& st) { bm_coupling(st, form, E, th); }));
    for (bool sp : {true, false})
      for (long long k : {2ll, 8ll})
        for (long long d : {1024ll, 2048ll})
          finish(benchmark::RegisterBenchmark(
              (std::string(sp ? "torch_specialization" : "torch_orthogonality") + "/f32/T:" + std::to_string(act_T()) +
               "/k:" + std::to_string(k) + "/d:" + std::to_string(act_d(d)) + ts)
                  .c_str(),
              [=](benchmark::State& st) { bm_activation(st, sp, k, d, th); }));
  }
}

}  // namespace

int main(int argc, char** argv) {
  bench::parse_smoke(argc, argv);
  benchmark::AddCustomContext("torch_version", TORCH_VERSION);
  benchmark::AddCustomContext("smoke", cfg().smoke ? "1" : "0");
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
