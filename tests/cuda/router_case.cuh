// Random router inputs on the host and on the device, shared by the CUDA router-loss tests.
#pragma once

#include <cstdint>
#include <vector>

#include "cuda/support.cuh"
#include "support/random.hpp"

namespace moereg_cuda_test {

/// P (or Z) [T, E] in storage type T, top-k [T, k] (int64, -1 = dropped), mask [T]; the same
/// data on the host and on the device.
template <class T>
struct router_case {
  long long T_, E, k;
  std::vector<T> P;
  std::vector<std::int64_t> I;
  std::vector<std::uint8_t> m;
  device_buffer<T> dP;
  device_buffer<std::int64_t> dI;
  device_buffer<std::uint8_t> dm;

  /// `logits`: N(0, scale^2) entries instead of softmax rows.
  router_case(std::uint64_t seed, long long rows, long long E_, long long k_, double drop = 0.2, double pad = 0.2,
              bool logits = false, double scale = 1.5)
      : T_(rows), E(E_), k(k_) {
    moereg_test::rng r(seed);
    const auto p = logits ? moereg_test::random_normal(r, static_cast<std::size_t>(rows * E), scale)
                          : moereg_test::random_probs(r, rows, E, scale);
    P = from_double<T>(p);
    I = moereg_test::random_topk<std::int64_t>(r, rows, E, k, drop);
    m = moereg_test::random_mask(r, rows, pad);
    upload();
  }
  void upload() {
    dP = device_buffer<T>(P);
    dI = device_buffer<std::int64_t>(I);
    dm = device_buffer<std::uint8_t>(m);
  }

  moereg::routing_view<T> probs(bool device) const { return {device ? dP.get() : P.data(), T_, E}; }
  moereg::topk_view topk(bool device) const { return {device ? dI.get() : I.data(), T_, k}; }
  moereg::mask_view mask(bool device, bool masked = true) const {
    if (!masked) return {};
    return {device ? dm.get() : m.data(), T_};
  }
  std::size_t size() const { return static_cast<std::size_t>(T_ * E); }
};

/// A [rows, cols] gradient on the host and the device, both starting from the same values.
template <class T>
struct grad_pair {
  long long rows, cols;
  std::vector<T> host;
  device_buffer<T> dev;
  grad_pair(long long r, long long c, std::uint64_t seed = 0) : rows(r), cols(c) {
    host.assign(static_cast<std::size_t>(r * c), T(0));
    if (seed != 0) {
      moereg_test::rng g(seed);
      for (auto& x : host) x = static_cast<T>(g.uniform(-1, 1));
    }
    dev = device_buffer<T>(host);
  }
  moereg::matrix_view<T> view(bool device) { return {device ? dev.get() : host.data(), rows, cols}; }
  std::vector<double> cpu() const { return to_double(host); }
  std::vector<double> gpu() const { return to_double(dev.download()); }
};

}  // namespace moereg_cuda_test
