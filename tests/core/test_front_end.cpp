// The one front end (losses/api.hpp) and the one validation layer (core/validate.hpp):
// - a loss is still an aggregate of its configuration;
// - workspace_size is 0 on the CPU, as a free function and as a member, for every loss;
// - validate_shapes() reads no content (what a device backend runs on the host before a
//   launch), validate_on_host() adds the content checks: a bad top-k id, bad cu_seqlens,
//   negative reduced counts and a bad layout map pass the first and are refused by the second;
// - for_each_buffer() names every pointer of a call (the CUDA pointer checks rely on it);
// - template arguments are deduced: inputs{view(x), ...} and softmax_backward(view(P), ...).
#include <catch2/catch.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <moereg/moereg.hpp>

namespace {

using moereg::index_t;

template <class F>
bool throws_moereg(F&& f) {
  try {
    f();
  } catch (const moereg::error&) {
    return true;
  }
  return false;
}

template <class In, class G>
std::map<std::string, const void*> buffers_of(const In& in, const G* grad) {
  std::map<std::string, const void*> m;
  for_each_buffer(in, grad, [&](const char* name, const void* p) { m[name] = p; });
  return m;
}

}  // namespace

TEST_CASE("a loss is an aggregate of its configuration", "[front_end]") {
  moereg::entropy_config c;
  c.coef = 0.25;
  const moereg::entropy_loss a{c};
  CHECK(a.cfg.coef == 0.25);
  const moereg::load_balancing_loss b{{0.5, moereg::lb_scope::global, 0, 2}};
  CHECK(b.cfg.coef == 0.5);
  CHECK(b.cfg.k == 2);
  CHECK(b.cfg.scope == moereg::lb_scope::global);
  const moereg::z_loss d{};
  CHECK(d.cfg.coef == moereg::z_loss_config{}.coef);
  CHECK(std::string(moereg::coupling_loss::name) == "coupling_loss");
}

TEST_CASE("workspace_size is 0 on the CPU for every loss", "[front_end]") {
  const index_t T = 3, E = 4, k = 2, d = 5;
  std::vector<float> P(static_cast<std::size_t>(T * E), 0.25f), h(static_cast<std::size_t>(T * k * d), 1.0f);
  std::vector<std::int32_t> I = {0, 1, 2, 3, 1, 0};
  const moereg::routing_view<float> pv(P.data(), T, E);
  const moereg::topk_view tv(I.data(), T, k);
  const auto acts = moereg::token_major_view<const float>(h.data(), T, k, d);
  const moereg::routing_view<float> layers_p[2] = {pv, pv};
  const moereg::topk_view layers_t[2] = {tv, tv};
  const moereg::cpu be{};
  const moereg::load_balancing_inputs<float> lb_in{pv, tv};
  const moereg::specialization_inputs<float, moereg::token_major> sp_in{acts, tv};
  const moereg::coupling_inputs<float> cp_in{layers_p, layers_t, 2};
  CHECK(workspace_size(moereg::load_balancing_loss{}, lb_in, be) == 0);
  CHECK(moereg::load_balancing_loss{}.workspace_size(lb_in) == 0);
  CHECK(moereg::z_loss{}.workspace_size(moereg::z_loss_inputs<float>{pv}) == 0);
  CHECK(moereg::entropy_loss{}.workspace_size(moereg::entropy_inputs<float>{pv}, be) == 0);
  CHECK(moereg::importance_loss{}.workspace_size(moereg::importance_inputs<float>{pv}) == 0);
  CHECK(moereg::variance_loss{}.workspace_size(moereg::variance_inputs<float>{pv}) == 0);
  CHECK(moereg::specialization_loss{}.workspace_size(sp_in) == 0);
  CHECK(moereg::orthogonality_loss{}.workspace_size(
            moereg::orthogonality_inputs<float, moereg::token_major>{acts, tv}) == 0);
  CHECK(moereg::coupling_loss{}.workspace_size(cp_in) == 0);
  static_assert(moereg::workspace_size(moereg::z_loss{}, moereg::z_loss_inputs<float>{}, moereg::cpu{}) == 0,
                "the CPU answer is a constant expression");
}

