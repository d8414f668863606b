// Exception safety, table-driven: for every loss and every class of bad input, the call
// throws moereg::error and the gradient buffer (NaN-poisoned, or filled with a sentinel) is
// bitwise unchanged afterwards, in overwrite and in accumulate mode.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <moereg/moereg.hpp>

#include "hardening/cases.hpp"

namespace {

using moereg::index_t;
using namespace moereg_hardening;

// Everything a bad call may touch: float inputs of a random case, and one gradient buffer
// large enough for any gradient view the cases build (two [T, E] layers or [T, k, d]).
struct world {
  routing_case c = make_case(99, 37, 6, 3, 5);
  std::vector<float> P = moereg_test::cast<float>(c.P), P2 = moereg_test::cast<float>(c.P2),
                     Z = moereg_test::cast<float>(c.Z), H = moereg_test::cast<float>(c.H);
  std::vector<std::int64_t> I = c.I, I2 = c.I2;
  std::vector<std::uint8_t> mask = c.mask;
  std::vector<double> stats_good = std::vector<double>(64, 1.0);
  std::vector<float> grad = std::vector<float>(static_cast<std::size_t>(2 * c.T * c.E + c.T * c.k * c.d + 64));
  index_t T = c.T, E = c.E, k = c.k, d = c.d;
};

struct bad_case {
  std::string loss, what;
  std::function<void(world&, moereg::grad_options)> call;
};

// Router losses whose input and gradient are one [T, E] matrix share these bad inputs.
template <class Loss, class Inputs>
void add_matrix_cases(std::vector<bad_case>& out, const std::string& name, std::vector<float> world::*input,
                      bool stats_are_counts = true) {
  auto run = [](world& w, moereg::grad_options o, moereg::routing_view<float> x, moereg::mask_view m,
                moereg::matrix_view<float> g, moereg::stats_view st) {
    (void)w;
    Loss{}.value_and_grad(Inputs{x, m}, g, o, st);
  };
  auto full = [input](world& w) { return moereg::routing_view<float>((w.*input).data(), w.T, w.E); };
  auto grad = [](world& w) { return moereg::matrix_view<float>(w.grad.data() + 3, w.T, w.E); };
  auto mask = [](world& w) { return moereg::mask_view(w.mask.data(), w.T); };
  out.push_back({name, "grad has one row too few", [=](world& w, moereg::grad_options o) {
                   run(w, o, full(w), mask(w), moereg::matrix_view<float>(w.grad.data(), w.T - 1, w.E), {});
                 }});
  out.push_back({name, "grad has one column too many", [=](world& w, moereg::grad_options o) {
                   run(w, o, full(w), mask(w), moereg::matrix_view<float>(w.grad.data(), w.T, w.E + 1), {});
                 }});
  out.push_back({name, "input has a negative size", [=](world& w, moereg::grad_options o) {
                   run(w, o, moereg::routing_view<float>((w.*input).data(), -1, w.E), mask(w), grad(w), {});
                 }});
  out.push_back({name, "input has a negative column stride", [=](world& w, moereg::grad_options o) {
                   auto x = full(w);
                   x.col_stride = -1;
                   run(w, o, x, mask(w), grad(w), {});
                 }});
  out.push_back({name, "grad has a negative row stride", [=](world& w, moereg::grad_options o) {
                   auto g = grad(w);
                   g.row_stride = -g.row_stride;
                   run(w, o, full(w), mask(w), g, {});
                 }});
  out.push_back({name, "input is null with a non-empty shape", [=](world& w, moereg::grad_options o) {
                   run(w, o, moereg::routing_view<float>(nullptr, w.T, w.E), mask(w), grad(w), {});
                 }});
  out.push_back({name, "mask has the wrong length", [=](world& w, moereg::grad_options o) {
                   run(w, o, full(w), moereg::mask_view(w.mask.data(), w.T - 2), grad(w), {});
                 }});
  out.push_back({name, "mask has a negative stride", [=](world& w, moereg::grad_options o) {
                   run(w, o, full(w), moereg::mask_view(w.mask.data(), w.T, -1), grad(w), {});
                 }});
  out.push_back({name, "reduced statistics have the wrong size", [=](world& w, moereg::grad_options o) {
                   run(w, o, full(w), mask(w), grad(w), moereg::stats_view{w.stats_good.data(), 40});
                 }});
  out.push_back({name, "reduced statistics hold a NaN", [=](world& w, moereg::grad_options o) {
                   Inputs in{full(w), mask(w)};
                   std::vector<double> st(static_cast<std::size_t>(Loss{}.stats_size(in)), 2.0);
                   st.back() = std::numeric_limits<double>::quiet_NaN();
                   run(w, o, full(w), mask(w), grad(w), moereg::stats_view{st.data(), static_cast<index_t>(st.size())});
                 }});
  if (!stats_are_counts) return;  // importance: its statistics are column sums of P, any sign
  out.push_back({name, "reduced statistics hold a negative count", [=](world& w, moereg::grad_options o) {
                   Inputs in{full(w), mask(w)};
                   std::vector<double> st(static_cast<std::size_t>(Loss{}.stats_size(in)), 2.0);
                   st.front() = -1.0;
                   run(w, o, full(w), mask(w), grad(w), moereg::stats_view{st.data(), static_cast<index_t>(st.size())});
                 }});
}

std::vector<bad_case> load_balancing_cases() {
  std::vector<bad_case> out;
  using L = moereg::load_balancing_loss;
  using In = moereg::load_balancing_inputs<float>;
  auto call = [](world& w, moereg::grad_options o, const L& loss, In in, index_t grad_rows = -1,
                 moereg::stats_view st = {}) {
    loss.value_and_grad(in, moereg::matrix_view<float>(w.grad.data() + 1, grad_rows < 0 ? w.T : grad_rows, w.E), o, st);
  };
  auto base = [](world& w) {
    return In{{w.P.data(), w.T, w.E}, {w.I.data(), w.T, w.k}, moereg::mask_view(w.mask.data(), w.T)};
  };
  const std::string n = "load_balancing";
  out.push_back(
      {n, "grad rows differ from probs", [=](world& w, moereg::grad_options o) { call(w, o, L{}, base(w), w.T + 1); }});
  out.push_back({n, "topk has fewer rows than probs", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.topk.rows = w.T - 1;
                   call(w, o, L{}, in);
                 }});
  out.push_back({n, "k > E", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.probs.cols = w.k - 1;
                   call(w, o, L{}, in);
                 }});
  out.push_back({n, "an expert index >= E", [=](world& w, moereg::grad_options o) {
                   auto I = w.I;
                   I[I.size() - 1] = w.E;
                   auto in = base(w);
                   in.topk = moereg::topk_view(I.data(), w.T, w.k);
                   call(w, o, L{}, in);
                 }});
  out.push_back({n, "an expert selected twice in a row", [=](world& w, moereg::grad_options o) {
                   auto I = w.I;
                   I[5 * static_cast<std::size_t>(w.k)] = 2, I[5 * static_cast<std::size_t>(w.k) + 1] = 2;
                   auto in = base(w);
                   in.topk = moereg::topk_view(I.data(), w.T, w.k);
                   call(w, o, L{}, in);
                 }});
  out.push_back({n, "topk row stride smaller than k", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.topk.row_stride = w.k - 1;
                   call(w, o, L{}, in);
                 }});
  out.push_back({n, "config k > E", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.k = w.E + 1;
                   call(w, o, loss, base(w));
                 }});
  out.push_back({n, "config k negative", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.k = -1;
                   call(w, o, loss, base(w));
                 }});
  out.push_back({n, "sequence scope: T not a multiple of seq_len", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.scope = moereg::lb_scope::sequence;
                   loss.cfg.seq_len = 5;  // T = 37
                   call(w, o, loss, base(w));
                 }});
  out.push_back({n, "sequence scope: neither seq_len nor cu_seqlens", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.scope = moereg::lb_scope::sequence;
                   call(w, o, loss, base(w));
                 }});
  out.push_back({n, "sequence scope: cu_seqlens decreasing", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.scope = moereg::lb_scope::sequence;
                   const std::int64_t offs[4] = {0, 20, 10, 37};
                   auto in = base(w);
                   in.cu_seqlens = moereg::offsets_view(offs, 4);
                   call(w, o, loss, in);
                 }});
  out.push_back({n, "sequence scope: cu_seqlens ends before T", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.scope = moereg::lb_scope::sequence;
                   const std::int32_t offs[3] = {0, 10, 36};
                   auto in = base(w);
                   in.cu_seqlens = moereg::offsets_view(offs, 3);
                   call(w, o, loss, in);
                 }});
  out.push_back({n, "sequence scope: seq_len and cu_seqlens both given", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.scope = moereg::lb_scope::sequence;
                   loss.cfg.seq_len = 37;
                   const std::int32_t offs[2] = {0, 37};
                   auto in = base(w);
                   in.cu_seqlens = moereg::offsets_view(offs, 2);
                   call(w, o, loss, in);
                 }});
  out.push_back({n, "micro scope given a seq_len", [=](world& w, moereg::grad_options o) {
                   L loss{};
                   loss.cfg.seq_len = 37;
                   call(w, o, loss, base(w));
                 }});
  out.push_back({n, "reduced statistics of the wrong size", [=](world& w, moereg::grad_options o) {
                   call(w, o, L{}, base(w), -1, moereg::stats_view{w.stats_good.data(), w.E});
                 }});
  out.push_back({n, "mask of the wrong length", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.mask = moereg::mask_view(w.mask.data(), w.T + 1);
                   call(w, o, L{}, in);
                 }});
  return out;
}

