// Shared by the two units of the moereg::compiled test: every loss's value_and_grad for the
// four storage types (token-major activations, and the expert-grouped layout for float),
// with a mask, dropped slots and odd sizes. Each unit includes it once after defining
// MOEREG_TEST_RUN, the name of the function it defines; the two units see moereg in
// different ABI namespaces (one through moereg::compiled, one header-only), so the results
// come from two separate instantiations of the same code.
#include <cstdint>
#include <vector>

#include "moereg/moereg.hpp"

namespace {

template <class T>
void run_type(std::vector<double>& out) {
  using namespace moereg;
  const long T_ = 37, E = 8, k = 3, d = 19;
  std::vector<T> P(static_cast<std::size_t>(T_ * E)), H(static_cast<std::size_t>(T_ * k * d));
  std::vector<std::int32_t> I(static_cast<std::size_t>(T_ * k));
  std::vector<std::uint8_t> m(static_cast<std::size_t>(T_));
  std::uint64_t s = 12345;
  auto next = [&s]() {  // a small LCG: both units draw the same numbers
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(s >> 11) / 9007199254740992.0;
  };
  for (long t = 0; t < T_; ++t) {
    double z = 0;
    std::vector<double> row(static_cast<std::size_t>(E));
    for (auto& v : row) z += (v = 0.05 + next());
    for (long e = 0; e < E; ++e)
      P[static_cast<std::size_t>(t * E + e)] = static_cast<T>(static_cast<float>(row[static_cast<std::size_t>(e)] / z));
    for (long j = 0; j < k; ++j)  // distinct experts, slot 1 dropped on every fifth token
      I[static_cast<std::size_t>(t * k + j)] = (j == 1 && t % 5 == 0) ? -1 : static_cast<std::int32_t>((t + 3 * j) % E);
    m[static_cast<std::size_t>(t)] = t % 7 != 3;
  }
  for (auto& v : H) v = static_cast<T>(static_cast<float>(next() - 0.5));
  std::vector<T> gP(P.size()), gH(H.size());
  const matrix_view<const T> p(P.data(), T_, E);
  const matrix_view<T> gp(gP.data(), T_, E);
  const topk_view topk(I.data(), T_, k);
  const mask_view mask(m.data(), T_);
  auto keep = [&out](double v, const std::vector<T>& g) {
    out.push_back(v);
    for (const T& x : g) out.push_back(static_cast<double>(static_cast<float>(x)));
  };
  keep(load_balancing_loss{}.value_and_grad(load_balancing_inputs<T>{p, topk, mask}, gp), gP);
  keep(z_loss{}.value_and_grad(z_loss_inputs<T>{p, mask}, gp), gP);
  keep(entropy_loss{}.value_and_grad(entropy_inputs<T>{p, mask}, gp), gP);
  keep(importance_loss{}.value_and_grad(importance_inputs<T>{p, mask}, gp), gP);
  keep(variance_loss{}.value_and_grad(variance_inputs<T>{p, mask}, gp), gP);
  {
    const routing_view<T> layers[2] = {p, p};
    const topk_view tops[2] = {topk, topk};
    std::vector<T> g2(P.size());
    const matrix_view<T> grads[2] = {gp, matrix_view<T>(g2.data(), T_, E)};
    keep(coupling_loss{}.value_and_grad(coupling_inputs<T>{layers, tops, 2, mask}, grads), g2);
  }
  const token_major layout(T_, k, d);
  const activation_view<const T, token_major> h{H.data(), layout};
  const activation_view<T, token_major> gh{gH.data(), layout};
  keep(specialization_loss{}.value_and_grad(specialization_inputs<T, token_major>{h, topk, mask}, gh), gH);
  keep(orthogonality_loss{}.value_and_grad(orthogonality_inputs<T, token_major>{h, topk, mask}, gh), gH);
  out.push_back(specialization_loss{}.local_stats(specialization_inputs<T, token_major>{h, topk, mask})[0]);
  if constexpr (std::is_same_v<T, float>) {  // expert-grouped: row r of H holds slot r of the token-major order
    std::vector<std::int32_t> rows(I.size());
    for (std::size_t r = 0; r < rows.size(); ++r) rows[r] = I[r] >= 0 ? static_cast<std::int32_t>(r) : -1;
    const expert_grouped g(topk_view(rows.data(), T_, k), T_ * k, d);
    const activation_view<const T, expert_grouped> hg{H.data(), g};
    const activation_view<T, expert_grouped> ggh{gH.data(), g};
    keep(specialization_loss{}.value_and_grad(specialization_inputs<T, expert_grouped>{hg, topk, mask}, ggh), gH);
    keep(orthogonality_loss{}.value_and_grad(orthogonality_inputs<T, expert_grouped>{hg, topk, mask}, ggh), gH);
  }
}

}  // namespace

std::vector<double> MOEREG_TEST_RUN() {
  std::vector<double> out;
  run_type<float>(out);
  run_type<double>(out);
  run_type<moereg::half>(out);
  run_type<moereg::bfloat16>(out);
  return out;
}
