// 64-bit sizes: views whose element offsets exceed 2^31. A 16 GiB anonymous, lazily
// committed mapping (MAP_NORESERVE) holds a few rows at huge strides; only the touched pages
// become memory. Every result must equal bitwise the one over a compact copy of the same data.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

#include <sys/mman.h>

#include <moereg/moereg.hpp>

#include "hardening/cases.hpp"
#include "support/grad_buffers.hpp"

namespace {

using moereg::index_t;
using namespace moereg_hardening;

constexpr index_t two31 = index_t(1) << 31;

// A 16 GiB PROT_READ | PROT_WRITE private anonymous mapping without swap reservation.
class sparse_region {
 public:
  static constexpr std::size_t bytes = std::size_t(16) << 30;
  sparse_region() {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    base_ = p == MAP_FAILED ? nullptr : static_cast<unsigned char*>(p);
  }
  ~sparse_region() {
    if (base_) munmap(base_, bytes);
  }
  sparse_region(const sparse_region&) = delete;
  sparse_region& operator=(const sparse_region&) = delete;
  template <class T>
  T* at(std::size_t byte_offset) const {
    return reinterpret_cast<T*>(base_ + byte_offset);
  }
  bool ok() const { return base_ != nullptr; }

 private:
  unsigned char* base_ = nullptr;
};

}  // namespace

TEST_CASE("router losses over rows more than 2^31 elements apart", "[hardening][sizes]") {
  sparse_region region;
  if (!region.ok()) {
    WARN("mmap of 16 GiB with MAP_NORESERVE failed here; the 64-bit offset test cannot run");
    return;
  }
  const auto c = make_case(21, 3, 7, 2, 1);
  const index_t T = c.T, E = c.E, k = c.k;
  const index_t rs = (index_t(1) << 30) + 3;  // floats between rows: row 2 starts past 2^31
  REQUIRE(2 * rs > two31);
  float* P = region.at<float>(0);
  float* Z = region.at<float>(64);
  float* G = region.at<float>(128);
  auto* I = region.at<std::int32_t>(192);   // int32 topk at the same byte stride as the rows
  auto* M = region.at<std::uint8_t>(1024);  // mask: one byte per token, 2^32 + 1 bytes apart
  const index_t mask_stride = (index_t(1) << 32) + 1;
  REQUIRE(static_cast<std::size_t>(2 * mask_stride + 1024) < sparse_region::bytes);
  std::vector<float> Pc = moereg_test::cast<float>(c.P), Zc = moereg_test::cast<float>(c.Z);
  std::vector<std::int32_t> Ic(c.I.begin(), c.I.end());
  std::vector<std::uint8_t> Mc = {1, 0, 1};
  for (index_t t = 0; t < T; ++t) {
    for (index_t e = 0; e < E; ++e)
      P[t * rs + e] = Pc[static_cast<std::size_t>(t * E + e)], Z[t * rs + e] = Zc[static_cast<std::size_t>(t * E + e)];
    for (index_t s = 0; s < k; ++s) I[t * rs + s] = Ic[static_cast<std::size_t>(t * k + s)];
    M[t * mask_stride] = Mc[static_cast<std::size_t>(t)];
  }
  const moereg::mask_view big_mask(M, T, mask_stride), small_mask(Mc.data(), T);
  std::vector<float> gc(static_cast<std::size_t>(T * E));

  SECTION("load balancing") {
    const moereg::load_balancing_loss loss{};
    const double vb = loss.value_and_grad(
        moereg::load_balancing_inputs<float>{{P, T, E, rs}, moereg::topk_view(I, T, k, rs), big_mask},
        moereg::matrix_view<float>(G, T, E, rs));
    const double vc = moereg_test::checked_matrix_into(
        gc, loss,
        moereg::load_balancing_inputs<float>{{Pc.data(), T, E}, moereg::topk_view(Ic.data(), T, k), small_mask}, T, E);
    CHECK(bitwise_equal(vb, vc));
    CHECK(vc != 0.0);
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) CHECK(G[t * rs + e] == gc[static_cast<std::size_t>(t * E + e)]);
  }
  SECTION("z-loss, row-major and column-major") {
    const moereg::z_loss loss{};
    const double vb = loss.value_and_grad(moereg::z_loss_inputs<float>{{Z, T, E, rs}, big_mask},
                                          moereg::matrix_view<float>(G, T, E, rs));
    const double vc =
        moereg_test::checked_matrix_into(gc, loss, moereg::z_loss_inputs<float>{{Zc.data(), T, E}, small_mask}, T, E);
    CHECK(bitwise_equal(vb, vc));
    CHECK(vc != 0.0);
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) CHECK(G[t * rs + e] == gc[static_cast<std::size_t>(t * E + e)]);
    // The same logits transposed: a column stride cs, so element (t, e) sits at t + e * cs.
    const index_t cs = (index_t(1) << 29) + 5;
    REQUIRE((E - 1) * cs > two31);
    float* Zt = region.at<float>(400000);
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) Zt[t + e * cs] = Zc[static_cast<std::size_t>(t * E + e)];
    std::vector<float> gt(gc.size());
    const double vt =
        moereg_test::checked_matrix_into(gt, loss, moereg::z_loss_inputs<float>{{Zt, T, E, 1, cs}, small_mask}, T, E);
    CHECK(bitwise_equal(vt, vc));
    CHECK(bitwise_equal(gt, gc));
  }
}

