// The compile-time probe of the README's "Compile time" targets: one translation unit that
// calls every loss (value_and_grad, with the default CPU backend) for float storage in the
// token-major layout. benchmarks/compile_time/run.py compiles it at -O2 and -O3 and reports
// the wall time and the compiler's peak memory; the default build compiles it as a plain
// object too (target moereg_compile_probe), so it stays a valid user of the public API.
#include <cstdint>
#include <vector>

#include "moereg/moereg.hpp"

double every_loss_float(long T, long E, long k, long d, const float* P, const float* H, const std::int32_t* I,
                        const std::uint8_t* m, float* gP, float* gH) {
  using namespace moereg;
  const matrix_view<const float> p(P, T, E);
  const matrix_view<float> gp(gP, T, E);
  const topk_view topk(I, T, k);
  const mask_view mask(m, T);
  const token_major layout(T, k, d);
  const activation_view<const float, token_major> h{H, layout};
  const activation_view<float, token_major> gh{gH, layout};
  double v = 0;
  v += load_balancing_loss{}.value_and_grad(load_balancing_inputs<float>{p, topk, mask}, gp);
  v += z_loss{}.value_and_grad(z_loss_inputs<float>{p, mask}, gp);
  v += entropy_loss{}.value_and_grad(entropy_inputs<float>{p, mask}, gp);
  v += importance_loss{}.value_and_grad(importance_inputs<float>{p, mask}, gp);
  v += variance_loss{}.value_and_grad(variance_inputs<float>{p, mask}, gp);
  v += specialization_loss{}.value_and_grad(specialization_inputs<float, token_major>{h, topk, mask}, gh);
  v += orthogonality_loss{}.value_and_grad(orthogonality_inputs<float, token_major>{h, topk, mask}, gh);
  const routing_view<float> layers[2] = {p, p};
  const topk_view tops[2] = {topk, topk};
  const matrix_view<float> grads[2] = {gp, gp};
  v += coupling_loss{}.value_and_grad(coupling_inputs<float>{layers, tops, 2, mask}, grads);
  return v;
}
