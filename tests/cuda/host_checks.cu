// Host-side parts of the CUDA backend that need no GPU: workspace sizes and carving, and the
// shape checks every entry point runs before it enqueues anything.
#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include <moereg/backend/cuda.hpp>

using moereg::index_t;

TEST_CASE("cuda workspace carving aligns every sub-buffer to 256 bytes from any base", "[cuda_host][workspace]") {
  std::vector<unsigned char> buf(1 << 16);
  std::size_t need = 0;
  {
    moereg::detail::workspace_carver q(nullptr);
    CHECK(q.take<double>(3) == nullptr);
    CHECK(q.take<int>(0) == nullptr);
    CHECK(q.take<float>(1000) == nullptr);
    need = q.required();
  }
  CHECK(need >= 3 * sizeof(double) + 256 + 1000 * sizeof(float));
  for (std::size_t off = 0; off < 300; ++off) {
    moereg::detail::workspace_carver c(buf.data() + off);
    auto* a = c.take<double>(3);
    auto* z = c.take<int>(0);
    auto* b = c.take<float>(1000);
    CHECK(c.required() == need);
    CHECK(reinterpret_cast<std::uintptr_t>(a) % 256 == 0);
    CHECK(reinterpret_cast<std::uintptr_t>(b) % 256 == 0);
    CHECK(z == nullptr);
    CHECK(reinterpret_cast<unsigned char*>(a) >= buf.data() + off);
    CHECK(reinterpret_cast<unsigned char*>(b + 1000) <= buf.data() + off + need);
    CHECK(reinterpret_cast<unsigned char*>(b) >= reinterpret_cast<unsigned char*>(a + 3));
  }
  moereg::detail::workspace_carver none(nullptr);
  CHECK(none.required() == 0);
}

TEST_CASE("cuda workspace sizes grow with the problem and do not depend on the backend value",
          "[cuda_host][workspace]") {
  const float P[1] = {0};
  const std::int32_t I[1] = {0};
  moereg::load_balancing_loss lb;
  moereg::z_loss z;
  std::size_t prev_lb = 0, prev_z = 0;
  for (index_t T : {0, 1, 255, 256, 257, 10000}) {
    moereg::load_balancing_inputs<float> in{{P, T, 8}, {I, T, 2}};
    moereg::z_loss_inputs<float> zin{{P, T, 8}};
    const std::size_t a = moereg::workspace_size(lb, in), b = moereg::workspace_size(z, zin);
    moereg::cuda other;
    other.workspace_bytes = 12345;
    CHECK(moereg::workspace_size(lb, in, other) == a);
    CHECK(a > 0);
    CHECK(b > 0);
    CHECK(a >= prev_lb);
    CHECK(b >= prev_z);
    prev_lb = a, prev_z = b;
  }
  moereg::load_balancing_loss seq{{0.01, moereg::lb_scope::sequence, 16}};
  moereg::load_balancing_inputs<float> in{{P, 64, 8}, {I, 64, 2}};
  CHECK(moereg::workspace_size(seq, in) > 0);
}

TEST_CASE("cuda entry points validate shapes on the host before launching", "[cuda_host][errors]") {
  const float P[1] = {0};
  float G[1] = {0};
  const std::int64_t I[1] = {0};
  const double S[1] = {0};
  moereg::cuda be;  // no stream, no workspace: every call below must throw before using them
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const moereg::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  moereg::load_balancing_loss lb;
  const auto m1 = message([&] {
    moereg::load_balancing_inputs<float> in{{P, 8, 4}, {I, 7, 2}};
    (void)lb.value(in, {}, be);
  });
  CHECK(m1.find("topk has 7 rows") != std::string::npos);
  CHECK(m1.find("cuda") != std::string::npos);
  const auto m2 = message([&] {
    moereg::load_balancing_inputs<float> in{{P, 8, 4}, {I, 8, 5}};
    (void)lb.value(in, {}, be);
  });
  CHECK(m2.find("k > E") != std::string::npos);
  const auto m3 = message([&] {
    moereg::load_balancing_inputs<float> in{{P, 8, 4}, {I, 8, 2}};
    (void)lb.value_and_grad(in, moereg::matrix_view<float>(G, 8, 3), {}, {}, be);
  });
  CHECK(m3.find("grad_probs") != std::string::npos);
  const auto m4 = message([&] {
    moereg::load_balancing_loss seq{{0.01, moereg::lb_scope::sequence, 3}};
    moereg::load_balancing_inputs<float> in{{P, 8, 4}, {I, 8, 2}};
    (void)seq.value(in, {}, be);
  });
  CHECK(m4.find("not a multiple of seq_len") != std::string::npos);
  const auto m5 = message([&] {
    moereg::load_balancing_inputs<float> in{{P, 8, 4}, {I, 8, 2}};
    (void)lb.value(in, {S, 3}, be);
  });
  CHECK(m5.find("reduced statistics have 3 entries") != std::string::npos);
  moereg::z_loss z;
  const auto m6 = message([&] {
    moereg::z_loss_inputs<float> in{{P, 8, 0}};
    (void)z.value(in, {}, be);
  });
  CHECK(m6.find("E = 0") != std::string::npos);
  const auto m7 = message([&] {
    moereg::z_loss_inputs<float> in{{P, 8, 4}, {I, 5}};
    (void)z.value(in, {}, be);
  });
  CHECK(m7.find("mask has 5 entries") != std::string::npos);
}

TEST_CASE("cuda entry points refuse too little workspace before launching", "[cuda_host][errors][workspace]") {
  // T = 0 and null views: nothing to read, but the finish step still needs its buffers.
  moereg::load_balancing_loss lb;
  moereg::load_balancing_inputs<float> in{{nullptr, 0, 4}, {static_cast<const std::int32_t*>(nullptr), 0, 2}};
  const std::size_t need = moereg::workspace_size(lb, in);
  REQUIRE(need > 0);
  moereg::cuda be;
  std::string msg;
  try {
    (void)lb.value(in, {}, be);
  } catch (const moereg::error& e) {
    msg = e.what();
  }
  CHECK(msg.find("workspace is 0 bytes but this call needs " + std::to_string(need)) != std::string::npos);
  moereg::z_loss z;
  moereg::z_loss_inputs<float> zin{{nullptr, 0, 4}};
  CHECK_THROWS_AS(z.value(zin, {}, be), moereg::error);
}

TEST_CASE("cuda status words have readable names", "[cuda_host][status]") {
  CHECK(moereg::cuda_status_string(moereg::cuda_ok) == "ok");
  const std::string s = moereg::cuda_status_string(moereg::cuda_topk_out_of_range | moereg::cuda_bad_stats);
  CHECK(s.find("out of range") != std::string::npos);
  CHECK(s.find("statistics") != std::string::npos);
  CHECK(moereg::cuda_status_string(1 << 20).find("unknown") != std::string::npos);
}
