// Must not compile: a loss header alone describes the loss; running it on the CPU needs the
// CPU backend's header (<moereg/backend/cpu.hpp> or <moereg/moereg.hpp>), and the error says so.
#include <moereg/losses/z_loss.hpp>

int main() {
  const float z[4] = {0.f, 1.f, 2.f, 3.f};
  return moereg::z_loss{}.value(moereg::z_loss_inputs{moereg::routing_view<float>(z, 2, 2)}) > 0 ? 0 : 1;
}
