// Compiled against single_include/ alone (no include/ on the path): the amalgamated header
// must hold the whole CPU library. Runs two losses with their gradients checked by finite
// differences, and names every other loss so that a missing piece fails to compile.
#include <cstdio>
#include <random>
#include <vector>

#include "moereg/moereg.hpp"

#ifdef MOEREG_VERSION_MAJOR
static_assert(MOEREG_VERSION_MAJOR >= 0, "version macros come with the single header");
#endif

int main() {
  const long T = 13, E = 6, k = 3, d = 5;
  std::mt19937_64 gen(11);
  std::uniform_real_distribution<double> u(0.05, 1.0);
  std::normal_distribution<double> nd(0.0, 1.0);

  std::vector<double> P(static_cast<std::size_t>(T * E)), H(static_cast<std::size_t>(T * k * d));
  std::vector<std::int64_t> I(static_cast<std::size_t>(T * k));
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(T), 1);
  for (long t = 0; t < T; ++t) {
    double s = 0;
    for (long e = 0; e < E; ++e) s += P[static_cast<std::size_t>(t * E + e)] = u(gen);
    for (long e = 0; e < E; ++e) P[static_cast<std::size_t>(t * E + e)] /= s;
    for (long j = 0; j < k; ++j) I[static_cast<std::size_t>(t * k + j)] = (t + 2 * j) % E;
  }
  I[4] = -1;    // a dropped slot
  mask[7] = 0;  // a padding token
  for (double& h : H) h = nd(gen);

  const moereg::topk_view topk(I.data(), T, k);
  const moereg::mask_view m(mask.data(), T);
  bool ok = true;

  const moereg::load_balancing_loss lb{};
  auto lb_in = [&](const double* p) {
    return moereg::load_balancing_inputs<double>{moereg::matrix_view<const double>(p, T, E), topk, m};
  };
  std::vector<double> gP(P.size());
  lb.value_and_grad(lb_in(P.data()), moereg::matrix_view<double>(gP.data(), T, E));
  const auto r1 = moereg::testing::gradcheck([&](const double* p) { return lb.value(lb_in(p)); }, P, gP);
  std::printf("single header: load_balancing  %s\n", r1.summary().c_str());
  ok = ok && r1.ok;

  const moereg::specialization_loss sp{};
  const moereg::token_major layout(T, k, d);
  auto sp_in = [&](const double* h) {
    return moereg::specialization_inputs<double, moereg::token_major>{
        moereg::activation_view<const double, moereg::token_major>{h, layout}, topk, m};
  };
  std::vector<double> gH(H.size());
  sp.value_and_grad(sp_in(H.data()), moereg::activation_view<double, moereg::token_major>{gH.data(), layout});
  const auto r2 = moereg::testing::gradcheck([&](const double* h) { return sp.value(sp_in(h)); }, H, gH);
  std::printf("single header: specialization  %s\n", r2.summary().c_str());
  ok = ok && r2.ok;

  // Every other loss and the metrics are part of the single header too.
  const moereg::z_loss z{};
  const moereg::orthogonality_loss o{};
  const moereg::coupling_loss c{};
  const moereg::variance_loss v{};
  const moereg::entropy_loss en{};
  const moereg::importance_loss im{};
  (void)z, (void)o, (void)c, (void)v, (void)en, (void)im;
  return ok ? 0 : 1;
}
