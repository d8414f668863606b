// Must not compile: raw bfloat16 bits in uint16_t are not a storage type (they were read as
// integers and gave 261760).
#include <cstdint>
#include <moereg/backend/cpu.hpp>
#include <moereg/losses/z_loss.hpp>
int main() {
  std::uint16_t z[4] = {0x3f80, 0x4000, 0x3f80, 0x4000};
  const moereg::z_loss_inputs<std::uint16_t> in{moereg::routing_view<std::uint16_t>(z, 2, 2)};
  return static_cast<int>(moereg::z_loss{}.value(in));
}
