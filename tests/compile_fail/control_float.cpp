// Must compile: the control case of the compile-failure tests (the same calls in float), so a
// broken harness cannot pass them.
#include <cstdint>
#include <moereg/backend/cpu.hpp>
#include <moereg/chain.hpp>
#include <moereg/core/stats.hpp>
#include <moereg/losses/coupling.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/specialization.hpp>
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
  // The Gram and coupling calls of no_backend_gram.cpp and no_backend_coupling.cpp, with the backend.
  const float h[8] = {1.f, 0.f, 0.f, 1.f, 1.f, 1.f, 0.f, 1.f};
  const int sp_ids[4] = {0, 1, 1, 0};
  const moereg::topk_view sp_topk(sp_ids, 2, 2);
  const double sp = moereg::specialization_loss{}.value(
      moereg::specialization_inputs{moereg::token_major_view<const float>(h, 2, 2, 2), sp_topk});
  const moereg::routing_view<float> probs[2] = {moereg::routing_view<float>(p, 1, 2),
                                                moereg::routing_view<float>(p + 2, 1, 2)};
  const moereg::topk_view cp_topk[2] = {moereg::topk_view(ids, 1, 1), moereg::topk_view(ids + 1, 1, 1)};
  const double cp = moereg::coupling_loss{}.value(moereg::coupling_inputs{probs, cp_topk, 2});
  return static_cast<int>(moereg::z_loss{}.value(zin) + moereg::load_balancing_loss{}.value(in) + dz[0] +
                          static_cast<float>(s.size()) + sp + cp);
}
