// Views and layouts refuse overlapping storage (issue: silent wrong answers from strides).
// Before: a gradient matrix with row stride 0 wrote every row into row 0, an input with row
// stride 4 and 8 columns was read as overlapping rows (z-loss 0.009939 instead of 0.01), an
// expert_grouped gradient with row stride 3 and d = 6 wrote overlapping rows, and an
// expert_grouped view built from a column-major Eigen matrix's data() was read as row-major
// (specialization 0.348 instead of 0.391). Now the overlapping views throw moereg::error and
// grouped_view() takes an Eigen matrix's real strides.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <moereg/backend/cpu.hpp>
#include <moereg/losses/specialization.hpp>
#include <moereg/losses/z_loss.hpp>

#include "support/random.hpp"

namespace {

using moereg::index_t;

bool unique(std::vector<index_t> ext, std::vector<index_t> str) {
  return moereg::detail::strides_unique(static_cast<int>(ext.size()), ext.data(), str.data());
}

}  // namespace

TEST_CASE("strides_unique: the overlap test against the extents", "[views][unique]") {
  CHECK(unique({3, 4}, {4, 1}));        // contiguous rows
  CHECK(unique({3, 4}, {1, 3}));        // column-major
  CHECK(unique({2, 3}, {1, 2}));        // interleaved rows: 0 2 4 / 1 3 5
  CHECK(unique({3, 4}, {9, 2}));        // padded rows with an element stride
  CHECK(unique({1, 4}, {0, 1}));        // one row: its stride does not matter
  CHECK(unique({0, 4}, {0, 0}));        // no elements
  CHECK_FALSE(unique({3, 4}, {0, 1}));  // every row on row 0
  CHECK_FALSE(unique({3, 8}, {4, 1}));  // rows overlap by half
  CHECK_FALSE(unique({3, 4}, {4, 0}));  // every column on column 0
  CHECK_FALSE(unique({2, 3}, {2, 1}));  // row 1 starts inside row 0
  CHECK(unique({5, 2, 6}, {12, 6, 1}));
  CHECK_FALSE(unique({5, 2, 6}, {12, 3, 1}));  // slots overlap
  CHECK_FALSE(unique({5, 2, 6}, {6, 6, 1}));   // token t's slot 1 is token t+1's slot 0
}

TEST_CASE("2-D views: overlapping rows are refused for inputs and gradients", "[views][unique]") {
  std::vector<float> Z(3 * 8, 0.5f), g(3 * 8, 7.0f);
  const moereg::z_loss zl{};
  // An input with row stride 4 and 8 columns.
  CHECK_THROWS_WITH(zl.value(moereg::z_loss_inputs<float>{moereg::routing_view<float>(Z.data(), 3, 8, 4)}),
                    Catch::Contains("logits [3, 8] with row stride 4 and column stride 1 has overlapping rows"));
  // A gradient with row stride 0.
  CHECK_THROWS_WITH(zl.backward(moereg::z_loss_inputs<float>{moereg::routing_view<float>(Z.data(), 3, 8)},
                                moereg::matrix_view<float>(g.data(), 3, 8, 0)),
                    Catch::Contains("with row stride 0 and column stride 1 has overlapping rows"));
  for (float x : g) CHECK(x == 7.0f);  // nothing written
  // A column-major view (Eigen's default) is unique and gives the row-major answer.
  Eigen::MatrixXf Zc(3, 8);
  for (int t = 0; t < 3; ++t)
    for (int e = 0; e < 8; ++e) Zc(t, e) = static_cast<float>(t - e) * 0.25f;
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Zr = Zc;
  CHECK(zl.value(moereg::z_loss_inputs<float>{moereg::view(Zc)}) ==
        zl.value(moereg::z_loss_inputs<float>{moereg::view(Zr)}));
}

