// One translation unit of the ABI-namespace test (tests/abi/CMakeLists.txt builds it twice,
// with different OpenMP and AVX-512 settings, as ABI_UNIT_NAME = abi_unit_a / abi_unit_b).
#include "abi_unit.hpp"

#include <cstdint>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/specialization.hpp>

#define ABI_STR2(x) #x
#define ABI_STR(x) ABI_STR2(x)

abi_result ABI_UNIT_NAME() {
  // A fixed problem: T = 300 tokens (two CPU blocks), k = 4 slots, d = 37, every fifth token masked.
  const moereg::index_t T = 300, k = 4, d = 37, E = 8;
  std::vector<float> h(static_cast<std::size_t>(T * k * d)), g(h.size()), P(static_cast<std::size_t>(T * E)),
      dP(P.size());
  std::vector<std::int32_t> topk(static_cast<std::size_t>(T * k));
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(T));
  std::uint32_t x = 12345;
  auto next = [&x] {
    x = x * 1664525u + 1013904223u;
    return static_cast<float>(x >> 8) / 16777216.0f - 0.5f;
  };
  for (auto& v : h) v = next();
  for (moereg::index_t t = 0; t < T; ++t) {
    float s = 0;
    for (moereg::index_t e = 0; e < E; ++e) s += (P[static_cast<std::size_t>(t * E + e)] = next() + 1.0f);
    for (moereg::index_t e = 0; e < E; ++e) P[static_cast<std::size_t>(t * E + e)] /= s;
    for (moereg::index_t s2 = 0; s2 < k; ++s2)
      topk[static_cast<std::size_t>(t * k + s2)] = static_cast<std::int32_t>((t + 3 * s2) % E);
    mask[static_cast<std::size_t>(t)] = t % 5 != 0;
  }
  using lay = moereg::token_major;
  const moereg::topk_view I(topk.data(), T, k);
  const moereg::mask_view m(mask.data(), T);
  abi_result r;
  r.abi = ABI_STR(MOEREG_ABI_NAMESPACE);
  r.specialization = moereg::specialization_loss{}.value_and_grad(
      moereg::specialization_inputs<float, lay>{{h.data(), lay(T, k, d)}, I, m}, {g.data(), lay(T, k, d)});
  r.load_balancing = moereg::load_balancing_loss{}.value_and_grad(
      moereg::load_balancing_inputs<float>{moereg::routing_view<float>(P.data(), T, E), I, m},
      moereg::matrix_view<float>(dP.data(), T, E));
  for (float v : g) r.grad_sum += static_cast<double>(v);
  for (float v : dP) r.grad_sum += static_cast<double>(v);
  return r;
}
