// moereg's CUDA backend against the device's copy bandwidth, in one run on one GPU:
//   copy            cudaMemcpyAsync device to device of 2 x 512 MiB (read + write bytes / time)
//   specialization  value_and_grad, token-major [T, k, d] (T = 16384, k = 8, d = 2048 by default)
//   router5         moereg::router_fused: load balancing + z-loss + entropy + variance +
//                   importance on one [T, E] pair (T = 65536, E = 256 by default)
// for float and bfloat16. Each case is timed with CUDA events over `reps` launches after a
// warm-up, median of 5 such runs; bytes count every input read once and every gradient written
// once. Output: one JSON object per line (stdout, and --out FILE). No assertion: a measurement
// to read (benchmarks/RESULTS.md says how to run it: tools/gpu-check.sh).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include <moereg/backend/cuda.hpp>

namespace {

#define BENCH_CUDA(call)                                                                                              \
  do {                                                                                                                \
    const cudaError_t e_ = (call);                                                                                    \
    if (e_ != cudaSuccess) {                                                                                          \
      std::fprintf(stderr, "bench_cuda: %s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                                                   \
    }                                                                                                                 \
  } while (0)

template <class T>
T* device_alloc(std::size_t n) {
  void* p = nullptr;
  BENCH_CUDA(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

template <class T>
void upload(T* d, const std::vector<T>& h) {
  BENCH_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}

template <class T>
std::vector<T> random_values(std::size_t n, double scale, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0, scale);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(static_cast<float>(nd(g)));
  return v;
}

/// Median milliseconds per call of f() on `stream`: 5 runs of `reps` calls after a warm-up.
template <class F>
double time_ms(cudaStream_t stream, int reps, F&& f) {
  cudaEvent_t a, b;
  BENCH_CUDA(cudaEventCreate(&a));
  BENCH_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 2; ++i) f();
  BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    BENCH_CUDA(cudaEventRecord(a, stream));
    for (int i = 0; i < reps; ++i) f();
    BENCH_CUDA(cudaEventRecord(b, stream));
    BENCH_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, a, b));
    runs.push_back(static_cast<double>(ms) / reps);
  }
  BENCH_CUDA(cudaGetLastError());
  BENCH_CUDA(cudaEventDestroy(a));
  BENCH_CUDA(cudaEventDestroy(b));
  std::sort(runs.begin(), runs.end());
  return runs[2];
}

struct reporter {
  FILE* out = nullptr;
  double copy_gbps = 0;
  void line(const std::string& name, const std::string& dtype, const std::string& shape, double ms, double bytes) {
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "{\"case\": \"%s\", \"dtype\": \"%s\", \"shape\": \"%s\", \"ms\": %.4f, \"bytes\": %.0f, "
                  "\"GBps\": %.1f, \"pct_of_copy\": %.1f}",
                  name.c_str(), dtype.c_str(), shape.c_str(), ms, bytes, gbps,
                  copy_gbps > 0 ? 100.0 * gbps / copy_gbps : 100.0);
    std::printf("%s\n", buf);
    if (out != nullptr) std::fprintf(out, "%s\n", buf);
  }
};

/// Device-to-device copy of `mib` MiB: the bandwidth floor the losses are measured against.
double bench_copy(reporter& rep, cudaStream_t stream, std::size_t mib, int reps) {
  const std::size_t n = mib << 20;
  char* src = device_alloc<char>(n);
  char* dst = device_alloc<char>(n);
  BENCH_CUDA(cudaMemset(src, 1, n));
  const double ms =
      time_ms(stream, reps, [&] { BENCH_CUDA(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream)); });
  const double bytes = 2.0 * static_cast<double>(n);
  rep.copy_gbps = bytes / (ms * 1e-3) / 1e9;
  rep.line("copy", "bytes", std::to_string(mib) + " MiB", ms, bytes);
  BENCH_CUDA(cudaFree(src));
  BENCH_CUDA(cudaFree(dst));
  return rep.copy_gbps;
}

template <class T>
const char* dtype_name() {
  return std::is_same<T, float>::value ? "float32" : "bfloat16";
}

/// Specialization loss, value_and_grad, token-major [T, k, d]; every slot valid.
template <class T>
void bench_specialization(reporter& rep, cudaStream_t stream, long long T_, long long k, long long d, int reps) {
  const std::size_t n = static_cast<std::size_t>(T_ * k * d);
  T* h = device_alloc<T>(n);
  T* g = device_alloc<T>(n);
  upload(h, random_values<T>(n, 1.0, 1));
  std::vector<std::int32_t> topk(static_cast<std::size_t>(T_ * k));
  for (long long t = 0; t < T_; ++t)
    for (long long s = 0; s < k; ++s)
      topk[static_cast<std::size_t>(t * k + s)] = static_cast<std::int32_t>((t + s * 5) % 64);
  std::int32_t* I = device_alloc<std::int32_t>(topk.size());
  upload(I, topk);
  const moereg::specialization_loss loss{};
  const moereg::specialization_inputs<T, moereg::token_major> in{
      {h, moereg::token_major(T_, k, d)}, moereg::topk_view(I, T_, k), {}, 64};
  const std::size_t ws = moereg::workspace_size(loss, in);
  void* w = device_alloc<char>(ws);
  double* value = device_alloc<double>(1);
  moereg::cuda be;
  be.stream = stream;
  be.workspace = w;
  be.workspace_bytes = ws;
  be.value = value;
  const moereg::activation_view<T, moereg::token_major> gv{g, moereg::token_major(T_, k, d)};
  const double ms = time_ms(stream, reps, [&] { (void)loss.value_and_grad(in, gv, {}, {}, be); });
  const double bytes =
      2.0 * static_cast<double>(n * sizeof(T)) + static_cast<double>(topk.size() * sizeof(std::int32_t));
  rep.line("specialization", dtype_name<T>(),
           "T=" + std::to_string(T_) + " k=" + std::to_string(k) + " d=" + std::to_string(d), ms, bytes);
  for (void* p : {static_cast<void*>(h), static_cast<void*>(g), static_cast<void*>(I), w, static_cast<void*>(value)})
    BENCH_CUDA(cudaFree(p));
}