std::vector<bad_case> z_loss_extra_cases() {
  std::vector<bad_case> out;
  out.push_back({"z_loss", "logits with E = 0 columns", [](world& w, moereg::grad_options o) {
                   moereg::z_loss{}.value_and_grad(moereg::z_loss_inputs<float>{{w.Z.data(), w.T, 0}, {}},
                                                   moereg::matrix_view<float>(w.grad.data(), w.T, 0), o);
                 }});
  return out;
}

// Activation losses (specialization, orthogonality) share these bad inputs.
template <class Loss, template <class, class> class Inputs>
void add_activation_cases(std::vector<bad_case>& out, const std::string& n) {
  using TM = moereg::token_major;
  auto base = [](world& w) {
    return Inputs<float, TM>{moereg::token_major_view<const float>(w.H.data(), w.T, w.k, w.d),
                             moereg::topk_view(w.I.data(), w.T, w.k), moereg::mask_view(w.mask.data(), w.T), w.E};
  };
  auto grad = [](world& w) { return moereg::token_major_view<float>(w.grad.data() + 2, w.T, w.k, w.d); };
  auto call = [](const Loss& loss, const Inputs<float, TM>& in, moereg::activation_view<float, TM> g,
                 moereg::grad_options o, moereg::stats_view st = {}) { loss.value_and_grad(in, g, o, st); };
  out.push_back({n, "eps = 0", [=](world& w, moereg::grad_options o) {
                   Loss loss{};
                   loss.cfg.eps = 0;
                   call(loss, base(w), grad(w), o);
                 }});
  out.push_back({n, "coef is NaN", [=](world& w, moereg::grad_options o) {
                   Loss loss{};
                   loss.cfg.coef = std::numeric_limits<double>::quiet_NaN();
                   call(loss, base(w), grad(w), o);
                 }});
  out.push_back({n, "acts layout has one token too few", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.acts.layout.num_tokens = w.T - 1;
                   call(Loss{}, in, grad(w), o);
                 }});
  out.push_back({n, "grad layout has another d", [=](world& w, moereg::grad_options o) {
                   call(Loss{}, base(w), moereg::token_major_view<float>(w.grad.data(), w.T, w.k, w.d - 1), o);
                 }});
  out.push_back({n, "acts layout has a zero element stride", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.acts.layout.elem_stride = 0;
                   call(Loss{}, in, grad(w), o);
                 }});
  out.push_back({n, "acts layout has a negative token stride", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.acts.layout.token_stride = -1;
                   call(Loss{}, in, grad(w), o);
                 }});
  out.push_back({n, "an expert index >= num_experts", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.num_experts = 2;
                   call(Loss{}, in, grad(w), o);
                 }});
  out.push_back({n, "an expert selected twice in a row (E unknown)", [=](world& w, moereg::grad_options o) {
                   auto I = w.I;
                   I[3 * static_cast<std::size_t>(w.k)] = 4, I[3 * static_cast<std::size_t>(w.k) + 2] = 4;
                   auto in = base(w);
                   in.topk = moereg::topk_view(I.data(), w.T, w.k);
                   in.num_experts = 0;
                   call(Loss{}, in, grad(w), o);
                 }});
  out.push_back({n, "k above math::max_slots", [=](world& w, moereg::grad_options o) {
                   std::vector<std::int64_t> I(static_cast<std::size_t>(w.T * 17), -1);
                   auto in = base(w);
                   in.topk = moereg::topk_view(I.data(), w.T, 17);
                   in.acts.layout = moereg::token_major(w.T, 17, 1);
                   in.num_experts = 0;
                   call(Loss{}, in, moereg::token_major_view<float>(w.grad.data(), w.T, 17, 1), o);
                 }});
  out.push_back({n, "mask of the wrong length", [=](world& w, moereg::grad_options o) {
                   auto in = base(w);
                   in.mask = moereg::mask_view(w.mask.data(), 3);
                   call(Loss{}, in, grad(w), o);
                 }});
  out.push_back({n, "reduced statistics of the wrong size", [=](world& w, moereg::grad_options o) {
                   call(Loss{}, base(w), grad(w), o, moereg::stats_view{w.stats_good.data(), 2});
                 }});
  out.push_back(
      {n, "expert_grouped: two slots map to the same row", [=](world& w, moereg::grad_options o) {
         std::vector<std::int32_t> rows(static_cast<std::size_t>(w.T * w.k));
         for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<std::int32_t>(i);
         rows[7] = 3;
         const moereg::topk_view map(rows.data(), w.T, w.k);
         const moereg::expert_grouped lay(map, w.T * w.k, w.d);
         Inputs<float, moereg::expert_grouped> in{{w.H.data(), lay}, moereg::topk_view(w.I.data(), w.T, w.k), {}, w.E};
         Loss{}.value_and_grad(in, moereg::activation_view<float, moereg::expert_grouped>{w.grad.data(), lay}, o);
       }});
  out.push_back(
      {n, "expert_grouped: a row index past the end", [=](world& w, moereg::grad_options o) {
         std::vector<std::int64_t> rows(static_cast<std::size_t>(w.T * w.k));
         for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<std::int64_t>(i);
         const moereg::topk_view map(rows.data(), w.T, w.k);
         const moereg::expert_grouped lay(map, w.T * w.k - 1, w.d);
         Inputs<float, moereg::expert_grouped> in{{w.H.data(), lay}, moereg::topk_view(w.I.data(), w.T, w.k), {}, w.E};
         Loss{}.value_and_grad(in, moereg::activation_view<float, moereg::expert_grouped>{w.grad.data(), lay}, o);
       }});
  out.push_back(
      {n, "capacity_padded: a position >= capacity", [=](world& w, moereg::grad_options o) {
         std::vector<std::int64_t> pos(static_cast<std::size_t>(w.T * w.k));
         for (std::size_t i = 0; i < pos.size(); ++i)
           pos[i] = static_cast<std::int64_t>(i / static_cast<std::size_t>(w.k));
         pos[4] = w.T;  // capacity below is T
         const moereg::topk_view I(w.I.data(), w.T, w.k), P(pos.data(), w.T, w.k);
         const moereg::capacity_padded lay(I, P, w.E, w.T, 1);
         Inputs<float, moereg::capacity_padded> in{{w.H.data(), lay}, I, {}, w.E};
         Loss{}.value_and_grad(in, moereg::activation_view<float, moereg::capacity_padded>{w.grad.data(), lay}, o);
       }});
}