TEST_CASE("specialization over activation layouts with offsets beyond 2^31", "[hardening][sizes]") {
  sparse_region region;
  if (!region.ok()) {
    WARN("mmap of 16 GiB with MAP_NORESERVE failed here; the 64-bit offset test cannot run");
    return;
  }
  const auto c = make_case(22, 3, 6, 2, 19);
  const index_t T = c.T, k = c.k, d = c.d, E = c.E;
  const std::vector<float> Hc = moereg_test::cast<float>(c.H);
  const std::vector<std::int64_t> I = {3, 0, 5, 1, 2, 4};  // every slot valid
  const moereg::topk_view topk(I.data(), T, k);
  std::vector<float> gc(Hc.size());
  const moereg::specialization_loss loss{};
  const double vc = loss.value_and_grad(
      moereg::specialization_inputs<float, moereg::token_major>{
          moereg::token_major_view<const float>(Hc.data(), T, k, d), topk, {}, E},
      moereg::token_major_view<float>(gc.data(), T, k, d));
  REQUIRE(vc != 0.0);

  SECTION("token_major with a token stride above 2^30") {
    const index_t ts = (index_t(1) << 30) + 1000, ss = 24, es = 1;
    REQUIRE((T - 1) * ts > two31);
    const moereg::token_major lay(T, k, d, ts, ss, es);
    float* x = region.at<float>(0);
    float* g = region.at<float>(4096);
    for (index_t t = 0; t < T; ++t)
      for (index_t s = 0; s < k; ++s)
        for (index_t i = 0; i < d; ++i) x[lay.offset(t, s) + i] = Hc[static_cast<std::size_t>((t * k + s) * d + i)];
    const double vb =
        loss.value_and_grad(moereg::specialization_inputs<float, moereg::token_major>{{x, lay}, topk, {}, E},
                            moereg::activation_view<float, moereg::token_major>{g, lay});
    CHECK(bitwise_equal(vb, vc));
    for (index_t t = 0; t < T; ++t)
      for (index_t s = 0; s < k; ++s)
        for (index_t i = 0; i < d; ++i)
          CHECK(g[lay.offset(t, s) + i] == gc[static_cast<std::size_t>((t * k + s) * d + i)]);
  }
  SECTION("expert_grouped with a row stride above 2^29 and an element stride of 2") {
    const std::vector<std::int64_t> rows = {5, 0, 3, 1, 4, 2};  // row 5 lies past 2^31 elements
    const index_t rs = (index_t(1) << 29) + 33;
    REQUIRE(5 * rs > two31);
    const moereg::expert_grouped lay(moereg::topk_view(rows.data(), T, k), 6, d, rs, 2);
    float* x = region.at<float>(0);
    float* g = region.at<float>(8192);
    for (index_t t = 0; t < T; ++t)
      for (index_t s = 0; s < k; ++s)
        for (index_t i = 0; i < d; ++i) x[lay.offset(t, s) + 2 * i] = Hc[static_cast<std::size_t>((t * k + s) * d + i)];
    const double vb =
        loss.value_and_grad(moereg::specialization_inputs<float, moereg::expert_grouped>{{x, lay}, topk, {}, E},
                            moereg::activation_view<float, moereg::expert_grouped>{g, lay});
    CHECK(bitwise_equal(vb, vc));
    for (index_t t = 0; t < T; ++t)
      for (index_t s = 0; s < k; ++s)
        for (index_t i = 0; i < d; ++i)
          CHECK(g[lay.offset(t, s) + 2 * i] == gc[static_cast<std::size_t>((t * k + s) * d + i)]);
  }
  SECTION("capacity_padded with an expert stride above 2^29") {
    // expert = the topk id, position = token; E = 6 experts of capacity T.
    std::vector<std::int64_t> pos(static_cast<std::size_t>(T * k));
    for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<std::int64_t>(i / static_cast<std::size_t>(k));
    moereg::capacity_padded lay(topk, moereg::topk_view(pos.data(), T, k), E, T, d);
    lay.expert_stride = (index_t(1) << 29) + 77;
    lay.row_stride = 32;
    REQUIRE((E - 1) * lay.expert_stride > two31);
    REQUIRE(static_cast<std::size_t>((E - 1) * lay.expert_stride + 4096) * sizeof(float) < sparse_region::bytes);
    float* x = region.at<float>(0);
    float* g = region.at<float>(4096);
    for (index_t t = 0; t < T; ++t)
      for (index_t s = 0; s < k; ++s)
        for (index_t i = 0; i < d; ++i) x[lay.offset(t, s) + i] = Hc[static_cast<std::size_t>((t * k + s) * d + i)];
    const double vb =
        loss.value_and_grad(moereg::specialization_inputs<float, moereg::capacity_padded>{{x, lay}, topk, {}, E},
                            moereg::activation_view<float, moereg::capacity_padded>{g, lay});
    CHECK(bitwise_equal(vb, vc));
    for (index_t t = 0; t < T; ++t)
      for (index_t s = 0; s < k; ++s)
        for (index_t i = 0; i < d; ++i)
          CHECK(g[lay.offset(t, s) + i] == gc[static_cast<std::size_t>((t * k + s) * d + i)]);
  }
}
