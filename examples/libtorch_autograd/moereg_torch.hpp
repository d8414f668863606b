// moereg losses as LibTorch autograd Functions (CPU tensors, float32 and float64).
//
//   moereg_torch::specialization(acts, topk, mask, cfg, num_experts)   LOSSES.md section 3
//   moereg_torch::load_balancing(probs, topk, mask, cfg, cu_seqlens)   LOSSES.md section 1
//
// Each is a torch::autograd::Function. forward() takes zero-copy moereg views of the
// tensors' memory (after .contiguous(), which copies nothing for a contiguous tensor), runs
// moereg's value_and_grad on the CPU backend once, keeps the gradient and returns the value
// as a 0-d tensor of the input's dtype. backward() multiplies the kept gradient by the
// upstream derivative. The selection (topk), the mask and the offsets get no gradient,
// as LOSSES.md says. The Functions are differentiable once: the kept gradient is a
// constant, so a second derivative through them is zero, not the true one.
//
//   acts   [T, k, d] float32/float64, token-major: acts[t][s] is h_{t,s} (moereg::token_major)
//   probs  [T, E]    float32/float64
//   topk   [T, k]    int64 (or int32); -1 (any negative) = dropped slot
//   mask   [T]       bool/uint8/int32/int64, nonzero = real token; c10::nullopt = all valid
//
// Errors: checks that belong to the torch side (device, dtype, number of dimensions) throw
// c10::Error (TORCH_CHECK); everything moereg validates (shapes against each other, repeated
// or out-of-range experts, bad config) throws moereg::error with moereg's own message,
// unchanged, out of forward() and so out of the call.
#pragma once

#include <cstdint>
#include <string>

#include <torch/torch.h>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/load_balancing.hpp>
#include <moereg/losses/specialization.hpp>

namespace moereg_torch {

namespace detail {

inline void check_cpu(const torch::Tensor& x, const char* who, const char* name) {
  TORCH_CHECK(x.defined(), who, ": ", name, " is an undefined tensor");
  TORCH_CHECK(x.device().is_cpu(), who, ": ", name, " is on ", x.device().str(),
              "; these Functions run moereg's CPU backend and need CPU tensors");
}

/// Calls f(float{}) or f(double{}) for the floating dtype of x.
template <class F>
auto dispatch_floating(const torch::Tensor& x, const char* who, const char* name, F&& f) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kFloat64, who, ": ", name, " has dtype ", c10::toString(st),
              "; float32 and float64 are supported");
  return st == torch::kFloat64 ? f(double{}) : f(float{});
}

/// topk [T, k] as a moereg::topk_view over the tensor's memory (x must stay alive).
inline moereg::topk_view topk_of(const torch::Tensor& x, const char* who) {
  check_cpu(x, who, "topk");
  TORCH_CHECK(x.dim() == 2, who, ": topk must be 2-D [T, k] but has ", x.dim(), " dimensions");
  const auto rows = static_cast<moereg::index_t>(x.size(0)), k = static_cast<moereg::index_t>(x.size(1));
  const auto rs = static_cast<moereg::index_t>(x.stride(0));
  if (x.scalar_type() == torch::kInt64) return moereg::topk_view(x.data_ptr<std::int64_t>(), rows, k, rs);
  TORCH_CHECK(x.scalar_type() == torch::kInt32, who, ": topk has dtype ", c10::toString(x.scalar_type()),
              "; int64 or int32 is needed");
  return moereg::topk_view(x.data_ptr<std::int32_t>(), rows, k, rs);
}

/// mask [T] as a moereg::mask_view; an absent mask is the empty view (all tokens valid).
inline moereg::mask_view mask_of(const c10::optional<torch::Tensor>& m, const char* who) {
  if (!m.has_value() || !m->defined()) return {};
  const auto& x = *m;
  check_cpu(x, who, "mask");
  TORCH_CHECK(x.dim() == 1, who, ": mask must be 1-D [T] but has ", x.dim(), " dimensions");
  const auto n = static_cast<moereg::index_t>(x.size(0)), st = static_cast<moereg::index_t>(x.stride(0));
  switch (x.scalar_type()) {
    case torch::kBool:
      return moereg::mask_view(x.data_ptr<bool>(), n, st);
    case torch::kUInt8:
      return moereg::mask_view(x.data_ptr<std::uint8_t>(), n, st);
    case torch::kInt32:
      return moereg::mask_view(x.data_ptr<std::int32_t>(), n, st);
    case torch::kInt64:
      return moereg::mask_view(x.data_ptr<std::int64_t>(), n, st);
    default:
      break;
  }
  TORCH_CHECK(false, who, ": mask has dtype ", c10::toString(x.scalar_type()),
              "; bool, uint8, int32 or int64 is needed");
  return {};
}

inline c10::optional<torch::Tensor> contiguous(const c10::optional<torch::Tensor>& m) {
  if (!m.has_value() || !m->defined()) return c10::nullopt;
  return m->contiguous();
}

/// The upstream derivative times the kept gradient (undefined when no gradient was kept).
inline torch::Tensor chain(const torch::autograd::AutogradContext* ctx, const torch::Tensor& grad_output) {
  const auto saved = ctx->get_saved_variables();
  const torch::Tensor& g = saved.at(0);
  if (!g.defined()) return {};
  return g * grad_output.to(g.scalar_type());
}

}  // namespace detail

