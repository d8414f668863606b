// Views, layouts, the error type, the fixed-order reduction.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <moereg/backend/cpu.hpp>
#include <moereg/core/error.hpp>
#include <moereg/core/layouts.hpp>
#include <moereg/core/views.hpp>
#include <moereg/math/reduce.hpp>

using moereg::index_t;

static_assert(std::is_base_of_v<std::invalid_argument, moereg::error>, "moereg::error is an invalid_argument");
static_assert(std::is_same_v<moereg::index_t, std::int64_t>, "offsets are 64-bit");
static_assert(std::is_same_v<moereg::accumulator_t<moereg::bfloat16>, float>);
static_assert(std::is_same_v<moereg::accumulator_t<double>, double>);

TEST_CASE("matrix views from raw pointers and Eigen expressions", "[views]") {
  Eigen::Matrix<float, 3, 4, Eigen::RowMajor> R;
  Eigen::Matrix<float, 3, 4> C;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) R(i, j) = C(i, j) = static_cast<float>(10 * i + j);
  const auto vr = moereg::view(R);
  const auto vc = moereg::view(C);
  const auto vb = moereg::view(C.block(1, 1, 2, 3));
  Eigen::Map<const Eigen::MatrixXf> cmap(C.data(), 3, 4);
  const auto vm = moereg::view(cmap);
  static_assert(std::is_same_v<decltype(vm), const moereg::matrix_view<const float>>);
  static_assert(std::is_same_v<decltype(vr), const moereg::matrix_view<float>>);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) {
      CHECK(vr(i, j) == R(i, j));
      CHECK(vc(i, j) == C(i, j));
      CHECK(vm(i, j) == C(i, j));
    }
  CHECK(vb.rows == 2);
  CHECK(vb(1, 2) == C(2, 3));
  const moereg::routing_view<float> cv = vr;  // mutable converts to const
  CHECK(cv(2, 3) == 23.0f);
  const float raw[6] = {0, 1, 2, 3, 4, 5};
  const moereg::routing_view<float> strided(raw, 2, 2, 3);  // row stride 3
  CHECK(strided(1, 1) == 4.0f);
}

TEST_CASE("index views read int32 and int64, masks read every dtype", "[views]") {
  const std::int32_t a[4] = {3, -1, 0, 2};
  const std::int64_t b[4] = {3, -1, 0, 2};
  const moereg::topk_view ia(a, 2, 2), ib(b, 2, 2);
  for (int t = 0; t < 2; ++t)
    for (int s = 0; s < 2; ++s) CHECK(ia(t, s) == ib(t, s));
  const std::uint8_t mu[3] = {1, 0, 7};
  const bool mb[3] = {true, false, true};
  const std::int32_t m32[3] = {-1, 0, 1};
  const std::int64_t m64[3] = {5, 0, 1};
  for (const auto& m :
       {moereg::mask_view(mu, 3), moereg::mask_view(mb, 3), moereg::mask_view(m32, 3), moereg::mask_view(m64, 3)}) {
    CHECK(m(0));
    CHECK(!m(1));
    CHECK(m(2));
  }
  CHECK(moereg::mask_view{}(12345));
}

