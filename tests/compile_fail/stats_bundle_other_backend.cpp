// Must not compile: a stats_bundle fills host memory, so it takes the CPU backend only (with
// CUDA its kernels would write to a host buffer that graph capture also frees early).
#include <cstdint>
#include <moereg/backend/cpu.hpp>
#include <moereg/core/stats.hpp>
#include <moereg/losses/z_loss.hpp>
struct other_backend {};
int main() {
  float p[4] = {0.5f, 0.5f, 0.25f, 0.75f};
  const moereg::z_loss_inputs<float> zin{moereg::routing_view<float>(p, 2, 2)};
  moereg::stats_bundle b;
  (void)b.add(moereg::z_loss{}, zin, other_backend{});
  return 0;
}