TEST_CASE("shape checks read no content; the host checks add the content", "[front_end][validate]") {
  const index_t T = 4, E = 3, k = 2;
  std::vector<double> P(static_cast<std::size_t>(T * E), 1.0 / 3.0);
  const moereg::routing_view<double> pv(P.data(), T, E);

  SECTION("top-k ids") {
    std::vector<std::int32_t> I = {0, 1, 2, 0, 1, 7, 2, 1};  // 7 >= E
    const moereg::load_balancing_inputs<double> in{pv, moereg::topk_view(I.data(), T, k)};
    const moereg::load_balancing_loss loss{};
    const moereg::matrix_view<double>* none = nullptr;
    CHECK_FALSE(throws_moereg([&] { validate_shapes("lb", loss, in, {}, none); }));
    CHECK(throws_moereg([&] { validate_on_host("lb", loss, in, {}, none); }));
    I[5] = 0;  // row 2 = {1, 0}: valid again
    CHECK_FALSE(throws_moereg([&] { validate_on_host("lb", loss, in, {}, none); }));
    I[5] = 1;  // row 2 selects expert 1 twice
    CHECK_FALSE(throws_moereg([&] { validate_shapes("lb", loss, in, {}, none); }));
    CHECK(throws_moereg([&] { validate_on_host("lb", loss, in, {}, none); }));
  }
  SECTION("sequence offsets") {
    std::vector<std::int32_t> I = {0, 1, 2, 0, 1, 2, 2, 1};
    std::vector<std::int32_t> cu = {0, 3, 2, 4};  // not increasing
    moereg::load_balancing_loss loss{};
    loss.cfg.scope = moereg::lb_scope::sequence;
    const moereg::load_balancing_inputs<double> in{
        pv, moereg::topk_view(I.data(), T, k), {}, moereg::offsets_view(cu.data(), 4)};
    const moereg::matrix_view<double>* none = nullptr;
    CHECK_FALSE(throws_moereg([&] { validate_shapes("lb", loss, in, {}, none); }));
    CHECK(throws_moereg([&] { validate_on_host("lb", loss, in, {}, none); }));
    cu[1] = 1;
    CHECK_FALSE(throws_moereg([&] { validate_on_host("lb", loss, in, {}, none); }));
  }
  SECTION("reduced statistics: the size is a shape, a negative count is content") {
    const moereg::z_loss loss{};
    const moereg::z_loss_inputs<double> in{pv};
    const moereg::matrix_view<double>* none = nullptr;
    const double negative = -1.0, two[2] = {1.0, 1.0};
    CHECK_FALSE(throws_moereg([&] { validate_shapes("z", loss, in, {&negative, 1}, none); }));
    CHECK(throws_moereg([&] { validate_on_host("z", loss, in, {&negative, 1}, none); }));
    CHECK(throws_moereg([&] { validate_shapes("z", loss, in, {two, 2}, none); }));
    // Importance's statistics are sums of P, not counts: a negative entry is allowed.
    const double imp_stats[3] = {-1.0, 2.0, 1.0};
    CHECK_FALSE(throws_moereg([&] {
      validate_on_host("importance", moereg::importance_loss{}, moereg::importance_inputs<double>{pv}, {imp_stats, 3},
                       none);
    }));
  }
  SECTION("layout maps") {
    std::vector<std::int32_t> I = {0, 1, 2, 0, 1, 2, 2, 1};
    std::vector<std::int32_t> rows = {0, 1, 2, 3, 4, 5, 6, 6};  // row 6 used twice
    std::vector<double> h(static_cast<std::size_t>(8 * 5), 0.5);
    const moereg::topk_view tv(I.data(), T, k);
    const moereg::expert_grouped layout(moereg::topk_view(rows.data(), T, k), 8, 5);
    CHECK_FALSE(throws_moereg([&] { layout.validate_shape("layout"); }));
    CHECK(throws_moereg([&] { layout.validate("layout"); }));
    const moereg::specialization_inputs<double, moereg::expert_grouped> in{{h.data(), layout}, tv};
    const moereg::activation_view<double, moereg::expert_grouped>* none = nullptr;
    CHECK_FALSE(throws_moereg([&] { validate_shapes("sp", moereg::specialization_loss{}, in, {}, none); }));
    CHECK(throws_moereg([&] { validate_on_host("sp", moereg::specialization_loss{}, in, {}, none); }));
    rows[7] = 7;
    CHECK_FALSE(throws_moereg([&] { validate_on_host("sp", moereg::specialization_loss{}, in, {}, none); }));
  }
}