/// The five router losses fused on one [T, E] pair (P for four of them, Z for the z-loss).
template <class T>
void bench_router5(reporter& rep, cudaStream_t stream, long long T_, long long E, long long k, int reps) {
  const std::size_t n = static_cast<std::size_t>(T_ * E);
  T* P = device_alloc<T>(n);
  T* Z = device_alloc<T>(n);
  T* gP = device_alloc<T>(n);
  T* gZ = device_alloc<T>(n);
  std::vector<T> hp(n);
  {
    std::mt19937_64 gen(2);
    std::uniform_real_distribution<double> u(0.5, 1.5);
    for (long long t = 0; t < T_; ++t) {
      std::vector<double> row(static_cast<std::size_t>(E));
      double s = 0;
      for (auto& x : row) s += (x = u(gen));
      for (long long e = 0; e < E; ++e)
        hp[static_cast<std::size_t>(t * E + e)] =
            static_cast<T>(static_cast<float>(row[static_cast<std::size_t>(e)] / s));
    }
  }
  upload(P, hp);
  upload(Z, random_values<T>(n, 2.0, 3));
  std::vector<std::int32_t> topk(static_cast<std::size_t>(T_ * k));
  for (long long t = 0; t < T_; ++t)
    for (long long s = 0; s < k; ++s)
      topk[static_cast<std::size_t>(t * k + s)] = static_cast<std::int32_t>((t * 7 + s * 3) % E);
  std::int32_t* I = device_alloc<std::int32_t>(topk.size());
  upload(I, topk);
  const moereg::load_balancing_loss lb{};
  const moereg::z_loss zl{};
  const moereg::entropy_loss ent{};
  const moereg::variance_loss var{};
  const moereg::importance_loss imp{};
  moereg::router_fused f;
  f.load_balancing = &lb;
  f.z = &zl;
  f.entropy = &ent;
  f.variance = &var;
  f.importance = &imp;
  const moereg::router_fused_inputs<T> in{{P, T_, E}, {Z, T_, E}, moereg::topk_view(I, T_, k), {}};
  const std::size_t ws = f.workspace_size(in);
  void* w = device_alloc<char>(ws);
  double* values = device_alloc<double>(moereg::router_fused::slots);
  moereg::cuda be;
  be.stream = stream;
  be.workspace = w;
  be.workspace_bytes = ws;
  be.value = values;
  const double ms = time_ms(stream, reps, [&] {
    f.value_and_grad(in, moereg::matrix_view<T>(gP, T_, E), moereg::matrix_view<T>(gZ, T_, E), {}, {}, be);
  });
  // P and Z read once, both gradients written once, topk read once.
  const double bytes =
      4.0 * static_cast<double>(n * sizeof(T)) + static_cast<double>(topk.size() * sizeof(std::int32_t));
  rep.line("router5_fused", dtype_name<T>(),
           "T=" + std::to_string(T_) + " E=" + std::to_string(E) + " k=" + std::to_string(k), ms, bytes);
  for (void* p : {static_cast<void*>(P), static_cast<void*>(Z), static_cast<void*>(gP), static_cast<void*>(gZ),
                  static_cast<void*>(I), w, static_cast<void*>(values)})
    BENCH_CUDA(cudaFree(p));
}

long long arg(int argc, char** argv, const char* name, long long dflt) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoll(argv[i + 1]);
  return dflt;
}

}  // namespace

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "bench_cuda: no CUDA device\n");
    return 77;  // skipped
  }
  const char* out_path = nullptr;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--out") == 0) out_path = argv[i + 1];
  const int reps = static_cast<int>(arg(argc, argv, "--reps", 10));
  const long long st = arg(argc, argv, "--sp-tokens", 16384), sk = arg(argc, argv, "--sp-k", 8),
                  sd = arg(argc, argv, "--sp-d", 2048);
  const long long rt = arg(argc, argv, "--router-tokens", 65536), re = arg(argc, argv, "--router-experts", 256),
                  rk = arg(argc, argv, "--router-k", 8);
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  reporter rep;
  if (out_path != nullptr) rep.out = std::fopen(out_path, "w");
  std::printf("{\"device\": \"%s\", \"sm\": \"%d.%d\", \"memory_GiB\": %.1f}\n", prop.name, prop.major, prop.minor,
              static_cast<double>(prop.totalGlobalMem) / (1 << 30));
  if (rep.out != nullptr)
    std::fprintf(rep.out, "{\"device\": \"%s\", \"sm\": \"%d.%d\"}\n", prop.name, prop.major, prop.minor);
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreate(&stream));
  bench_copy(rep, stream, 512, reps);
  bench_specialization<moereg::bfloat16>(rep, stream, st, sk, sd, reps);
  bench_specialization<float>(rep, stream, st, sk, sd, reps);
  bench_router5<moereg::bfloat16>(rep, stream, rt, re, rk, reps);
  bench_router5<float>(rep, stream, rt, re, rk, reps);
  BENCH_CUDA(cudaStreamDestroy(stream));
  if (rep.out != nullptr) std::fclose(rep.out);
  return 0;
}
