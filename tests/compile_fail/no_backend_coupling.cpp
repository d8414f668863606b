// Must not compile: the coupling loss's header describes it but holds no CPU engine; running
// it needs <moereg/backend/cpu.hpp>, and the error says so.
#include <moereg/losses/coupling.hpp>

int main() {
  const float p[4] = {0.5f, 0.5f, 0.25f, 0.75f};
  const int ids[2] = {0, 1};
  const moereg::routing_view<float> probs[2] = {moereg::routing_view<float>(p, 1, 2),
                                                moereg::routing_view<float>(p + 2, 1, 2)};
  const moereg::topk_view topk[2] = {moereg::topk_view(ids, 1, 1), moereg::topk_view(ids + 1, 1, 1)};
  return moereg::coupling_loss{}.value(moereg::coupling_inputs{probs, topk, 2}) < 0 ? 0 : 1;
}
