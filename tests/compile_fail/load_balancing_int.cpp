// Must not compile: int probabilities (they gave 0.08 and a gradient truncated to 0).
#include <cstdint>
#include <moereg/backend/cpu.hpp>
#include <moereg/losses/load_balancing.hpp>
int main() {
  int p[4] = {1, 0, 0, 1};
  std::int32_t ids[2] = {0, 1};
  const moereg::load_balancing_inputs<int> in{moereg::routing_view<int>(p, 2, 2), moereg::topk_view(ids, 2, 1)};
  return static_cast<int>(moereg::load_balancing_loss{}.value(in));
}