TEST_CASE("for_each_buffer names every pointer of a call", "[front_end][validate]") {
  const index_t T = 2, E = 3, k = 1;
  std::vector<float> P(static_cast<std::size_t>(T * E), 0.5f), G(P.size());
  std::vector<std::int32_t> I = {0, 2}, cu = {0, 2};
  std::vector<std::uint8_t> mask = {1, 0};
  moereg::load_balancing_inputs<float> in{moereg::routing_view<float>(P.data(), T, E),
                                          moereg::topk_view(I.data(), T, k), moereg::mask_view(mask.data(), T),
                                          moereg::offsets_view(cu.data(), 2)};
  const moereg::matrix_view<float> g(G.data(), T, E);
  const auto with_grad = buffers_of(in, &g);
  CHECK(with_grad.size() == 5);
  CHECK(with_grad.at("probs") == P.data());
  CHECK(with_grad.at("topk") == I.data());
  CHECK(with_grad.at("mask") == mask.data());
  CHECK(with_grad.at("cu_seqlens") == cu.data());
  CHECK(with_grad.at("grad_probs") == G.data());
  CHECK(buffers_of(in, static_cast<const moereg::matrix_view<float>*>(nullptr)).count("grad_probs") == 0);

  const moereg::routing_view<float> layers_p[2] = {in.probs, in.probs};
  const moereg::topk_view layers_t[2] = {in.topk, in.topk};
  const moereg::matrix_view<float> grads[2] = {g, g};
  const auto cp = buffers_of(moereg::coupling_inputs<float>{layers_p, layers_t, 2}, grads);
  CHECK(cp.size() == 7);  // probs[l], topk[l], grads[l] for 2 layers, and the mask
  CHECK(cp.at("grads[1]") == G.data());
  CHECK(cp.at("topk[0]") == I.data());
}