TEST_CASE("layout policies place vectors and validate their maps", "[layouts]") {
  const moereg::token_major tm(3, 2, 5);
  CHECK(tm.offset(2, 1) == (2 * 2 + 1) * 5);
  const moereg::token_major strided(3, 2, 5, 100, 20, 2);
  CHECK(strided.offset(2, 1) == 220);
  CHECK(strided.stride() == 2);

  const std::int32_t rows[6] = {4, 0, -1, 2, 1, 3};
  const moereg::expert_grouped eg(moereg::topk_view(rows, 3, 2), 5, 8);
  CHECK(eg.offset(0, 0) == 32);
  CHECK(eg.offset(1, 0) < 0);
  CHECK_NOTHROW(eg.validate("test"));
  const std::int32_t dup[6] = {4, 0, -1, 0, 1, 3};
  CHECK_THROWS_WITH(moereg::expert_grouped(moereg::topk_view(dup, 3, 2), 5, 8).validate("test"),
                    Catch::Contains("already used"));
  const std::int32_t oob[6] = {4, 0, -1, 5, 1, 3};
  CHECK_THROWS_WITH(moereg::expert_grouped(moereg::topk_view(oob, 3, 2), 5, 8).validate("test"),
                    Catch::Contains("out of range"));

  const std::int64_t ex[4] = {1, 0, 1, -1};
  const std::int64_t pos[4] = {0, 0, 1, 0};
  const moereg::capacity_padded cp(moereg::topk_view(ex, 2, 2), moereg::topk_view(pos, 2, 2), 2, 3, 4);
  CHECK(cp.offset(0, 0) == 12);
  CHECK(cp.offset(1, 0) == 16);
  CHECK(cp.offset(1, 1) < 0);
  CHECK_NOTHROW(cp.validate("test"));
  const std::int64_t pos_bad[4] = {0, 0, 3, 0};
  CHECK_THROWS_WITH(
      moereg::capacity_padded(moereg::topk_view(ex, 2, 2), moereg::topk_view(pos_bad, 2, 2), 2, 3, 4).validate("test"),
      Catch::Contains("position at (1, 0) is 3"));
  const std::int64_t pos_dup[4] = {1, 0, 1, 0};
  CHECK_THROWS_WITH(
      moereg::capacity_padded(moereg::topk_view(ex, 2, 2), moereg::topk_view(pos_dup, 2, 2), 2, 3, 4).validate("test"),
      Catch::Contains("already used"));

  // The layouts' own index maps get the shape checks of a top-k view before any entry is read
  // (found by fuzz_views: a position map whose rows overlapped or ran backwards was read
  // outside its buffer while the layout was being validated).
  moereg::topk_view overlapping(pos, 2, 2);
  overlapping.row_stride = 1;  // rows overlap
  CHECK_THROWS_WITH(moereg::capacity_padded(moereg::topk_view(ex, 2, 2), overlapping, 2, 3, 4).validate("test"),
                    Catch::Contains("position map row stride 1 is smaller than k = 2"));
  moereg::topk_view backwards(ex, 2, 2);
  backwards.row_stride = -2;
  CHECK_THROWS_WITH(moereg::capacity_padded(backwards, moereg::topk_view(pos, 2, 2), 2, 3, 4).validate("test"),
                    Catch::Contains("expert map row stride -2"));
  moereg::topk_view rows_back(rows, 3, 2);
  rows_back.row_stride = -1;
  CHECK_THROWS_WITH(moereg::expert_grouped(rows_back, 5, 8).validate("test"), Catch::Contains("row map row stride -1"));
  moereg::topk_view null_map(static_cast<const std::int32_t*>(nullptr), 3, 2);
  CHECK_THROWS_WITH(moereg::expert_grouped(null_map, 5, 8).validate("test"), Catch::Contains("row map is null"));
}

TEST_CASE("offsets beyond 2^31 elements are formed in 64 bits", "[layouts][sizes]") {
  // A token-major view with a huge token stride: only the arithmetic is exercised.
  const moereg::token_major big(4, 2, 8, index_t(1) << 31, 8);
  CHECK(big.offset(3, 1) == 3 * (index_t(1) << 31) + 8);
  const std::int64_t rows[2] = {(index_t(1) << 28) + 1, 0};
  const moereg::expert_grouped eg(moereg::topk_view(rows, 1, 2), index_t(1) << 29, 16);
  CHECK(eg.offset(0, 0) == ((index_t(1) << 28) + 1) * 16);
}

TEST_CASE("pairwise sums are fixed-order and accurate", "[reduce]") {
  std::vector<float> v(100000, 0.1f);
  const float s = moereg::detail::pairwise_sum(v.data(), static_cast<index_t>(v.size()));
  CHECK(s == Approx(10000.0).epsilon(1e-5));  // a naive float loop is off by ~1e-3 relative here
  std::vector<double> blocks{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  double out = 0;
  moereg::detail::combine_blocks(blocks, 11, 1, &out);
  CHECK(out == 66.0);
}

TEST_CASE("parallel_blocks visits every row exactly once for any thread count", "[backend]") {
  for (int threads : {1, 2, 3}) {
    std::vector<int> hits(1031, 0);
    moereg::detail::parallel_blocks(moereg::cpu{threads}, 1031, 100, [&](index_t, index_t a, index_t b) {
      for (index_t i = a; i < b; ++i) ++hits[static_cast<std::size_t>(i)];
    });
    for (int h : hits) CHECK(h == 1);
  }
}
