// Bitwise independence of the buffers' addresses: the same values at 16 different alignments
// (shifted by 0 to 15 elements, which covers every position within a 64-byte line for float
// and double) give bitwise the same value and gradient, for every loss whose CPU kernels use
// vector instructions. A kernel whose summation order followed the address (peeling to an
// aligned boundary, for instance) would make a trainer's results depend on its allocator.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

#include <moereg/moereg.hpp>

#include "support/grad_buffers.hpp"
#include "support/random.hpp"

namespace {

using moereg::index_t;

template <class T>
struct run_out {
  std::vector<double> values;
  std::vector<T> grads;  // every gradient, concatenated
};

template <class T>
run_out<T> run_all(int off, const std::vector<T>& P0, const std::vector<T>& H0, const std::vector<std::int32_t>& I,
                   const std::vector<std::uint8_t>& mask, index_t T_, index_t E, index_t k, index_t d) {
  const std::size_t pad = 16;
  std::vector<T> Pbuf(P0.size() + pad), Hbuf(H0.size() + pad), GP(P0.size() + pad), GP2(P0.size() + pad),
      GH(H0.size() + pad);
  T* P = Pbuf.data() + off;
  T* H = Hbuf.data() + off;
  std::copy(P0.begin(), P0.end(), P);
  std::copy(H0.begin(), H0.end(), H);
  const moereg::matrix_view<const T> pv(P, T_, E);
  const moereg::matrix_view<T> gv(GP.data() + off, T_, E), gv2(GP2.data() + off, T_, E);
  const moereg::topk_view tv(I.data(), T_, k);
  const moereg::mask_view m(mask.data(), T_);
  const moereg::token_major L(T_, k, d);
  const moereg::activation_view<const T, moereg::token_major> hv{H, L};
  const moereg::activation_view<T, moereg::token_major> ghv{GH.data() + off, L};
  run_out<T> r;
  // Every gradient buffer holds the NaN sentinel before each overwrite-mode call, so an entry
  // a loss does not write cannot inherit the previous loss's value (support/grad_buffers.hpp).
  auto fresh = [&] {
    moereg_test::fill_sentinel(GP);
    moereg_test::fill_sentinel(GP2);
    moereg_test::fill_sentinel(GH);
  };
  auto written = [](const T* p, std::size_t n) { return moereg_test::count_nan(std::vector<T>(p, p + n)) == 0; };
  auto keep_p = [&] {
    CHECK(written(gv.data, P0.size()));
    r.grads.insert(r.grads.end(), gv.data, gv.data + P0.size());
  };
  auto keep_h = [&] {
    CHECK(written(ghv.data, H0.size()));
    r.grads.insert(r.grads.end(), ghv.data, ghv.data + H0.size());
  };
  fresh();
  r.values.push_back(moereg::z_loss{}.value_and_grad(moereg::z_loss_inputs<T>{pv, m}, gv));
  keep_p();
  fresh();
  r.values.push_back(moereg::entropy_loss{}.value_and_grad(moereg::entropy_inputs<T>{pv, m}, gv));
  keep_p();
  fresh();
  r.values.push_back(moereg::load_balancing_loss{}.value_and_grad(moereg::load_balancing_inputs<T>{pv, tv, m}, gv));
  keep_p();
  fresh();
  r.values.push_back(moereg::variance_loss{}.value_and_grad(moereg::variance_inputs<T>{pv, m}, gv));
  keep_p();
  fresh();
  r.values.push_back(moereg::importance_loss{}.value_and_grad(moereg::importance_inputs<T>{pv, m}, gv));
  keep_p();
  fresh();
  r.values.push_back(moereg::specialization_loss{}.value_and_grad(
      moereg::specialization_inputs<T, moereg::token_major>{hv, tv, m}, ghv));
  keep_h();
  fresh();
  r.values.push_back(moereg::orthogonality_loss{}.value_and_grad(
      moereg::orthogonality_inputs<T, moereg::token_major>{hv, tv, m}, ghv));
  keep_h();
  for (auto form : {moereg::coupling_form::token, moereg::coupling_form::batch}) {
    moereg::coupling_loss cl;
    cl.cfg.form = form;
    const moereg::routing_view<T> ps[2] = {pv, pv};
    const moereg::topk_view ts[2] = {tv, tv};
    const moereg::matrix_view<T> gs[2] = {gv, gv2};
    moereg::coupling_inputs<T> ci;
    ci.probs = ps;
    ci.topk = ts;
    ci.layers = 2;
    ci.mask = m;
    fresh();
    r.values.push_back(cl.value_and_grad(ci, gs));
    keep_p();
    CHECK(written(gv2.data, P0.size()));
    r.grads.insert(r.grads.end(), gv2.data, gv2.data + P0.size());
  }
  return r;
}

template <class T>
void check_alignment_independence() {
  const index_t T_ = 301, E = 37, k = 4, d = 77;  // odd sizes: every kernel has a tail
  moereg_test::rng r(42);
  const auto P0 = moereg_test::cast<T>(moereg_test::random_probs(r, T_, E));
  const auto H0 = moereg_test::cast<T>(moereg_test::random_normal(r, static_cast<std::size_t>(T_ * k * d)));
  const auto I = moereg_test::random_topk<std::int32_t>(r, T_, E, k, 0.1);
  const auto mask = moereg_test::random_mask(r, T_);
  const run_out<T> ref = run_all<T>(0, P0, H0, I, mask, T_, E, k, d);
  for (int off = 1; off < 16; ++off) {
    INFO("buffers shifted by " << off << " elements");
    const run_out<T> got = run_all<T>(off, P0, H0, I, mask, T_, E, k, d);
    REQUIRE(got.values.size() == ref.values.size());
    for (std::size_t i = 0; i < ref.values.size(); ++i) {
      INFO("loss #" << i);
      CHECK(std::memcmp(&got.values[i], &ref.values[i], sizeof(double)) == 0);
    }
    CHECK(std::memcmp(got.grads.data(), ref.grads.data(), ref.grads.size() * sizeof(T)) == 0);
  }
}

}  // namespace

TEST_CASE("every loss gives bitwise the same result at every buffer alignment", "[alignment][determinism]") {
  check_alignment_independence<float>();
  check_alignment_independence<double>();
}