TEST_CASE("template arguments are deduced from the views", "[front_end]") {
  Eigen::MatrixXd P = Eigen::MatrixXd::Constant(3, 4, 0.25), dP = Eigen::MatrixXd::Random(3, 4);
  Eigen::MatrixXd dZ(3, 4), dZ_explicit(3, 4);
  std::vector<std::int32_t> I = {0, 1, 2, 3, 1, 0};
  const moereg::topk_view tv(I.data(), 3, 2);
  // Inputs: no <T>, from a mutable or a read-only view alike.
  const moereg::z_loss_inputs z_in{moereg::view(P)};
  static_assert(std::is_same<std::remove_const_t<decltype(z_in)>, moereg::z_loss_inputs<double>>::value, "");
  const moereg::entropy_inputs ent_in{moereg::view(static_cast<const Eigen::MatrixXd&>(P))};
  static_assert(std::is_same<std::remove_const_t<decltype(ent_in)>, moereg::entropy_inputs<double>>::value, "");
  const moereg::load_balancing_inputs lb_in{moereg::view(P), tv};
  static_assert(std::is_same<std::remove_const_t<decltype(lb_in)>, moereg::load_balancing_inputs<double>>::value, "");
  std::vector<float> h(3 * 2 * 5, 0.5f);
  const moereg::specialization_inputs sp_in{moereg::token_major_view(h.data(), 3, 2, 5), tv};
  static_assert(std::is_same<std::remove_const_t<decltype(sp_in)>,
                             moereg::specialization_inputs<float, moereg::token_major>>::value,
                "");
  const moereg::routing_view<double> layers_p[2] = {moereg::view(P), moereg::view(P)};
  const moereg::topk_view layers_t[2] = {tv, tv};
  const moereg::coupling_inputs cp_in{layers_p, layers_t, 2};
  static_assert(std::is_same<std::remove_const_t<decltype(cp_in)>, moereg::coupling_inputs<double>>::value, "");
  CHECK(moereg::z_loss{}.value(z_in) == moereg::z_loss{}.value(moereg::z_loss_inputs<double>{moereg::view(P)}));
  CHECK(moereg::load_balancing_loss{}.value(lb_in) > 0);
  // softmax_backward / sigmoid_norm_backward: T from the output view, the inputs convert.
  moereg::softmax_backward(moereg::view(P), moereg::view(dP), moereg::view(dZ));
  moereg::softmax_backward<double>(moereg::view(P), moereg::view(dP), moereg::view(dZ_explicit));
  CHECK(dZ == dZ_explicit);
  moereg::sigmoid_norm_backward(moereg::view(P), moereg::view(dP), moereg::view(dZ));
  moereg::sigmoid_norm_backward<double>(moereg::view(P), moereg::view(dP), moereg::view(dZ_explicit));
  CHECK(dZ == dZ_explicit);
}