std::vector<bad_case> coupling_cases() {
  std::vector<bad_case> out;
  const std::string n = "coupling";
  auto call = [](world& w, moereg::grad_options o, const moereg::routing_view<float>* P, const moereg::topk_view* I,
                 index_t layers, index_t grad_rows, moereg::coupling_loss loss = {}) {
    const moereg::matrix_view<float> g[2] = {{w.grad.data(), grad_rows, w.E}, {w.grad.data() + w.T * w.E, w.T, w.E}};
    loss.value_and_grad(moereg::coupling_inputs<float>{P, I, layers, moereg::mask_view(w.mask.data(), w.T)}, g, o);
  };
  out.push_back({n, "one layer only", [=](world& w, moereg::grad_options o) {
                   const moereg::routing_view<float> P[1] = {{w.P.data(), w.T, w.E}};
                   const moereg::topk_view I[1] = {{w.I.data(), w.T, w.k}};
                   call(w, o, P, I, 1, w.T);
                 }});
  out.push_back({n, "layers with different T", [=](world& w, moereg::grad_options o) {
                   const moereg::routing_view<float> P[2] = {{w.P.data(), w.T, w.E}, {w.P2.data(), w.T - 1, w.E}};
                   const moereg::topk_view I[2] = {{w.I.data(), w.T, w.k}, {w.I2.data(), w.T - 1, w.k}};
                   call(w, o, P, I, 2, w.T);
                 }});
  out.push_back({n, "an index out of range in the second layer", [=](world& w, moereg::grad_options o) {
                   auto I2 = w.I2;
                   I2[0] = w.E + 3;
                   const moereg::routing_view<float> P[2] = {{w.P.data(), w.T, w.E}, {w.P2.data(), w.T, w.E}};
                   const moereg::topk_view I[2] = {{w.I.data(), w.T, w.k}, {I2.data(), w.T, w.k}};
                   call(w, o, P, I, 2, w.T);
                 }});
  out.push_back({n, "first gradient has the wrong shape", [=](world& w, moereg::grad_options o) {
                   const moereg::routing_view<float> P[2] = {{w.P.data(), w.T, w.E}, {w.P2.data(), w.T, w.E}};
                   const moereg::topk_view I[2] = {{w.I.data(), w.T, w.k}, {w.I2.data(), w.T, w.k}};
                   call(w, o, P, I, 2, w.T + 1);
                 }});
  out.push_back({n, "probs pointer is null", [=](world& w, moereg::grad_options o) {
                   const moereg::topk_view I[2] = {{w.I.data(), w.T, w.k}, {w.I2.data(), w.T, w.k}};
                   call(w, o, nullptr, I, 2, w.T);
                 }});
  out.push_back({n, "log form with eps = -1", [=](world& w, moereg::grad_options o) {
                   const moereg::routing_view<float> P[2] = {{w.P.data(), w.T, w.E}, {w.P2.data(), w.T, w.E}};
                   const moereg::topk_view I[2] = {{w.I.data(), w.T, w.k}, {w.I2.data(), w.T, w.k}};
                   moereg::coupling_loss loss{};
                   loss.cfg.form = moereg::coupling_form::log;
                   loss.cfg.eps = -1;
                   call(w, o, P, I, 2, w.T, loss);
                 }});
  return out;
}

