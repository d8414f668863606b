// The CUDA bias update against the CPU one: same counts, same bias, every storage type, with
// and without centring; a non-finite count is reported and leaves the bias untouched.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "cuda/support.cuh"

using namespace moereg_cuda_test;
using moereg::index_t;

TEMPLATE_TEST_CASE("cuda bias update matches the CPU update", "[cuda][bias_update]", float, double, moereg::half,
                   moereg::bfloat16) {
  gpu_env env;
  std::mt19937_64 gen(5);
  std::uniform_int_distribution<int> cnt(0, 40);
  std::normal_distribution<double> nd(0.0, 0.01);
  for (index_t E : {1, 2, 7, 64, 257, 1000}) {
    std::vector<double> counts(static_cast<std::size_t>(E));
    for (auto& c : counts) c = cnt(gen);
    if (E > 2) counts[1] = counts[2];  // ties with each other; the mean itself is hit by E = 1
    std::vector<TestType> bias(static_cast<std::size_t>(E));
    for (auto& b : bias) b = static_cast<TestType>(nd(gen));
    for (bool center : {false, true}) {
      const moereg::bias_update_config cfg{1e-3, center};
      std::vector<TestType> expect = bias;
      moereg::bias_update(cfg, counts.data(), E, expect.data(), E);
      device_buffer<double> dc(counts);
      device_buffer<TestType> db(bias);
      moereg::bias_update(cfg, dc.get(), E, db.get(), E, env.backend(0));
      env.sync();
      const std::vector<TestType> got = db.download();
      INFO("E = " << E << " center = " << center);
      // Same arithmetic; mean(c) of integer counts is exact in both orders, mean(b) may differ
      // in its last bit between the CPU's pairwise and the device's tree order.
      CHECK(rel_err(to_double(got), to_double(expect)) <= (!center ? 0.0 : sizeof(TestType) == 2 ? 1e-2 : 1e-5));
    }
  }
  CHECK(env.read_status() == moereg::cuda_ok);
}

TEST_CASE("cuda bias update: a non-finite count is reported and writes nothing", "[cuda][bias_update]") {
  gpu_env env;
  std::vector<float> counts = {3, 4, std::numeric_limits<float>::quiet_NaN(), 1};
  std::vector<float> bias = {0.5f, -0.25f, 0.125f, 1.0f};
  device_buffer<float> dc(counts), db(bias);
  moereg::bias_update(moereg::bias_update_config{}, dc.get(), 4, db.get(), 4, env.backend(0));
  CHECK(env.read_status() == moereg::cuda_bad_stats);
  CHECK(db.download() == bias);
  CHECK_THROWS_AS(moereg::bias_update(moereg::bias_update_config{}, dc.get(), 4, db.get(), 3, env.backend(0)),
                  moereg::error);
}