TEST_CASE("a call context gives the positional call, for values, gradients and layers", "[front_end][context]") {
  const index_t T = 300, E = 6, k = 2, d = 7, cut = 120;
  std::vector<double> P(static_cast<std::size_t>(T * E)), h(static_cast<std::size_t>(T * k * d));
  std::vector<std::int32_t> I(static_cast<std::size_t>(T * k));
  std::vector<std::uint8_t> m(static_cast<std::size_t>(T));
  for (index_t t = 0; t < T; ++t) {
    m[static_cast<std::size_t>(t)] = t % 7 != 3;
    for (index_t e = 0; e < E; ++e)
      P[static_cast<std::size_t>(t * E + e)] = 1.0 / 6 + 0.01 * static_cast<double>((t * 5 + e * 3) % 11);
    for (index_t s = 0; s < k; ++s)
      I[static_cast<std::size_t>(t * k + s)] = t % 13 == 5 && s == 1 ? -1 : static_cast<std::int32_t>((t + 2 * s) % E);
  }
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = std::sin(0.37 * static_cast<double>(i));
  const moereg::mask_view mask(m.data(), T);
  const moereg::topk_view topk(I.data(), T, k);
  const moereg::load_balancing_loss lb{{0.3}};
  const moereg::load_balancing_inputs<double> in{{P.data(), cut, E}, {I.data(), cut, k}, {m.data(), cut}};
  const auto red = lb.local_stats(moereg::load_balancing_inputs<double>{{P.data(), T, E}, topk, mask});
  const moereg::stats_view rv{red.data(), static_cast<index_t>(red.size())};
  const moereg::grad_options opts{0.75, true};
  // value: reduced statistics and the backend by name.
  CHECK(lb.value(in, moereg::on(moereg::cpu{2}).with_reduced(rv)) == lb.value(in, rv, moereg::cpu{2}));
  CHECK(lb.value(in, moereg::on(moereg::cpu{})) == lb.value(in));
  // value_and_grad and backward: options too (accumulate into the same prefill, same bits).
  std::vector<double> g1(static_cast<std::size_t>(cut * E), 0.5), g2 = g1, g3 = g1, g4 = g1;
  const double v1 = lb.value_and_grad(in, moereg::matrix_view<double>(g1.data(), cut, E), opts, rv, moereg::cpu{3});
  const double v2 = lb.value_and_grad(in, moereg::matrix_view<double>(g2.data(), cut, E),
                                      moereg::on(moereg::cpu{3}).with_reduced(rv).with_grad_scale(0.75).accumulating());
  CHECK(v1 == v2);
  CHECK(g1 == g2);
  CHECK(g1 != std::vector<double>(g1.size(), 0.5));
  lb.backward(in, moereg::matrix_view<double>(g3.data(), cut, E), opts, rv);
  lb.backward(in, moereg::matrix_view<double>(g4.data(), cut, E),
              moereg::on(moereg::cpu{}).with_opts(opts).with_reduced(rv));
  CHECK(g3 == g4);
  CHECK(g3 == g1);
  // A Gram loss and the coupling loss (a gradient view per layer) take it as well.
  const moereg::specialization_loss sp{};
  const moereg::specialization_inputs sin{moereg::token_major_view<const double>(h.data(), T, k, d), topk, mask};
  std::vector<double> a(h.size()), b(h.size());
  CHECK(sp.value_and_grad(sin, moereg::token_major_view<double>(a.data(), T, k, d), {2.0, false}) ==
        sp.value_and_grad(sin, moereg::token_major_view<double>(b.data(), T, k, d),
                          moereg::on(moereg::cpu{}).with_grad_scale(2.0)));
  CHECK(a == b);
  const moereg::routing_view<double> probs[2] = {{P.data(), T / 2, E}, {P.data() + T / 2 * E, T / 2, E}};
  const moereg::topk_view tks[2] = {{I.data(), T / 2, k}, {I.data() + T / 2 * k, T / 2, k}};
  const moereg::coupling_inputs<double> cin{probs, tks, 2};
  std::vector<double> c1(static_cast<std::size_t>(T * E)), c2(c1.size());
  const moereg::matrix_view<double> g_pos[2] = {{c1.data(), T / 2, E}, {c1.data() + T / 2 * E, T / 2, E}};
  const moereg::matrix_view<double> g_ctx[2] = {{c2.data(), T / 2, E}, {c2.data() + T / 2 * E, T / 2, E}};
  const moereg::coupling_loss cp{};
  CHECK(cp.value_and_grad(cin, g_pos, {}, {}, moereg::cpu{2}) ==
        cp.value_and_grad(cin, g_ctx, moereg::on(moereg::cpu{2})));
  CHECK(c1 == c2);
  // An explicit value output (on CUDA the device pointer that replaces be.value): on the CPU
  // the value is stored there and returned; nothing is stored when the call throws.
  double out = -1, out2 = -1;
  CHECK(lb.value(in, moereg::on(moereg::cpu{}).with_reduced(rv).value_into(&out)) == lb.value(in, rv));
  CHECK(out == lb.value(in, rv));
  std::vector<double> g5(static_cast<std::size_t>(cut * E));
  const double v5 = lb.value_and_grad(in, moereg::matrix_view<double>(g5.data(), cut, E),
                                      moereg::on(moereg::cpu{}).value_into(&out2));
  CHECK(out2 == v5);
  CHECK(v5 != out);
  std::vector<float> g6(g5.size());
  out2 = -1;
  lb.backward(in, moereg::matrix_view<float>(g6.data(), cut, E),
              moereg::on(moereg::cpu{}).value_into(&out2));  // mixed precision
  CHECK(out2 == v5);
  // The checks are the same: a bad reduced statistics size is refused either way.
  const moereg::stats_view short_red{red.data(), 1};
  out = -1;
  CHECK(throws_moereg([&] { (void)lb.value(in, moereg::on(moereg::cpu{}).with_reduced(short_red).value_into(&out)); }));
  CHECK(out == -1);
  CHECK(throws_moereg([&] { (void)lb.value(in, moereg::on(moereg::cpu{}).with_reduced(short_red)); }));
  CHECK(throws_moereg([&] { (void)lb.value(in, short_red); }));
}
