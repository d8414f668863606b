// Thread safety: the loss objects are small values with no mutable state, so the same
// objects may be called from many threads at once. Eight std::threads run every loss on the
// same inputs (each writing its own gradient buffer) many times; every result must be bitwise
// the serial one. Run under ThreadSanitizer in CI (.ci/run, tag [threads]).
#include <catch2/catch.hpp>

#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <moereg/moereg.hpp>

#include "hardening/cases.hpp"

namespace {

using moereg::index_t;
using namespace moereg_hardening;

struct outcome {
  double value = 0;
  std::vector<double> grad;  // every gradient buffer, concatenated
};

// One named computation: fills an outcome from the shared, read-only inputs.
struct job {
  std::string name;
  std::function<outcome()> run;
};

std::vector<job> make_jobs(const routing_case& c) {
  const index_t T = c.T, E = c.E, k = c.k, d = c.d;
  const moereg::mask_view mask(c.mask.data(), T);
  const moereg::topk_view topk(c.I.data(), T, k);
  std::vector<job> jobs;

  jobs.push_back({"load_balancing", [&c, T, E, topk, mask] {
                    const moereg::load_balancing_loss loss{};
                    outcome o;
                    o.grad.assign(c.P.size(), 0.0);
                    o.value = loss.value_and_grad(moereg::load_balancing_inputs<double>{{c.P.data(), T, E}, topk, mask},
                                                  moereg::matrix_view<double>(o.grad.data(), T, E));
                    return o;
                  }});
  jobs.push_back({"load_balancing_sequence", [&c, T, E, topk, mask] {
                    moereg::load_balancing_loss loss{};
                    loss.cfg.scope = moereg::lb_scope::sequence;
                    loss.cfg.seq_len = T / 4;
                    outcome o;
                    o.grad.assign(c.P.size(), 0.0);
                    o.value = loss.value_and_grad(moereg::load_balancing_inputs<double>{{c.P.data(), T, E}, topk, mask},
                                                  moereg::matrix_view<double>(o.grad.data(), T, E));
                    return o;
                  }});
  jobs.push_back({"z_loss", [&c, T, E, mask] {
                    const moereg::z_loss loss{};
                    outcome o;
                    o.grad.assign(c.Z.size(), 0.0);
                    o.value = loss.value_and_grad(moereg::z_loss_inputs<double>{{c.Z.data(), T, E}, mask},
                                                  moereg::matrix_view<double>(o.grad.data(), T, E));
                    return o;
                  }});
  jobs.push_back({"specialization", [&c, T, k, d, E, topk, mask] {
                    const moereg::specialization_loss loss{};
                    outcome o;
                    o.grad.assign(c.H.size(), 0.0);
                    moereg::specialization_inputs<double, moereg::token_major> in{
                        moereg::token_major_view<const double>(c.H.data(), T, k, d), topk, mask, E};
                    o.value = loss.value_and_grad(in, moereg::token_major_view<double>(o.grad.data(), T, k, d));
                    return o;
                  }});
  jobs.push_back({"coupling", [&c, T, E, k, mask] {
                    const moereg::coupling_loss loss{};
                    const moereg::routing_view<double> probs[2] = {{c.P.data(), T, E}, {c.P2.data(), T, E}};
                    const moereg::topk_view tk[2] = {{c.I.data(), T, k}, {c.I2.data(), T, k}};
                    outcome o;
                    o.grad.assign(2 * c.P.size(), 0.0);
                    const moereg::matrix_view<double> g[2] = {{o.grad.data(), T, E}, {o.grad.data() + T * E, T, E}};
                    o.value = loss.value_and_grad(moereg::coupling_inputs<double>{probs, tk, 2, mask}, g);
                    return o;
                  }});
  jobs.push_back({"variance", [&c, T, E, mask] {
                    const moereg::variance_loss loss{};
                    outcome o;
                    o.grad.assign(c.P.size(), 0.0);
                    o.value = loss.value_and_grad(moereg::variance_inputs<double>{{c.P.data(), T, E}, mask},
                                                  moereg::matrix_view<double>(o.grad.data(), T, E));
                    return o;
                  }});
  jobs.push_back({"entropy", [&c, T, E, mask] {
                    const moereg::entropy_loss loss{};
                    outcome o;
                    o.grad.assign(c.P.size(), 0.0);
                    o.value = loss.value_and_grad(moereg::entropy_inputs<double>{{c.P.data(), T, E}, mask},
                                                  moereg::matrix_view<double>(o.grad.data(), T, E));
                    return o;
                  }});
  return jobs;
}

}  // namespace

TEST_CASE("the same loss objects give bitwise the serial result from 8 threads at once", "[threads][hardening]") {
  // T spans several CPU blocks (256 rows) so that the blocked reductions are exercised.
  const routing_case c = make_case(4242, 600, 12, 3, 24);
  const std::vector<job> jobs = make_jobs(c);
  std::vector<outcome> serial;
  for (const auto& j : jobs) serial.push_back(j.run());

  constexpr int n_threads = 8, rounds = 3;
  std::atomic<int> mismatches{0};
  std::vector<std::string> bad(n_threads);
  std::atomic<int> ready{0};
  std::vector<std::thread> pool;
  for (int w = 0; w < n_threads; ++w)
    pool.emplace_back([&, w] {
      ++ready;
      while (ready.load() < n_threads) std::this_thread::yield();  // start together
      for (int r = 0; r < rounds; ++r)
        for (std::size_t i = 0; i < jobs.size(); ++i) {
          // Each worker walks the jobs from a different starting point, so different losses overlap.
          const std::size_t j = (i + static_cast<std::size_t>(w)) % jobs.size();
          const outcome o = jobs[j].run();
          if (!bitwise_equal(o.value, serial[j].value) || !bitwise_equal(o.grad, serial[j].grad)) {
            ++mismatches;
            bad[static_cast<std::size_t>(w)] = jobs[j].name;
          }
        }
    });
  for (auto& t : pool) t.join();
  for (const auto& b : bad) CHECK(b.empty());
  CHECK(mismatches.load() == 0);
  // The serial results are real numbers, not a vacuous comparison of zeros.
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    INFO(jobs[j].name);
    CHECK(serial[j].value != 0.0);
    CHECK(moereg_test::max_abs(serial[j].grad) > 0.0);
  }
}
