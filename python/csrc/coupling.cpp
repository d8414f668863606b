// Cross-layer coupling loss (LOSSES.md section 4) over a list of layers.
#include "binding.hpp"

namespace moereg_torch {

using namespace detail;

std::tuple<at::Tensor, std::vector<at::Tensor>> coupling(const std::vector<at::Tensor>& probs,
                                                         const std::vector<at::Tensor>& topk, const opt_tensor& mask,
                                                         double coef, int64_t form, double eps, const opt_tensor& stats,
                                                         bool want_grad) {
  const char* who = "coupling";
  if (probs.size() != topk.size())
    raise_value(moereg::detail::concat("moereg_torch.coupling: probs_list has ", probs.size(),
                                       " layers but topk_list has ", topk.size()));
  if (probs.empty()) raise_value("moereg_torch.coupling: probs_list is empty; coupling needs L >= 2 layers");
  for (const auto& p : probs) check_matrix_input(p, who, "probs_list[l]");
  for (const auto& p : probs)
    if (p.scalar_type() != probs[0].scalar_type())
      raise_type(moereg::detail::concat("moereg_torch.coupling: probs_list mixes dtypes ",
                                        c10::toString(probs[0].scalar_type()), " and ", c10::toString(p.scalar_type()),
                                        "; every layer needs the same dtype"));
  keep kp;
  std::vector<moereg::topk_view> I;
  I.reserve(topk.size());
  for (const auto& t : topk) I.push_back(index_matrix_of(t, who, "topk_list[l]", kp));
  const auto m = mask_of(mask, who);
  const auto red = stats_of(stats, who, kp);
  moereg::coupling_loss loss;
  loss.cfg.coef = coef;
  loss.cfg.eps = eps;
  loss.cfg.form = form == 1 ? moereg::coupling_form::log
                            : (form == 2 ? moereg::coupling_form::batch : moereg::coupling_form::token);
  const auto L = static_cast<index_t>(probs.size());
  return dispatch_float(
      probs[0], who, "probs_list[0]", [&](auto tag) -> std::tuple<at::Tensor, std::vector<at::Tensor>> {
        using T = decltype(tag);
        std::vector<moereg::matrix_view<const T>> P;
        P.reserve(probs.size());
        for (const auto& p : probs) P.push_back(matrix_of<T>(p));
        const moereg::coupling_inputs<T> in{P.data(), I.data(), L, m};
        std::vector<at::Tensor> grads;
        double v;
        if (want_grad) {
          std::vector<moereg::matrix_view<T>> G;
          for (const auto& p : probs) {
            grads.push_back(grad_like(p));
            G.push_back(mutable_matrix_of<T>(grads.back()));
          }
          v = run([&] { return loss.value_and_grad(in, G.data(), moereg::grad_options{}, red, backend()); });
        } else {
          v = run([&] { return loss.value(in, red, backend()); });
        }
        return {value_tensor(v, probs[0]), grads};
      });
}

}  // namespace moereg_torch