/// Intra-layer specialization loss (moereg::specialization_loss) of token-major [T, k, d]
/// activations. Returns a 0-d tensor of the activations' dtype.
struct SpecializationFunction : torch::autograd::Function<SpecializationFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& acts,
                               const torch::Tensor& topk, const c10::optional<torch::Tensor>& mask,
                               moereg::specialization_config cfg, std::int64_t num_experts) {
    const char* who = "moereg_torch::specialization";
    detail::check_cpu(acts, who, "acts");
    TORCH_CHECK(acts.dim() == 3, who, ": acts must be 3-D [T, k, d] but has ", acts.dim(), " dimensions");
    const torch::Tensor x = acts.contiguous();
    const torch::Tensor I = topk.contiguous();
    const c10::optional<torch::Tensor> m = detail::contiguous(mask);
    const bool want_grad = acts.requires_grad();

    const moereg::specialization_loss loss{cfg};
    torch::Tensor grad;
    const double value = detail::dispatch_floating(x, who, "acts", [&](auto tag) {
      using T = decltype(tag);
      // The tensor's own strides: the layout policy needs no copy even for a view.
      const moereg::token_major layout(x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2));
      const moereg::specialization_inputs<T, moereg::token_major> in{{x.data_ptr<T>(), layout},
                                                                     detail::topk_of(I, who),
                                                                     detail::mask_of(m, who),
                                                                     static_cast<moereg::index_t>(num_experts)};
      if (!want_grad) return loss.value(in);
      grad = torch::empty_like(x, torch::MemoryFormat::Contiguous);
      const moereg::token_major glayout(grad.size(0), grad.size(1), grad.size(2), grad.stride(0), grad.stride(1),
                                        grad.stride(2));
      return loss.value_and_grad(in, moereg::activation_view<T, moereg::token_major>{grad.data_ptr<T>(), glayout});
    });
    ctx->save_for_backward({grad});
    return torch::scalar_tensor(value, x.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    // One gradient per forward argument; the non-differentiable ones get none.
    return {detail::chain(ctx, grad_outputs.at(0)), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

/// Load-balancing loss (moereg::load_balancing_loss) of probabilities [T, E]. The sequence
/// scope takes cfg.seq_len, or the packed offsets cu_seqlens [B + 1] (int64 or int32).
/// Returns a 0-d tensor of the probabilities' dtype.
struct LoadBalancingFunction : torch::autograd::Function<LoadBalancingFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& probs,
                               const torch::Tensor& topk, const c10::optional<torch::Tensor>& mask,
                               moereg::load_balancing_config cfg, const c10::optional<torch::Tensor>& cu_seqlens) {
    const char* who = "moereg_torch::load_balancing";
    detail::check_cpu(probs, who, "probs");
    TORCH_CHECK(probs.dim() == 2, who, ": probs must be 2-D [T, E] but has ", probs.dim(), " dimensions");
    const torch::Tensor P = probs.contiguous();
    const torch::Tensor I = topk.contiguous();
    const c10::optional<torch::Tensor> m = detail::contiguous(mask);
    const c10::optional<torch::Tensor> offs = detail::contiguous(cu_seqlens);
    moereg::offsets_view offsets{};
    if (offs) {
      detail::check_cpu(*offs, who, "cu_seqlens");
      TORCH_CHECK(offs->dim() == 1, who, ": cu_seqlens must be 1-D [B + 1]");
      const auto n = static_cast<moereg::index_t>(offs->size(0));
      if (offs->scalar_type() == torch::kInt64)
        offsets = moereg::offsets_view(offs->data_ptr<std::int64_t>(), n);
      else if (offs->scalar_type() == torch::kInt32)
        offsets = moereg::offsets_view(offs->data_ptr<std::int32_t>(), n);
      else
        TORCH_CHECK(false, who, ": cu_seqlens has dtype ", c10::toString(offs->scalar_type()),
                    "; int64 or int32 is needed");
    }
    const bool want_grad = probs.requires_grad();

    const moereg::load_balancing_loss loss{cfg};
    torch::Tensor grad;
    const double value = detail::dispatch_floating(P, who, "probs", [&](auto tag) {
      using T = decltype(tag);
      const moereg::load_balancing_inputs<T> in{
          moereg::routing_view<T>(P.data_ptr<T>(), P.size(0), P.size(1), P.stride(0), P.stride(1)),
          detail::topk_of(I, who), detail::mask_of(m, who), offsets};
      if (!want_grad) return loss.value(in);
      grad = torch::empty_like(P, torch::MemoryFormat::Contiguous);
      return loss.value_and_grad(
          in, moereg::matrix_view<T>(grad.data_ptr<T>(), grad.size(0), grad.size(1), grad.stride(0), grad.stride(1)));
    });
    ctx->save_for_backward({grad});
    return torch::scalar_tensor(value, P.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    return {detail::chain(ctx, grad_outputs.at(0)), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

/// L_sp of activations [T, k, d]; num_experts > 0 also checks every id < num_experts.
inline torch::Tensor specialization(const torch::Tensor& acts, const torch::Tensor& topk,
                                    const c10::optional<torch::Tensor>& mask = c10::nullopt,
                                    const moereg::specialization_config& cfg = {}, std::int64_t num_experts = 0) {
  return SpecializationFunction::apply(acts, topk, mask, cfg, num_experts);
}

/// L_lb of probabilities [T, E].
inline torch::Tensor load_balancing(const torch::Tensor& probs, const torch::Tensor& topk,
                                    const c10::optional<torch::Tensor>& mask = c10::nullopt,
                                    const moereg::load_balancing_config& cfg = {},
                                    const c10::optional<torch::Tensor>& cu_seqlens = c10::nullopt) {
  return LoadBalancingFunction::apply(probs, topk, mask, cfg, cu_seqlens);
}

}  // namespace moereg_torch
