// Agreement test: moereg's losses run as torch::autograd::Functions (moereg_torch.hpp)
// against plain torch autograd of the same formulas, written here with torch ops from
// LOSSES.md sections 1 and 3 (no moereg code involved in the reference).
//
// Random inputs with odd sizes, masked tokens, dropped slots (-1), a vector shorter than eps,
// tokens with a single valid slot; values and gradients compared in float64 (and once in
// float32 against the float64 formula with a float tolerance). Also checks that the
// Functions chain with other torch ops, that an upstream derivative is applied, and that
// moereg::error comes out of the call with moereg's message.
//
// Prints the worst relative error; exits 1 if a float64 comparison exceeds 1e-10, a float32
// one exceeds 1e-4, or an expected error is not raised.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "moereg_torch.hpp"

namespace {

constexpr double tol64 = 1e-10;
constexpr double tol32 = 1e-4;

int failures = 0;
double worst64 = 0.0, worst32 = 0.0;

/// max |a - b| / max |b| (absolute when b is all zero).
double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  const auto a64 = a.detach().to(torch::kFloat64), b64 = b.detach().to(torch::kFloat64);
  const double diff = (a64 - b64).abs().max().item<double>();
  const double scale = b64.abs().max().item<double>();
  return scale > 0 ? diff / scale : diff;
}

void report(const std::string& what, double err, bool f32 = false) {
  const double tol = f32 ? tol32 : tol64;
  const bool ok = std::isfinite(err) && err <= tol;
  std::printf("  %-58s rel err %.3e %s\n", what.c_str(), err, ok ? "" : "  <-- FAIL");
  if (!ok) ++failures;
  (f32 ? worst32 : worst64) = std::max(f32 ? worst32 : worst64, std::isfinite(err) ? err : 1e300);
}

