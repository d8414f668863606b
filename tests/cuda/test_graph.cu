// A whole multi-loss step captured in a CUDA graph and replayed: every replay gives bitwise
// the eager run's values, gradients and status, and a replay after the inputs changed in
// place gives the eager run on the new inputs.
#include <cstdint>
#include <vector>

#include "cuda/router_case.cuh"
#include "cuda/support.cuh"
#include "support/random.hpp"

using namespace moereg_cuda_test;
using moereg::index_t;

namespace {

struct step_data {
  static constexpr long long T = 1000, E = 32, k = 4, d = 48;
  router_case<float> router{101, T, E, k};
  router_case<float> logits{102, T, E, 1, 0.0, 0.0, true, 2.0};
  router_case<float> layer2{103, T, E, 2};
  device_buffer<float> acts, gP, gZ, gH, gP2a, gP2b, gSeq;

  moereg::load_balancing_loss lb{{0.01, moereg::lb_scope::global}};
  moereg::load_balancing_loss lb_seq{{0.01, moereg::lb_scope::sequence, 100}};
  moereg::z_loss zl{{0.001}};
  moereg::entropy_loss ent{{0.01}};
  moereg::variance_loss var{{0.01}};
  moereg::importance_loss imp{{0.01}};
  moereg::specialization_loss sp{{0.002}};
  moereg::orthogonality_loss orth{{0.0001}};
  moereg::coupling_loss cp{{0.001, moereg::coupling_form::log}};

  step_data() {
    moereg_test::rng r(7);
    acts = device_buffer<float>(from_double<float>(moereg_test::random_normal(r, static_cast<std::size_t>(T * k * d))));
    for (auto* b : {&gP, &gZ, &gP2a, &gP2b, &gSeq}) b->allocate(static_cast<std::size_t>(T * E));
    gH.allocate(static_cast<std::size_t>(T * k * d));
  }

  moereg::router_fused fused() const {
    moereg::router_fused f;
    f.load_balancing = &lb;
    f.z = &zl;
    f.entropy = &ent;
    f.variance = &var;
    f.importance = &imp;
    return f;
  }
  moereg::router_fused_inputs<float> router_in() const {
    return {router.probs(true), logits.probs(true), router.topk(true), router.mask(true)};
  }
  moereg::gram_fused_inputs<float, moereg::token_major> gram_in() const {
    return {{acts.get(), moereg::token_major(T, k, d)}, router.topk(true), router.mask(true), E};
  }
  moereg::load_balancing_inputs<float> seq_in() const {
    return {router.probs(true), router.topk(true), router.mask(true)};
  }

  std::size_t workspace_bytes() const {
    std::size_t n = fused().workspace_size(router_in());
    n = std::max(n, moereg::gram_fused{&sp, &orth}.workspace_size(gram_in()));
    n = std::max(n, moereg::workspace_size(lb_seq, seq_in()));
    const moereg::routing_view<float> p[2] = {router.probs(true), layer2.probs(true)};
    const moereg::topk_view t[2] = {router.topk(true), layer2.topk(true)};
    n = std::max(n, moereg::workspace_size(cp, moereg::coupling_inputs<float>{p, t, 2, router.mask(true)}));
    return n;
  }

  /// The step: every call enqueued on one stream, values in slots 0..9, one status word.
  void enqueue(gpu_env& env, std::size_t bytes) {
    auto be = env.backend(bytes);
    moereg::cuda_clear_status(be);
    fused().value_and_grad(router_in(), {gP.get(), T, E}, {gZ.get(), T, E}, {}, {}, be);  // slots 0..4
    auto be_seq = be;
    be_seq.value = env.values.get() + 5;
    (void)lb_seq.value_and_grad(seq_in(), {gSeq.get(), T, E}, {}, {}, be_seq);
    auto be_gram = be;
    be_gram.value = env.values.get() + 6;  // slots 6, 7
    moereg::gram_fused{&sp, &orth}.value_and_grad(gram_in(), {gH.get(), moereg::token_major(T, k, d)}, {}, {}, be_gram);
    auto be_cp = be;
    be_cp.value = env.values.get() + 8;
    const moereg::routing_view<float> p[2] = {router.probs(true), layer2.probs(true)};
    const moereg::topk_view t[2] = {router.topk(true), layer2.topk(true)};
    const moereg::matrix_view<float> g[2] = {{gP2a.get(), T, E}, {gP2b.get(), T, E}};
    (void)cp.value_and_grad(moereg::coupling_inputs<float>{p, t, 2, router.mask(true)}, g, {}, {}, be_cp);
  }

  struct snapshot {
    std::vector<double> values;
    std::vector<std::vector<float>> grads;
    int status;
  };
  snapshot take(gpu_env& env) {
    env.sync();
    snapshot s;
    s.values = env.values.download();
    s.values.resize(9);
    for (auto* b : {&gP, &gZ, &gSeq, &gH, &gP2a, &gP2b}) s.grads.push_back(b->download());
    s.status = env.read_status();
    return s;
  }
  void scramble_outputs(gpu_env& env) {
    env.sync();
    env.values.fill_bytes(0xFF);
    for (auto* b : {&gP, &gZ, &gSeq, &gH, &gP2a, &gP2b}) b->fill_bytes(0xFF);
  }
};

bool same(const step_data::snapshot& a, const step_data::snapshot& b) {
  if (a.status != b.status || a.grads.size() != b.grads.size()) return false;
  for (std::size_t i = 0; i < a.values.size(); ++i)
    if (!same_bits(a.values[i], b.values[i])) return false;
  for (std::size_t i = 0; i < a.grads.size(); ++i)
    if (!same_bits(a.grads[i], b.grads[i])) return false;
  return true;
}

}  // namespace

TEST_CASE("cuda: a multi-loss step captured in a CUDA graph replays bitwise", "[cuda][graph][determinism]") {
  gpu_env env;
  step_data s;
  const std::size_t bytes = s.workspace_bytes();
  s.enqueue(env, bytes);
  const auto eager = s.take(env);
  CHECK(eager.status == moereg::cuda_ok);
  for (std::size_t i = 0; i < eager.values.size(); ++i) {
    INFO("slot " << i);
    CHECK(std::isfinite(eager.values[i]));
  }

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  env.sync();
  MOEREG_CUDA_REQUIRE(cudaStreamBeginCapture(env.stream, cudaStreamCaptureModeGlobal));
  s.enqueue(env, bytes);
  MOEREG_CUDA_REQUIRE(cudaStreamEndCapture(env.stream, &graph));
  MOEREG_CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
  for (int rep = 0; rep < 3; ++rep) {
    s.scramble_outputs(env);
    MOEREG_CUDA_REQUIRE(cudaGraphLaunch(exec, env.stream));
    const auto replay = s.take(env);
    INFO("replay " << rep);
    CHECK(same(replay, eager));
  }

  // New routing probabilities in place: the graph reads the buffers' current contents.
  moereg_test::rng r(999);
  s.router.P = from_double<float>(moereg_test::random_probs(r, step_data::T, step_data::E));
  s.router.dP.upload(s.router.P);
  s.scramble_outputs(env);
  s.enqueue(env, bytes);
  const auto eager2 = s.take(env);
  s.scramble_outputs(env);
  MOEREG_CUDA_REQUIRE(cudaGraphLaunch(exec, env.stream));
  const auto replay2 = s.take(env);
  CHECK(same(replay2, eager2));
  CHECK_FALSE(same_bits(eager2.values[0], eager.values[0]));

  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}
