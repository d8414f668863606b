// The demo network of examples/toy_moe: its analytic backward (task loss and every
// regulariser, carried through softmax_backward and the top-k renormalisation) against finite
// differences in double with the routing selection held fixed; the task's Bayes loss; and a
// short training run that learns.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <moereg/testing/gradcheck.hpp>

#include "../../examples/toy_moe/toy_moe.hpp"

namespace {

struct small_setup {
  toy_moe::task_config tc;
  toy_moe::model_config mc;
  small_setup(toy_moe::index_t layers, toy_moe::index_t k) {
    tc.topics = 2;
    tc.own = 2;
    tc.shared = 3;
    tc.branching = 2;
    tc.window = 2;
    tc.seed = 5;
    mc.vocab = tc.vocab();
    mc.window = tc.window;
    mc.dim = 5;
    mc.experts = 4;
    mc.top_k = k;
    mc.hidden = 3;
    mc.layers = layers;
  }
};

}  // namespace

TEST_CASE("toy_moe: the analytic gradient matches finite differences with the selection fixed", "[toy_moe]") {
  struct reg_case {
    const char* name;
    toy_moe::reg_config reg;
  };
  toy_moe::reg_config all{0.2, 0.3, 0.25, 0.15, 0.35, 0.05};
  const std::vector<reg_case> cases = {
      {"task only", {}},
      {"load balancing", {0.2, 0, 0, 0, 0, 0}},
      {"specialization", {0, 0.3, 0, 0, 0, 0}},
      {"coupling", {0, 0, 0.25, 0, 0, 0}},
      {"orthogonality", {0, 0, 0, 0.15, 0, 0}},
      {"variance", {0, 0, 0, 0, 0.35, 0}},
      {"z-loss", {0, 0, 0, 0, 0, 0.05}},
      {"all", all},
  };
  for (const auto& shape : {std::pair<long, long>{3, 2}, std::pair<long, long>{2, 3}}) {
    const small_setup su(shape.first, shape.second);
    const toy_moe::task tk(su.tc);
    const toy_moe::param_layout pl(su.mc);
    std::mt19937_64 g(3 + static_cast<std::uint64_t>(shape.first));
    const toy_moe::batch b = tk.sample(g, 7);
    // Larger weights than the training initialisation, so that routing is far from uniform
    // and every term has a sizeable gradient.
    std::vector<double> x = toy_moe::init_params<double>(pl, 11);
    std::normal_distribution<double> nd(0.0, 0.4);
    for (auto& v : x) v += nd(g);

    // Hold the selection fixed at the one of x, with one slot dropped (capacity overflow).
    const auto fc0 = toy_moe::forward(pl, x.data(), b);
    std::vector<std::vector<std::int32_t>> fixed;
    for (const auto& L : fc0.layers) fixed.push_back(L.topk);
    fixed[1][0] = -1;

    for (const auto& c : cases) {
      INFO("layers " << shape.first << ", k " << shape.second << ", " << c.name);
      std::vector<double> grad(x.size());
      const auto fc = toy_moe::forward(pl, x.data(), b, &fixed);
      const auto terms = toy_moe::objective(pl, x.data(), b, fc, c.reg, grad.data());
      const bool any_reg = c.reg.load_balancing + c.reg.specialization + c.reg.coupling + c.reg.orthogonality +
                               c.reg.variance + c.reg.z !=
                           0.0;
      CHECK((terms.total() != terms.task) == any_reg);  // each switched-on term contributes
      auto f = [&](const double* p) {
        const auto fx = toy_moe::forward(pl, p, b, &fixed);
        return toy_moe::objective(pl, p, b, fx, c.reg).total();
      };
      const auto rep = moereg::testing::gradcheck(f, x, grad);
      INFO(rep.summary());
      CHECK(rep.ok);
      CHECK(rep.checked == static_cast<moereg::index_t>(x.size()));
    }
  }
}

