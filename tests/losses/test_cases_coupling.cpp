// The coupling cases of the shared list (support/loss_cases.hpp): token, log and batch forms
// over 2 or 3 layers with per-layer top-k widths. The property tests are in
// test_properties.cpp.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/coupling.hpp>

#include "support/loss_cases.hpp"

namespace moereg_test {
namespace {

using moereg::index_t;

moereg::stats_view sv(const std::vector<double>* r) {
  return r ? moereg::stats_view{r->data(), static_cast<index_t>(r->size())} : moereg::stats_view{};
}

batch cp_make(rng& r, long long T, void (*append)(batch&, rng&, long long)) {
  batch b;
  b.E = r.integer(2, 9);
  b.layers = r.integer(2, 3);
  b.reals.resize(static_cast<std::size_t>(b.layers));
  b.ints.resize(static_cast<std::size_t>(b.layers));
  for (long long l = 0; l < b.layers; ++l) {
    b.real_w.push_back(b.E);
    b.int_w.push_back(r.integer(1, std::min<long long>(b.E, 4)));
  }
  append(b, r, T);
  b.mask = random_mask(r, T, 0.25);
  return b;
}

void cp_append(batch& b, rng& r, long long n) {
  for (std::size_t l = 0; l < static_cast<std::size_t>(b.layers); ++l) {
    append_probs(b, l, r, n);
    append_topk(b, l, r, n, b.E, 0.2);
  }
  b.T += n;
  b.mask.resize(static_cast<std::size_t>(b.T), 1);
}

struct cp_views {
  std::vector<std::vector<std::int64_t>> I;
  std::vector<moereg::routing_view<double>> P;
  std::vector<moereg::topk_view> K;
  explicit cp_views(const batch& b) {
    for (std::size_t l = 0; l < static_cast<std::size_t>(b.layers); ++l) I.push_back(cast<std::int64_t>(b.ints[l]));
    for (std::size_t l = 0; l < static_cast<std::size_t>(b.layers); ++l) {
      P.emplace_back(b.reals[l].data(), b.T, b.E);
      K.emplace_back(I[l].data(), b.T, b.int_w[l]);
    }
  }
  moereg::coupling_inputs<double> inputs(const batch& b) const {
    return {P.data(), K.data(), b.layers, {b.mask.data(), b.T}};
  }
};

moereg::coupling_loss cp(moereg::coupling_form f) {
  moereg::coupling_loss l{};
  l.cfg.coef = 0.7;
  l.cfg.form = f;
  l.cfg.eps = 1e-3;
  return l;
}

double cp_call(moereg::coupling_form f, const batch& b, double* grad, moereg::grad_options o,
               const std::vector<double>* red) {
  const cp_views v(b);
  const auto loss = cp(f);
  if (!grad) return loss.value(v.inputs(b), sv(red));
  std::vector<moereg::matrix_view<double>> G;
  for (long long l = 0; l < b.layers; ++l) G.emplace_back(grad + l * b.T * b.E, b.T, b.E);
  return loss.value_and_grad(v.inputs(b), G.data(), o, sv(red));
}

std::vector<double> cp_stats(moereg::coupling_form f, const batch& b) {
  const cp_views v(b);
  return cp(f).local_stats(v.inputs(b));
}

std::vector<long long> cp_widths(const batch& b) {
  return std::vector<long long>(static_cast<std::size_t>(b.layers), b.E);
}

}  // namespace

batch case_coupling_token::make(rng& r, long long T) {
  return cp_make(r, T, cp_append);
}
void case_coupling_token::append(batch& b, rng& r, long long n) {
  cp_append(b, r, n);
}
std::vector<long long> case_coupling_token::grad_widths(const batch& b) {
  return cp_widths(b);
}
double case_coupling_token::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return cp_call(moereg::coupling_form::token, b, g, o, red);
}
std::vector<double> case_coupling_token::stats(const batch& b) {
  return cp_stats(moereg::coupling_form::token, b);
}

batch case_coupling_log::make(rng& r, long long T) {
  return cp_make(r, T, cp_append);
}
void case_coupling_log::append(batch& b, rng& r, long long n) {
  cp_append(b, r, n);
}
std::vector<long long> case_coupling_log::grad_widths(const batch& b) {
  return cp_widths(b);
}
double case_coupling_log::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return cp_call(moereg::coupling_form::log, b, g, o, red);
}
std::vector<double> case_coupling_log::stats(const batch& b) {
  return cp_stats(moereg::coupling_form::log, b);
}

batch case_coupling_batch::make(rng& r, long long T) {
  return cp_make(r, T, cp_append);
}
void case_coupling_batch::append(batch& b, rng& r, long long n) {
  cp_append(b, r, n);
}
std::vector<long long> case_coupling_batch::grad_widths(const batch& b) {
  return cp_widths(b);
}
double case_coupling_batch::call(const batch& b, double* g, moereg::grad_options o, const std::vector<double>* red) {
  return cp_call(moereg::coupling_form::batch, b, g, o, red);
}
std::vector<double> case_coupling_batch::stats(const batch& b) {
  return cp_stats(moereg::coupling_form::batch, b);
}

}  // namespace moereg_test
