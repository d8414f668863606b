// Must not compile: the specialization loss's header describes it (its per-token kernel, its
// checks) but holds no CPU engine; running it needs <moereg/backend/cpu.hpp>, and the error
// says so.
#include <moereg/losses/specialization.hpp>

int main() {
  const float h[8] = {1.f, 0.f, 0.f, 1.f, 1.f, 1.f, 0.f, 1.f};
  const int ids[4] = {0, 1, 1, 0};
  const moereg::topk_view topk(ids, 2, 2);
  const moereg::specialization_inputs in{moereg::token_major_view<const float>(h, 2, 2, 2), topk};
  return moereg::specialization_loss{}.value(in) > 0 ? 0 : 1;
}
