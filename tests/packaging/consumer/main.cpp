// Smallest real use of moereg from another project: one loss value and gradient.
#include <cstdint>
#include <cstdio>
#include <moereg/moereg.hpp>

#if defined(MOEREG_CONSUMER_EXPECTS_COMPILED) && !(defined(MOEREG_COMPILED) && MOEREG_COMPILED)
#error "moereg::compiled did not bring its interface definitions (MOEREG_COMPILED)"
#endif

int main() {
  const float P[4] = {0.7f, 0.3f, 0.2f, 0.8f};
  const std::int32_t I[2] = {0, 1};
  float G[4] = {};
  const moereg::load_balancing_loss lb{{1.0}};
  const double v = lb.value_and_grad(moereg::load_balancing_inputs<float>{{P, 2, 2}, {I, 2, 1}},
                                     moereg::matrix_view<float>(G, 2, 2));
  // f = (1/2, 1/2), pbar = (0.45, 0.55): L = 2 * (0.225 + 0.275) = 1.
  std::printf("moereg %d.%d.%d consumer: load balancing = %.6f\n", MOEREG_VERSION_MAJOR, MOEREG_VERSION_MINOR,
              MOEREG_VERSION_PATCH, v);
  return (v > 0.999999 && v < 1.000001 && G[0] > 0.49f && G[0] < 0.51f) ? 0 : 1;
}
