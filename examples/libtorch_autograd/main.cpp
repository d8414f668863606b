// A tiny LibTorch MoE trained with moereg's losses as autograd Functions (moereg_torch.hpp).
//
//   router   P = softmax(x W_r + b_r) [T, E], top-k selection, a per-expert capacity that
//            drops the slots over it (-1), and padding tokens at the end of each batch (mask)
//   experts  SwiGLU: h_{t,s} = SiLU(x W_gate[e]) * (x W_up[e]) [d_ff], y_{t,s} = h_{t,s} W_down[e]
//   output   sum_s P[t, e_s] y_{t,s}, regressed onto a fixed random teacher (masked MSE)
//   loss     task + load_balancing(P, topk, mask) + specialization(h, topk, mask)
//
// The moereg terms take part in torch's autograd like any other op: their gradients reach the
// router (through the softmax) and the expert weights (through the SwiGLU). Coefficients are
// the LOSSES.md defaults (alpha = 1e-2, lambda = 2e-3). Prints the losses at every Adam step.
//
//   moereg_torch_example [steps]     (default 25)
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include <torch/torch.h>

#include "moereg_torch.hpp"

namespace {

constexpr int64_t d_model = 16, d_ff = 12, d_out = 8, E = 6, k = 2, T = 96, padded = 8;
constexpr double capacity_factor = 1.0;

struct TinyMoE : torch::nn::Module {
  torch::nn::Linear router{nullptr};
  torch::Tensor w_gate, w_up, w_down;  // [E, d_model, d_ff], [E, d_model, d_ff], [E, d_ff, d_out]

  TinyMoE() {
    router = register_module("router", torch::nn::Linear(d_model, E));
    w_gate = register_parameter("w_gate", torch::randn({E, d_model, d_ff}) / std::sqrt(double(d_model)));
    w_up = register_parameter("w_up", torch::randn({E, d_model, d_ff}) / std::sqrt(double(d_model)));
    w_down = register_parameter("w_down", torch::randn({E, d_ff, d_out}) / std::sqrt(double(d_ff)));
  }
};

/// Top-k experts per token, then a capacity per expert in token order: slots over it are -1.
/// Padding tokens take no capacity (the losses ignore them through the mask).
torch::Tensor route(const torch::Tensor& P, const torch::Tensor& mask) {
  auto topk = std::get<1>(P.detach().topk(k, 1));  // int64 [T, k]
  const auto capacity = static_cast<int64_t>(std::ceil(capacity_factor * double(T * k) / double(E)));
  std::vector<int64_t> load(E, 0);
  auto I = topk.accessor<int64_t, 2>();
  const auto valid = mask.accessor<bool, 1>();
  for (int64_t t = 0; t < T; ++t)
    if (valid[t])
      for (int64_t s = 0; s < k; ++s)
        if (load[static_cast<std::size_t>(I[t][s])]++ >= capacity) I[t][s] = -1;
  return topk;
}

}  // namespace

int main(int argc, char** argv) {
  const long steps = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 25;
  torch::manual_seed(7);
  TinyMoE model;
  const auto teacher_a = torch::randn({d_model, 24}), teacher_b = torch::randn({24, d_out}) / std::sqrt(24.0);
  torch::optim::Adam opt(model.parameters(), torch::optim::AdamOptions(1e-2));

  auto mask = torch::ones({T}, torch::kBool);
  mask.slice(0, T - padded, T).fill_(false);  // the batch is padded at the end
  const auto m = mask.to(torch::kFloat32);
  const auto T_v = m.sum();

  std::printf("tiny MoE: T = %lld tokens (%lld padded), E = %lld, top-%lld, d_ff = %lld, capacity factor %.1f\n",
              static_cast<long long>(T), static_cast<long long>(padded), static_cast<long long>(E),
              static_cast<long long>(k), static_cast<long long>(d_ff), capacity_factor);
  std::printf("%5s %12s %14s %14s %12s %8s\n", "step", "task", "load_balance", "specializ.", "total", "dropped");
  double first_sp = 0, last_sp = 0, first_task = 0, last_task = 0;
  for (long step = 0; step < steps; ++step) {
    const auto x = torch::randn({T, d_model});
    const auto target = torch::tanh(x.matmul(teacher_a)).matmul(teacher_b);

    const auto P = torch::softmax(model.router->forward(x), 1);  // [T, E]
    const auto topk = route(P, mask);                            // [T, k], -1 = dropped
    const auto valid = topk.ge(0).to(torch::kFloat32) * m.unsqueeze(1);
    const auto idx = topk.clamp_min(0);

    // Every expert on every token (tiny sizes), then the selected ones, token-major [T, k, d_ff].
    const auto h_all = torch::silu(torch::einsum("td,edf->tef", {x, model.w_gate})) *
                       torch::einsum("td,edf->tef", {x, model.w_up});  // [T, E, d_ff]
    const auto h = h_all.gather(1, idx.unsqueeze(2).expand({T, k, d_ff}));
    const auto y =
        torch::einsum("tkf,tkfo->tko", {h, model.w_down.index_select(0, idx.flatten()).view({T, k, d_ff, d_out})});
    const auto gate = P.gather(1, idx) * valid;  // [T, k]
    const auto out = (gate.unsqueeze(2) * y).sum(1);

    const auto task = ((out - target).pow(2).sum(1) * m).sum() / T_v;
    const auto lb = moereg_torch::load_balancing(P, topk, mask);
    const auto sp = moereg_torch::specialization(h, topk, mask);
    const auto total = task + lb + sp;

    opt.zero_grad();
    total.backward();
    opt.step();

    const double vt = task.item<double>(), vsp = sp.item<double>();
    if (step == 0) first_task = vt, first_sp = vsp;
    last_task = vt, last_sp = vsp;
    std::printf("%5ld %12.6f %14.8f %14.8f %12.6f %8lld\n", step, vt, lb.item<double>(), vsp, total.item<double>(),
                static_cast<long long>(topk.lt(0).sum().item<int64_t>()));
    if (!std::isfinite(total.item<double>())) {
      std::printf("non-finite loss\n");
      return 1;
    }
  }
  std::printf("task %.4f -> %.4f, specialization %.3e -> %.3e over %ld steps\n", first_task, last_task, first_sp,
              last_sp, steps);
  return 0;
}