void expect(bool ok, const std::string& what) {
  std::printf("  %-58s %s\n", what.c_str(), ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

// --- random inputs ------------------------------------------------------------------------

/// [T, k] distinct experts per row out of E, a share of slots dropped (-1).
torch::Tensor random_topk(int64_t T, int64_t k, int64_t E, double drop) {
  auto I = torch::empty({T, k}, torch::kInt64);
  for (int64_t t = 0; t < T; ++t) I[t] = torch::randperm(E, torch::kInt64).slice(0, 0, k);
  const auto dropped = torch::rand({T, k}) < drop;
  return I.masked_fill(dropped, -1);
}

/// [T] mask with a share of padding tokens, in the requested dtype.
torch::Tensor random_mask(int64_t T, double keep, torch::ScalarType st) {
  return (torch::rand({T}) < keep).to(st);
}

/// The mask as float64 [T]; all ones when absent.
torch::Tensor mask_f64(const c10::optional<torch::Tensor>& m, int64_t T) {
  return m ? m->ne(0).to(torch::kFloat64) : torch::ones({T}, torch::kFloat64);
}

// --- reference formulas (torch ops only) --------------------------------------------------

/// LOSSES.md section 3: L = lambda / T_v sum_t m_t w_t sum_{s != r in A_t} c_{t,s,r}^2.
torch::Tensor ref_specialization(const torch::Tensor& h, const torch::Tensor& topk,
                                 const c10::optional<torch::Tensor>& mask, const moereg::specialization_config& cfg) {
  const int64_t T = h.size(0), k = h.size(1);
  const auto m = mask_f64(mask, T).to(h.scalar_type());
  const auto valid = topk.ge(0).to(h.scalar_type()) * m.unsqueeze(1);  // [T, k], 1 for s in A_t
  const auto n = h.norm(2, {2}, /*keepdim=*/true).clamp_min(cfg.eps);
  const auto hn = h / n;
  const auto C = torch::bmm(hn, hn.transpose(1, 2));  // [T, k, k]
  const auto off_diag = 1.0 - torch::eye(k, h.options());
  const auto pairs = valid.unsqueeze(2) * valid.unsqueeze(1) * off_diag;
  auto per_token = (C.pow(2) * pairs).sum(torch::IntArrayRef{1, 2});  // [T]
  if (cfg.pairs == moereg::sp_pairs::mean) {
    const auto a = valid.sum(1);
    const auto w = torch::where(a >= 2, 1.0 / (a * (a - 1)).clamp_min(1), torch::zeros_like(a));
    per_token = per_token * w;
  }
  const auto Tv = m.sum();
  return cfg.coef * per_token.sum() / Tv;
}

/// LOSSES.md section 1, micro-batch scope over rows [r0, r1): alpha E sum_e f_e pbar_e.
torch::Tensor ref_lb_rows(const torch::Tensor& P, const torch::Tensor& topk, const torch::Tensor& m, int64_t r0,
                          int64_t r1, double alpha, double kcfg) {
  const int64_t E = P.size(1);
  const auto Pb = P.slice(0, r0, r1), Ib = topk.slice(0, r0, r1), mb = m.slice(0, r0, r1).to(P.scalar_type());
  const auto valid = Ib.ge(0).to(P.scalar_type()) * mb.unsqueeze(1);  // [S, k]
  const auto onehot = torch::one_hot(Ib.clamp_min(0), E).to(P.scalar_type()) * valid.unsqueeze(2);
  const auto counts = onehot.sum(torch::IntArrayRef{0, 1});  // [E]
  const auto Tv = mb.sum();
  if (Tv.item<double>() == 0) return (Pb * 0).sum();  // no valid token: 0, still in the graph
  const auto f = counts / (kcfg * Tv);
  const auto pbar = (Pb * mb.unsqueeze(1)).sum(0) / Tv;
  return alpha * static_cast<double>(E) * (f * pbar).sum();
}

/// Section 1 with scopes micro (offsets empty) or sequence (offsets of the B sequences).
torch::Tensor ref_load_balancing(const torch::Tensor& P, const torch::Tensor& topk,
                                 const c10::optional<torch::Tensor>& mask, double alpha, double kcfg,
                                 const std::vector<int64_t>& offsets = {}) {
  const auto m = mask_f64(mask, P.size(0));
  if (offsets.empty()) return ref_lb_rows(P, topk, m, 0, P.size(0), alpha, kcfg);
  auto sum = torch::zeros({}, P.options());
  const auto B = static_cast<int64_t>(offsets.size()) - 1;
  for (int64_t b = 0; b < B; ++b) sum = sum + ref_lb_rows(P, topk, m, offsets[b], offsets[b + 1], alpha, kcfg);
  return sum / static_cast<double>(B);
}

// --- one comparison: value and gradient of loss(x) against ref(x) ---------------------------

template <class Ours, class Ref>
void compare(const std::string& what, const torch::Tensor& x0, Ours ours, Ref ref, double upstream = 1.0,
             bool f32 = false) {
  auto x = x0.detach().clone().requires_grad_(true);
  auto xr = x0.detach().to(torch::kFloat64).clone().requires_grad_(true);
  const auto v = ours(x);
  const auto vr = ref(xr);
  (upstream * v).backward();
  (upstream * vr).backward();
  report(what + " value", rel_err(v, vr), f32);
  report(what + " grad", rel_err(x.grad(), xr.grad()), f32);
}

}  // namespace

int main() {
  torch::manual_seed(20260);
  std::printf("moereg LibTorch autograd Functions vs torch autograd of the LOSSES.md formulas\n");

  // Odd sizes: T = 37 tokens, E = 7 experts, k = 3 slots, d = 13.
  const int64_t T = 37, E = 7, k = 3, d = 13;
  auto topk_ = random_topk(T, k, E, 0.25);
  auto mask_ = random_mask(T, 0.8, torch::kBool);
  const auto H = torch::randn({T, k, d}, torch::kFloat64);
  // Token 3 with three valid slots, for the case below where ||h_{3,1}|| < eps.
  topk_[3] = torch::tensor({4, 0, 6}, torch::kInt64);
  mask_[3] = true;
  const auto topk = topk_, mask_b = mask_;
  {
    int64_t single = 0, masked = 0, dropped = topk.lt(0).sum().item<int64_t>();
    const auto nv = (topk.ge(0) & mask_b.unsqueeze(1)).sum(1);
    single = nv.eq(1).sum().item<int64_t>();
    masked = mask_b.logical_not().sum().item<int64_t>();
    std::printf(
        "inputs: T = %lld, E = %lld, k = %lld, d = %lld; %lld padded tokens, %lld dropped slots, "
        "%lld tokens with one valid slot\n",
        static_cast<long long>(T), static_cast<long long>(E), static_cast<long long>(k), static_cast<long long>(d),
        static_cast<long long>(masked), static_cast<long long>(dropped), static_cast<long long>(single));
  }

  std::printf("specialization (LOSSES.md section 3), float64:\n");
  {
    const moereg::specialization_config cfg{};
    compare(
        "pairs = sum, bool mask", H,
        [&](const torch::Tensor& x) { return moereg_torch::specialization(x, topk, mask_b, cfg, E); },
        [&](const torch::Tensor& x) { return ref_specialization(x, topk, mask_b, cfg); });
  }
  {
    moereg::specialization_config cfg{};
    cfg.coef = 0.37;
    cfg.pairs = moereg::sp_pairs::mean;
    const auto mask_u8 = mask_b.to(torch::kUInt8);
    compare(
        "pairs = mean, coef 0.37, uint8 mask, upstream 2.5", H,
        [&](const torch::Tensor& x) { return moereg_torch::specialization(x, topk, mask_u8, cfg); },
        [&](const torch::Tensor& x) { return ref_specialization(x, topk, mask_u8, cfg); }, 2.5);
  }
  {
    // A non-contiguous input (a permuted [k, T, d] buffer) goes through .contiguous().
    const auto Hkt = H.permute({1, 0, 2}).contiguous();
    auto x = Hkt.clone().requires_grad_(true);
    auto xr = Hkt.clone().requires_grad_(true);
    const moereg::specialization_config cfg{};
    const auto v = moereg_torch::specialization(x.permute({1, 0, 2}), topk, c10::nullopt, cfg);
    const auto vr = ref_specialization(xr.permute({1, 0, 2}), topk, c10::nullopt, cfg);
    v.backward();
    vr.backward();
    report("non-contiguous acts, no mask value", rel_err(v, vr));
    report("non-contiguous acts, no mask grad", rel_err(x.grad(), xr.grad()));
  }
  {
    // Chained: acts = reshape(X W); the gradient reaches W through torch's own ops, and a
    // torch term is added to the moereg one.
    const int64_t din = 5;
    const auto X = torch::randn({T, din}, torch::kFloat64);
    const auto W0 = torch::randn({din, k * d}, torch::kFloat64);
    const moereg::specialization_config cfg{};
    compare(
        "chained through a linear map (grad of W)", W0,
        [&](const torch::Tensor& W) {
          const auto h = torch::matmul(X, W).view({T, k, d});
          return moereg_torch::specialization(h, topk, mask_b, cfg) + 1e-3 * h.pow(2).mean();
        },
        [&](const torch::Tensor& W) {
          const auto h = torch::matmul(X, W).view({T, k, d});
          return ref_specialization(h, topk, mask_b, cfg) + 1e-3 * h.pow(2).mean();
        });
  }
  {
    // Every token padded: value 0 and an all-zero gradient (T_v = 0 rule).
    const auto none = torch::zeros({T}, torch::kInt32);
    auto x = H.clone().requires_grad_(true);
    const auto v = moereg_torch::specialization(x, topk, none);
    v.backward();
    expect(v.item<double>() == 0.0 && x.grad().abs().max().item<double>() == 0.0,
           "all tokens padded: value 0, gradient 0");
  }
  {
    // ||h_{3,1}|| < eps in a valid slot: the norm is the constant eps there. (A case of its
    // own: the gradient of that vector is ~1/eps larger than the others and would set the
    // scale of the relative error.)
    auto Ht = H.clone();
    Ht[3][1] *= 1e-10;
    const moereg::specialization_config cfg{};
    compare(
        "a vector shorter than eps", Ht,
        [&](const torch::Tensor& x) { return moereg_torch::specialization(x, topk, mask_b, cfg); },
        [&](const torch::Tensor& x) { return ref_specialization(x, topk, mask_b, cfg); });
  }
  {
    // Without requires_grad only the value is computed.
    const auto v = moereg_torch::specialization(H, topk, mask_b);
    const auto vr = ref_specialization(H, topk, mask_b, {});
    report("value without requires_grad", rel_err(v, vr));
  }

  std::printf("load balancing (LOSSES.md section 1), float64:\n");
  const auto P = torch::softmax(torch::randn({T, E}, torch::kFloat64) * 1.5, 1);
  {
    const moereg::load_balancing_config cfg{};
    const auto mask_i64 = mask_b.to(torch::kInt64);
    compare(
        "micro, int64 mask", P,
        [&](const torch::Tensor& x) { return moereg_torch::load_balancing(x, topk, mask_i64, cfg); },
        [&](const torch::Tensor& x) { return ref_load_balancing(x, topk, mask_i64, cfg.coef, double(k)); });
  }
  {
    moereg::load_balancing_config cfg{};
    cfg.coef = 0.3;
    cfg.k = k + 2;  // configured top-k wider than the columns given
    const auto topk32 = topk.to(torch::kInt32);
    compare(
        "micro, cfg.k = k + 2, int32 topk, no mask, upstream -1.7", P,
        [&](const torch::Tensor& x) { return moereg_torch::load_balancing(x, topk32, c10::nullopt, cfg); },
        [&](const torch::Tensor& x) { return ref_load_balancing(x, topk, c10::nullopt, cfg.coef, double(k + 2)); },
        -1.7);
  }
  {
    // Sequence scope, fixed length: T = 35 = 5 sequences of 7, the second one fully padded.
    const int64_t Ts = 35, S = 7;
    const auto Ps = P.slice(0, 0, Ts), Is = topk.slice(0, 0, Ts);
    auto ms = mask_b.slice(0, 0, Ts).clone();
    ms.slice(0, S, 2 * S).fill_(false);
    moereg::load_balancing_config cfg{};
    cfg.scope = moereg::lb_scope::sequence;
    cfg.seq_len = S;
    std::vector<int64_t> offs;
    for (int64_t b = 0; b <= Ts / S; ++b) offs.push_back(b * S);
    compare(
        "sequence, seq_len 7, one sequence fully padded", Ps,
        [&](const torch::Tensor& x) { return moereg_torch::load_balancing(x, Is, ms, cfg); },
        [&](const torch::Tensor& x) { return ref_load_balancing(x, Is, ms, cfg.coef, double(k), offs); });
  }
  {
    // Sequence scope, packed sequences of uneven lengths (cu_seqlens).
    const std::vector<int64_t> offs{0, 5, 6, 19, 30, 37};
    const auto cu = torch::tensor(offs, torch::kInt64);
    moereg::load_balancing_config cfg{};
    cfg.scope = moereg::lb_scope::sequence;
    compare(
        "sequence, cu_seqlens {0,5,6,19,30,37}", P,
        [&](const torch::Tensor& x) { return moereg_torch::load_balancing(x, topk, mask_b, cfg, cu); },
        [&](const torch::Tensor& x) { return ref_load_balancing(x, topk, mask_b, cfg.coef, double(k), offs); });
  }
  {
    // Chained: probabilities from a softmax over router logits, as in training.
    const auto Z0 = torch::randn({T, E}, torch::kFloat64);
    compare(
        "micro through softmax (grad of the logits)", Z0,
        [&](const torch::Tensor& z) { return moereg_torch::load_balancing(torch::softmax(z, 1), topk, mask_b); },
        [&](const torch::Tensor& z) {
          return ref_load_balancing(torch::softmax(z, 1), topk, mask_b, 1e-2, double(k));
        });
  }

  std::printf("float32 tensors (against the float64 formula, tolerance %.0e):\n", tol32);
  compare(
      "specialization float32", H.to(torch::kFloat32),
      [&](const torch::Tensor& x) { return moereg_torch::specialization(x, topk, mask_b); },
      [&](const torch::Tensor& x) { return ref_specialization(x, topk, mask_b, {}); }, 1.0, true);
  compare(
      "load balancing float32", P.to(torch::kFloat32),
      [&](const torch::Tensor& x) { return moereg_torch::load_balancing(x, topk, mask_b); },
      [&](const torch::Tensor& x) { return ref_load_balancing(x, topk, mask_b, 1e-2, double(k)); }, 1.0, true);
  {
    auto x = H.to(torch::kFloat32).requires_grad_(true);
    const auto v = moereg_torch::specialization(x, topk, mask_b);
    v.backward();
    expect(v.scalar_type() == torch::kFloat32 && x.grad().scalar_type() == torch::kFloat32,
           "float32 in, float32 value and gradient out");
  }

  std::printf("errors:\n");
  {
    auto bad = topk.clone();
    bad[4][0] = 2;
    bad[4][2] = 2;  // expert 2 twice in row 4
    std::string msg;
    try {
      (void)moereg_torch::specialization(H, bad, mask_b);
    } catch (const moereg::error& e) {
      msg = e.what();
    }
    std::printf("    caught: %s\n", msg.c_str());
    expect(msg.find("specialization") != std::string::npos && msg.find("twice") != std::string::npos,
           "repeated expert: moereg::error with moereg's message");
  }
  {
    std::string msg;
    try {
      (void)moereg_torch::load_balancing(P, topk.slice(0, 0, T - 1), mask_b);
    } catch (const moereg::error& e) {
      msg = e.what();
    }
    std::printf("    caught: %s\n", msg.c_str());
    expect(msg.find("load_balancing") != std::string::npos && msg.find("rows") != std::string::npos,
           "topk with T - 1 rows: moereg::error with moereg's message");
  }
  {
    bool caught = false;
    try {
      (void)moereg_torch::specialization(H.to(torch::kInt32), topk);
    } catch (const c10::Error&) {
      caught = true;
    }
    expect(caught, "int32 activations: c10::Error from the dtype check");
  }

  std::printf("worst relative error: float64 %.3e (limit %.0e), float32 %.3e (limit %.0e)\n", worst64, tol64, worst32,
              tol32);
  if (failures > 0) {
    std::printf("FAILED: %d check(s)\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
