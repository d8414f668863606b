// Must compile: the control case of the compile-failure tests (the same calls in float), so a
// broken harness cannot pass them.
#include <cstdint>
#include <moereg/chain.hpp>
#include <moereg/core/stats.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/z_loss.hpp>
int main() {
  float p[4] = {0.5f, 0.5f, 0.25f, 0.75f}, dp[4] = {}, dz[4] = {};
  std::int32_t ids[2] = {0, 1};
  const moereg::z_loss_inputs<float> zin{moereg::routing_view<float>(p, 2, 2)};
  const moereg::load_balancing_inputs<float> in{moereg::routing_view<float>(p, 2, 2), moereg::topk_view(ids, 2, 1)};
  moereg::softmax_backward(moereg::routing_view<float>(p, 2, 2), moereg::matrix_view<const float>(dp, 2, 2),
                           moereg::matrix_view<float>(dz, 2, 2));
  // The host-memory statistics forms with the CPU backend (their other-backend cases must fail).
  moereg::stats_bundle b;
  (void)b.add(moereg::z_loss{}, zin, moereg::cpu{});
  const auto s = moereg::load_balancing_loss{}.local_stats(in, moereg::cpu{});
  return static_cast<int>(moereg::z_loss{}.value(zin) + moereg::load_balancing_loss{}.value(in) + dz[0] +
                          static_cast<float>(s.size()));
}
