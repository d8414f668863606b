// Router losses ([T, E] inputs): load balancing, z-loss, entropy, importance, variance, and
// the auxiliary-loss-free bias update.
#include "binding.hpp"

namespace moereg_torch {

using namespace detail;

namespace {

moereg::load_balancing_config lb_config(double coef, int64_t k, int64_t scope, int64_t seq_len) {
  moereg::load_balancing_config cfg;
  cfg.coef = coef;
  cfg.k = k;
  cfg.scope =
      scope == 1 ? moereg::lb_scope::sequence : (scope == 2 ? moereg::lb_scope::global : moereg::lb_scope::micro);
  cfg.seq_len = seq_len;
  return cfg;
}

// value_and_grad (or value) of a loss whose inputs are {matrix view, mask} and whose gradient
// is one matrix of the input's shape.
template <class Loss, template <class> class Inputs>
value_grad routing_call(const Loss& loss, const at::Tensor& x, const opt_tensor& mask, const opt_tensor& stats,
                        bool want_grad, const char* who, const char* name) {
  check_matrix_input(x, who, name);
  keep k;
  const auto m = mask_of(mask, who);
  const auto red = stats_of(stats, who, k);
  return dispatch_float(x, who, name, [&](auto tag) -> value_grad {
    using T = decltype(tag);
    const Inputs<T> in{matrix_of<T>(x), m};
    at::Tensor g;
    double v;
    if (want_grad) {
      g = grad_like(x);
      const auto gv = mutable_matrix_of<T>(g);
      v = run([&] { return loss.value_and_grad(in, gv, moereg::grad_options{}, red, backend()); });
    } else {
      v = run([&] { return loss.value(in, red, backend()); });
    }
    return {value_tensor(v, x), g};
  });
}

}  // namespace

value_grad load_balancing(const at::Tensor& probs, const at::Tensor& topk, const opt_tensor& mask,
                          const opt_tensor& cu_seqlens, double coef, int64_t k, int64_t scope, int64_t seq_len,
                          const opt_tensor& stats, bool want_grad) {
  const char* who = "load_balancing";
  check_matrix_input(probs, who, "probs");
  keep kp;
  const auto I = index_matrix_of(topk, who, "topk", kp);
  const auto m = mask_of(mask, who);
  const auto offs = offsets_of(cu_seqlens, who, kp);
  const auto red = stats_of(stats, who, kp);
  const moereg::load_balancing_loss loss{lb_config(coef, k, scope, seq_len)};
  return dispatch_float(probs, who, "probs", [&](auto tag) -> value_grad {
    using T = decltype(tag);
    const moereg::load_balancing_inputs<T> in{matrix_of<T>(probs), I, m, offs};
    at::Tensor g;
    double v;
    if (want_grad) {
      g = grad_like(probs);
      const auto gv = mutable_matrix_of<T>(g);
      v = run([&] { return loss.value_and_grad(in, gv, moereg::grad_options{}, red, backend()); });
    } else {
      v = run([&] { return loss.value(in, red, backend()); });
    }
    return {value_tensor(v, probs), g};
  });
}

at::Tensor load_balancing_stats(const at::Tensor& probs, const at::Tensor& topk, const opt_tensor& mask,
                                const opt_tensor& cu_seqlens, int64_t k, int64_t scope, int64_t seq_len) {
  const char* who = "load_balancing";
  check_matrix_input(probs, who, "probs");
  keep kp;
  const auto I = index_matrix_of(topk, who, "topk", kp);
  const auto m = mask_of(mask, who);
  const auto offs = offsets_of(cu_seqlens, who, kp);
  const moereg::load_balancing_loss loss{lb_config(0.0, k, scope, seq_len)};
  return dispatch_float(probs, who, "probs", [&](auto tag) -> at::Tensor {
    using T = decltype(tag);
    const moereg::load_balancing_inputs<T> in{matrix_of<T>(probs), I, m, offs};
    return stats_tensor(run([&] { return loss.local_stats(in, backend()); }));
  });
}

value_grad z_loss(const at::Tensor& logits, const opt_tensor& mask, double coef, const opt_tensor& stats,
                  bool want_grad) {
  moereg::z_loss loss;
  loss.cfg.coef = coef;
  return routing_call<moereg::z_loss, moereg::z_loss_inputs>(loss, logits, mask, stats, want_grad, "z_loss", "logits");
}

value_grad entropy(const at::Tensor& probs, const opt_tensor& mask, double coef, const opt_tensor& stats,
                   bool want_grad) {
  moereg::entropy_loss loss;
  loss.cfg.coef = coef;
  return routing_call<moereg::entropy_loss, moereg::entropy_inputs>(loss, probs, mask, stats, want_grad, "entropy",
                                                                    "probs");
}

value_grad importance(const at::Tensor& probs, const opt_tensor& mask, double coef, const opt_tensor& stats,
                      bool want_grad) {
  moereg::importance_loss loss;
  loss.cfg.coef = coef;
  return routing_call<moereg::importance_loss, moereg::importance_inputs>(loss, probs, mask, stats, want_grad,
                                                                          "importance", "probs");
}

value_grad variance(const at::Tensor& scores, const opt_tensor& mask, double coef, int64_t axis, int64_t reduction,
                    const opt_tensor& stats, bool want_grad) {
  moereg::variance_loss loss;
  loss.cfg.coef = coef;
  loss.cfg.axis = axis == 1 ? moereg::variance_axis::experts : moereg::variance_axis::tokens;
  loss.cfg.reduction = reduction == 1 ? moereg::variance_reduction::sum : moereg::variance_reduction::mean;
  return routing_call<moereg::variance_loss, moereg::variance_inputs>(loss, scores, mask, stats, want_grad, "variance",
                                                                      "scores");
}

void bias_update(at::Tensor& bias, const at::Tensor& counts, double rate, bool center) {
  const char* who = "bias_update";
  check_cpu(bias, who, "bias");
  check_cpu(counts, who, "counts");
  check_dim(bias, 1, who, "bias", "[E]");
  check_dim(counts, 1, who, "counts", "[E]");
  const moereg::bias_update_config cfg{rate, center};
  // moereg's bias_update takes pointers without strides: a strided bias is updated in a
  // contiguous copy that is written back (E entries); counts are read from a contiguous copy.
  at::Tensor c = counts.contiguous();
  if (c.scalar_type() == at::kBool || c.scalar_type() == at::kBFloat16 || c.scalar_type() == at::kHalf)
    c = c.to(at::kDouble);
  at::Tensor b = bias.is_contiguous() ? bias : bias.contiguous();
  const index_t nc = c.size(0), nb = b.size(0);
  dispatch_float(b, who, "bias", [&](auto tag) {
    using B = decltype(tag);
    auto go = [&](auto ctag) {
      using C = decltype(ctag);
      const C* cp = reinterpret_cast<const C*>(c.data_ptr());
      B* bp = data_of<B>(b);
      run([&] { moereg::bias_update(cfg, cp, nc, bp, nb); });
    };
    switch (c.scalar_type()) {
      case at::kFloat:
        go(float{});
        break;
      case at::kDouble:
        go(double{});
        break;
      case at::kInt:
        go(std::int32_t{});
        break;
      case at::kLong:
        go(std::int64_t{});
        break;
      case at::kByte:
        go(std::uint8_t{});
        break;
      case at::kShort:
        go(std::int16_t{});
        break;
      default:
        raise_type(moereg::detail::concat("moereg_torch.bias_update: counts has dtype ",
                                          c10::toString(counts.scalar_type()), "; a numeric dtype is needed"));
    }
    return 0;
  });
  if (!b.is_same(bias)) bias.copy_(b);
}

}  // namespace moereg_torch
