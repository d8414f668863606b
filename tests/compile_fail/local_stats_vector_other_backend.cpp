// Must not compile: the vector-returning local_stats hands back host memory, so it takes the
// CPU backend only; other backends use local_stats(in, double* out, be) with a device buffer.
#include <cstdint>
#include <moereg/backend/cpu.hpp>
#include <moereg/losses/load_balancing.hpp>
struct other_backend {};
int main() {
  float p[4] = {0.5f, 0.5f, 0.25f, 0.75f};
  std::int32_t ids[2] = {0, 1};
  const moereg::load_balancing_inputs<float> in{moereg::routing_view<float>(p, 2, 2), moereg::topk_view(ids, 2, 1)};
  return static_cast<int>(moereg::load_balancing_loss{}.local_stats(in, other_backend{}).size());
}
