// Quickstart: the two router losses every MoE trainer uses, on random data, with their
// gradients checked by finite differences.
//
//   load balancing  L_lb = alpha * E * sum_e f_e * pbar_e      (gradient w.r.t. probabilities)
//   router z-loss   L_z  = beta * mean_t logsumexp(Z_t)^2        (gradient w.r.t. logits)
//
// The load-balancing gradient is carried to the logits with moereg::softmax_backward and
// added to the z-loss gradient, which is what a trainer does before its router backward.
#include <cstdio>
#include <random>
#include <vector>

#include <Eigen/Core>
#include <moereg/moereg.hpp>
#include <moereg/testing/gradcheck.hpp>

int main() {
  using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const long T = 64, E = 8, k = 2;
  std::mt19937_64 gen(7);
  std::normal_distribution<double> nd(0.0, 1.5);

  RowMat Z(T, E);
  for (long t = 0; t < T; ++t)
    for (long e = 0; e < E; ++e) Z(t, e) = nd(gen);
  auto softmax = [&](const RowMat& z) {
    RowMat p = (z.colwise() - z.rowwise().maxCoeff()).array().exp().matrix();
    return RowMat(p.array().colwise() / p.rowwise().sum().array());
  };
  const RowMat P = softmax(Z);

  // Top-2 routing; pretend expert capacity dropped a few second choices.
  std::vector<std::int32_t> topk(static_cast<std::size_t>(T * k));
  for (long t = 0; t < T; ++t) {
    long a = 0, b = -1;
    for (long e = 1; e < E; ++e)
      if (P(t, e) > P(t, a)) a = e;
    for (long e = 0; e < E; ++e)
      if (e != a && (b < 0 || P(t, e) > P(t, b))) b = e;
    topk[static_cast<std::size_t>(t * k)] = static_cast<std::int32_t>(a);
    topk[static_cast<std::size_t>(t * k + 1)] = (t % 9 == 4) ? -1 : static_cast<std::int32_t>(b);
  }
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(T), 1);
  mask[T - 1] = mask[T - 2] = 0;  // two padding tokens

  const moereg::topk_view I(topk.data(), T, k);
  const moereg::mask_view m(mask.data(), T);
  const moereg::load_balancing_loss lb{};  // alpha = 1e-2 (LOSSES.md defaults)
  const moereg::z_loss zl{};               // beta = 1e-3

  // Loss values and gradients with respect to the logits, all in the caller's buffers.
  RowMat dP(T, E), dZ(T, E);
  const double v_lb = lb.value_and_grad(moereg::load_balancing_inputs<double>{moereg::view(P), I, m}, moereg::view(dP));
  moereg::softmax_backward<double>(moereg::view(P), moereg::view(dP), moereg::view(dZ));
  const double v_z = zl.value_and_grad(moereg::z_loss_inputs<double>{moereg::view(Z), m}, moereg::view(dZ),
                                       moereg::grad_options{1.0, /*accumulate=*/true});
  std::printf("moereg %d.%d.%d quickstart: T = %ld tokens (2 padded), E = %ld experts, top-%ld\n", MOEREG_VERSION_MAJOR,
              MOEREG_VERSION_MINOR, MOEREG_VERSION_PATCH, T, E, k);
  std::printf("  load balancing  = %.10f\n  router z-loss   = %.10f\n", v_lb, v_z);

  // Finite-difference check of the total gradient with respect to the logits; the
  // selection stays fixed, as it does in training.
  auto total = [&](const double* z) {
    const RowMat Zx = Eigen::Map<const RowMat>(z, T, E);
    const RowMat Px = softmax(Zx);
    return lb.value(moereg::load_balancing_inputs<double>{moereg::view(Px), I, m}) +
           zl.value(moereg::z_loss_inputs<double>{moereg::view(Zx), m});
  };
  const std::vector<double> z0(Z.data(), Z.data() + T * E), g(dZ.data(), dZ.data() + T * E);
  moereg::testing::gradcheck_options opt;
  opt.atol = 1e-11;  // the gradients are O(1e-5): judge them relatively
  const auto report = moereg::testing::gradcheck(total, z0, g, opt);
  std::printf("  d(L_lb + L_z)/dZ: %s\n", report.summary().c_str());
  return report.ok ? 0 : 1;
}
