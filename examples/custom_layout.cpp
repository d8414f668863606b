// Custom activation layout: use the specialization loss on your own tensor type without
// copying it into one of moereg's layouts.
//
// Here the trainer keeps the SwiGLU intermediate activations slot-major, [k][T][d], with
// arbitrary strides (as a framework tensor would). A layout policy of a few lines tells moereg
// where h_{t,s} starts; the loss reads through it and writes the gradient through a second
// policy describing the gradient tensor. The result is checked against the same data copied
// into moereg's contiguous token-major layout. Returns non-zero if they differ.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <moereg/moereg.hpp>

// The user's own tensor: a pointer, a shape [k][T][d] and strides in elements.
struct my_tensor {
  float* data;
  long k, T, d;
  long stride_k, stride_t, stride_d;
};

// The layout policy: the members moereg asks of any layout (see core/layouts.hpp).
struct slot_major_layout {
  long k, T, d, sk, st, sd;
  moereg::index_t tokens() const { return T; }
  moereg::index_t slots() const { return k; }
  moereg::index_t dim() const { return d; }
  moereg::index_t stride() const { return sd; }
  moereg::index_t offset(moereg::index_t t, moereg::index_t s) const { return s * sk + t * st; }
  void validate(const char* who) const {
    if (sk < 0 || st < 0 || sd < 1) throw moereg::error(std::string(who) + ": slot_major_layout has a bad stride");
  }
};

slot_major_layout layout_of(const my_tensor& x) {
  return {x.k, x.T, x.d, x.stride_k, x.stride_t, x.stride_d};
}

int main() {
  const long T = 300, k = 4, E = 16, d = 96;
  std::mt19937_64 gen(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);

  // Activations in the user's layout: slot-major, each token row padded to 100 elements.
  const long row = 100;
  std::vector<float> acts(static_cast<std::size_t>(k * T * row), 0.0f), grad(acts.size(), 0.0f);
  const my_tensor h{acts.data(), k, T, d, T * row, row, 1};
  const my_tensor dh{grad.data(), k, T, d, T * row, row, 1};
  for (long s = 0; s < k; ++s)
    for (long t = 0; t < T; ++t)
      for (long i = 0; i < d; ++i) h.data[s * h.stride_k + t * h.stride_t + i * h.stride_d] = nd(gen);

  // Top-4 routing over 16 experts; every tenth token drops its last slot.
  std::vector<std::int32_t> topk(static_cast<std::size_t>(T * k));
  for (long t = 0; t < T; ++t)
    for (long s = 0; s < k; ++s)
      topk[static_cast<std::size_t>(t * k + s)] =
          (s == k - 1 && t % 10 == 0) ? -1 : static_cast<std::int32_t>((t + 5 * s) % E);

  const moereg::specialization_loss loss{};  // lambda = 2e-3, eps = 1e-8, ordered pairs
  const moereg::topk_view I(topk.data(), T, k);

  moereg::specialization_inputs<float, slot_major_layout> in{{h.data, layout_of(h)}, I};
  in.num_experts = E;
  const double v_custom =
      loss.value_and_grad(in, moereg::activation_view<float, slot_major_layout>{dh.data, layout_of(dh)});

  // The same data in moereg's contiguous token-major layout.
  std::vector<float> tm(static_cast<std::size_t>(T * k * d)), tm_grad(tm.size());
  for (long t = 0; t < T; ++t)
    for (long s = 0; s < k; ++s)
      for (long i = 0; i < d; ++i)
        tm[static_cast<std::size_t>((t * k + s) * d + i)] = h.data[s * h.stride_k + t * h.stride_t + i * h.stride_d];
  const moereg::specialization_inputs<float, moereg::token_major> in_tm{
      moereg::token_major_view<const float>(tm.data(), T, k, d), I, {}, E};
  const double v_tm = loss.value_and_grad(in_tm, moereg::token_major_view(tm_grad.data(), T, k, d));

  // Same arithmetic in the same order: the results agree exactly.
  long mismatches = 0;
  for (long t = 0; t < T; ++t)
    for (long s = 0; s < k; ++s)
      for (long i = 0; i < d; ++i)
        if (dh.data[s * dh.stride_k + t * dh.stride_t + i * dh.stride_d] !=
            tm_grad[static_cast<std::size_t>((t * k + s) * d + i)])
          ++mismatches;
  std::printf("specialization loss, slot-major custom layout: %.9g\n", v_custom);
  std::printf("specialization loss, token-major layout:       %.9g\n", v_tm);
  std::printf("gradient entries that differ: %ld of %ld\n", mismatches, T * k * d);
  return (v_custom == v_tm && mismatches == 0 && std::isfinite(v_custom) && v_custom > 0) ? 0 : 1;
}