TEST_CASE("toy_moe: the objective's value and gradient do not depend on whether a gradient is asked for",
          "[toy_moe]") {
  const small_setup su(3, 2);
  const toy_moe::task tk(su.tc);
  const toy_moe::param_layout pl(su.mc);
  std::mt19937_64 g(9);
  const auto b = tk.sample(g, 9);
  const auto x = toy_moe::init_params<double>(pl, 4);
  const auto fc = toy_moe::forward(pl, x.data(), b);
  const toy_moe::reg_config reg{1e-2, 2e-3, 1e-3, 1e-4, 1e-3, 1e-3};
  std::vector<double> grad(x.size());
  const auto with = toy_moe::objective(pl, x.data(), b, fc, reg, grad.data());
  const auto without = toy_moe::objective(pl, x.data(), b, fc, reg);
  CHECK(with.total() == Approx(without.total()).epsilon(1e-14));
  CHECK(with.specialization == Approx(without.specialization).epsilon(1e-14));
  // The task term is the mean cross-entropy of the output softmax.
  double ce = 0;
  for (long t = 0; t < b.size; ++t) ce -= std::log(fc.probs(t, b.target[static_cast<std::size_t>(t)]));
  CHECK(with.task == Approx(ce / static_cast<double>(b.size)).epsilon(1e-14));
  // Top-k renormalised scores sum to 1 on every row.
  for (const auto& L : fc.layers)
    for (long t = 0; t < b.size; ++t) CHECK(L.scores.row(t).sum() == Approx(1.0).epsilon(1e-14));
}

TEST_CASE("toy_moe: the Bayes loss of the task lies between the topic-known and the uniform loss", "[toy_moe]") {
  toy_moe::task_config tc;  // the demo's task
  const toy_moe::task tk(tc);
  std::mt19937_64 g(1);
  const auto b = tk.sample(g, 4000);
  for (long i = 0; i < b.size; ++i) {
    CHECK(b.target[static_cast<std::size_t>(i)] >= 0);
    CHECK(b.target[static_cast<std::size_t>(i)] < tk.vocab());
  }
  // With the topic known, the next token has entropy H(4/7, 2/7, 1/7); the Bayes predictor
  // does not know the topic, so it can only be worse, and it must be far better than uniform.
  const double known = -(4.0 / 7 * std::log(4.0 / 7) + 2.0 / 7 * std::log(2.0 / 7) + 1.0 / 7 * std::log(1.0 / 7));
  const double bayes = tk.bayes_loss(b);
  CHECK(bayes > known - 0.05);  // sampling noise of 4000 draws
  CHECK(bayes < std::log(static_cast<double>(tk.vocab())) - 1.0);
}

TEST_CASE("toy_moe: a short training run lowers the held-out loss", "[toy_moe]") {
  toy_moe::task_config tc;
  tc.topics = 2;
  tc.own = 3;
  tc.shared = 4;
  const toy_moe::task tk(tc);
  toy_moe::model_config mc;
  mc.vocab = tc.vocab();
  mc.window = tc.window;
  mc.dim = 12;
  mc.experts = 4;
  mc.hidden = 8;
  mc.layers = 2;
  std::mt19937_64 g(99);
  const auto held = tk.sample(g, 512);
  const toy_moe::param_layout pl(mc);
  const auto x0 = toy_moe::init_params<float>(pl, 1);
  const double before = toy_moe::evaluate(pl, x0.data(), held).task_loss;
  toy_moe::train_config trc;
  trc.steps = 150;
  trc.batch = 64;
  trc.warmup = 10;
  const toy_moe::reg_config reg{1e-2, 2e-3, 1e-3, 1e-4, 1e-3, 0};
  const auto r = toy_moe::train<float>(tk, mc, reg, trc, held);
  INFO("held-out loss before " << before << ", after " << r.eval.task_loss << ", Bayes " << tk.bayes_loss(held));
  CHECK(r.eval.task_loss < before - 0.5);
  CHECK(r.eval.maxvio >= 0.0);
  CHECK(r.eval.pathway > 0.0);
  CHECK(r.eval.pathway <= 1.0);
}
