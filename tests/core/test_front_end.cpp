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
    const moereg::load_balancing_inputs<double> in{pv, moereg::topk_view(I.data(), T, k), {},
                                                   moereg::offsets_view(cu.data(), 4)};
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
      validate_on_host("importance", moereg::importance_loss{}, moereg::importance_inputs<double>{pv},
                       {imp_stats, 3}, none);
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
  moereg::load_balancing_inputs<float> in{moereg::routing_view<float>(P.data(), T, E), moereg::topk_view(I.data(), T, k),
                                          moereg::mask_view(mask.data(), T), moereg::offsets_view(cu.data(), 2)};
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
  static_assert(std::is_same<std::remove_const_t<decltype(lb_in)>, moereg::load_balancing_inputs<double>>::value,
                "");
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