std::vector<bad_case> all_cases() {
  std::vector<bad_case> all = load_balancing_cases();
  add_matrix_cases<moereg::z_loss, moereg::z_loss_inputs<float>>(all, "z_loss", &world::Z);
  for (auto& c : z_loss_extra_cases()) all.push_back(c);
  add_matrix_cases<moereg::variance_loss, moereg::variance_inputs<float>>(all, "variance", &world::P);
  add_matrix_cases<moereg::entropy_loss, moereg::entropy_inputs<float>>(all, "entropy", &world::P);
  add_matrix_cases<moereg::importance_loss, moereg::importance_inputs<float>>(all, "importance", &world::P, false);
  add_activation_cases<moereg::specialization_loss, moereg::specialization_inputs>(all, "specialization");
  add_activation_cases<moereg::orthogonality_loss, moereg::orthogonality_inputs>(all, "orthogonality");
  for (auto& c : coupling_cases()) all.push_back(c);
  return all;
}

}  // namespace

TEST_CASE("every loss leaves the gradient buffer bitwise unchanged when it throws", "[hardening][exception_safety]") {
  const auto cases = all_cases();
  REQUIRE(cases.size() > 60);
  int thrown = 0;
  for (const auto& bc : cases)
    for (int fill = 0; fill < 2; ++fill)
      for (int acc = 0; acc < 2; ++acc) {
        INFO(bc.loss << ": " << bc.what << (fill ? " (sentinel-filled" : " (NaN-poisoned")
                     << (acc ? ", accumulate)" : ", overwrite)"));
        world w;
        if (fill == 0) {
          // A NaN with a recognisable payload: a write of any computed value would change the bits.
          const std::uint32_t poison = 0x7fc0dead;
          for (auto& g : w.grad) std::memcpy(&g, &poison, sizeof g);
        } else {
          for (std::size_t i = 0; i < w.grad.size(); ++i) w.grad[i] = 1000.0f + static_cast<float>(i);
        }
        const std::vector<float> before = w.grad;
        const auto inputs_before = std::make_tuple(w.P, w.P2, w.Z, w.H, w.I, w.I2, w.mask);
        moereg::grad_options o;
        o.accumulate = acc == 1;
        o.grad_scale = 0.5;
        bool threw = false;
        try {
          bc.call(w, o);
        } catch (const moereg::error& e) {
          threw = true;
          CHECK(std::string(e.what()).find(bc.loss) != std::string::npos);  // the message names the loss
        }
        CHECK(threw);
        thrown += threw ? 1 : 0;
        CHECK(bitwise_equal(w.grad, before));
        CHECK(inputs_before == std::make_tuple(w.P, w.P2, w.Z, w.H, w.I, w.I2, w.mask));
      }
  CHECK(thrown == static_cast<int>(cases.size()) * 4);
}