TEST_CASE("activation layouts: overlapping storage is refused", "[layouts][unique]") {
  const index_t T = 4, k = 2, d = 6;
  std::vector<float> h(static_cast<std::size_t>(T * k * d), 1.0f), g(h.size(), 7.0f);
  std::vector<std::int64_t> ids{0, 1, 1, 2, 2, 3, 3, 0};
  const moereg::topk_view I(ids.data(), T, k);
  const moereg::specialization_loss sp{};
  using tmaj = moereg::token_major;
  // token_major: slot stride 0 and a token stride smaller than k * d.
  CHECK_THROWS_WITH(sp.value(moereg::specialization_inputs<float, tmaj>{{h.data(), tmaj(T, k, d, k * d, 0)}, I}),
                    Catch::Contains("token_major layout [4, 2, 6] with strides (12, 0, 1) overlaps"));
  CHECK_THROWS_WITH(sp.backward(moereg::specialization_inputs<float, tmaj>{{h.data(), tmaj(T, k, d)}, I},
                                {g.data(), tmaj(T, k, d, d, d)}),
                    Catch::Contains("strides (6, 6, 1) overlaps"));
  for (float x : g) CHECK(x == 7.0f);
  // expert_grouped rows of d = 6 with row stride 3.
  std::vector<std::int64_t> rows{0, 1, 2, 3, 4, 5, 6, 7};
  const moereg::topk_view map(rows.data(), T, k);
  using eg = moereg::expert_grouped;
  CHECK_THROWS_WITH(
      sp.backward(moereg::specialization_inputs<float, eg>{{h.data(), eg(map, 8, d)}, I}, {g.data(), eg(map, 8, d, 3)}),
      Catch::Contains("expert_grouped rows [8, 6] with row stride 3 and element stride 1 overlap"));
  for (float x : g) CHECK(x == 7.0f);
  // capacity_padded: positions of one expert overlapping.
  std::vector<std::int64_t> pos{0, 0, 1, 0, 1, 0, 1, 1};
  const moereg::topk_view P(pos.data(), T, k);
  moereg::capacity_padded cp(I, P, 4, 2, d);
  cp.row_stride = 2;
  CHECK_THROWS_WITH(cp.validate("test"),
                    Catch::Contains("capacity_padded buffer [4, 2, 6] with strides (12, 2, 1) overlaps"));
}

TEST_CASE("grouped_view reads a column-major Eigen matrix with its real strides", "[layouts][unique]") {
  // 5 tokens, k = 3, d = 7, rows sorted by expert; the same rows row-major and column-major.
  const index_t T = 5, k = 3, d = 7, N = T * k;
  moereg_test::rng r(11);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(T * k)), row_of(ids.size());
  for (index_t t = 0; t < T; ++t)
    for (index_t s = 0; s < k; ++s) {
      ids[static_cast<std::size_t>(t * k + s)] = (t + s) % 4;
      row_of[static_cast<std::size_t>(t * k + s)] = (s * T + t);  // any permutation of the rows
    }
  Eigen::MatrixXd Hc(N, d);  // column-major, Eigen's default
  for (index_t i = 0; i < N; ++i)
    for (index_t j = 0; j < d; ++j) Hc(i, j) = r.normal();
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Hr = Hc;
  const moereg::topk_view I(ids.data(), T, k), map(row_of.data(), T, k);
  const moereg::specialization_loss sp{};
  using eg = moereg::expert_grouped;
  Eigen::MatrixXd Gc = Eigen::MatrixXd::Constant(N, d, 7.0);
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Gr = Gc;
  const double vc =
      sp.value_and_grad(moereg::specialization_inputs<double, eg>{moereg::grouped_view(map, std::as_const(Hc)), I},
                        moereg::grouped_view(map, Gc));
  const double vr = sp.value_and_grad(moereg::specialization_inputs<double, eg>{{Hr.data(), eg(map, N, d)}, I},
                                      {Gr.data(), eg(map, N, d)});
  CHECK(vc == vr);
  CHECK(vc > 0);
  CHECK((Gc - Eigen::MatrixXd(Gr)).cwiseAbs().maxCoeff() == 0.0);
  // The old mistake, for the record: the column-major buffer described as row-major gives
  // another value.
  const double wrong = sp.value(moereg::specialization_inputs<double, eg>{{Hc.data(), eg(map, N, d)}, I});
  CHECK(std::fabs(wrong - vr) > 1e-6 * vr);
}
