// Helpers of the CUDA tests: device buffers, a stream with value/status words and a
// workspace, tolerances for comparing the CUDA backend with the CPU backend.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <moereg/backend/cpu.hpp>  // the reference every CUDA result is compared with
#include <moereg/backend/cuda.hpp>

namespace moereg_cuda_test {

#define MOEREG_CUDA_REQUIRE(call)                         \
  do {                                                    \
    const cudaError_t moereg_e_ = (call);                 \
    INFO(#call << ": " << cudaGetErrorString(moereg_e_)); \
    REQUIRE(moereg_e_ == cudaSuccess);                    \
  } while (0)

/// An owning device array (cudaMalloc; the tests may allocate, the library never does).
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n) { allocate(n); }
  explicit device_buffer(const std::vector<T>& h) {
    allocate(h.size());
    upload(h);
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~device_buffer() {
    if (p_ != nullptr) (void)cudaFree(p_);
  }

  void allocate(std::size_t n) {
    if (p_ != nullptr) (void)cudaFree(p_);
    p_ = nullptr;
    n_ = n;
    if (n > 0) MOEREG_CUDA_REQUIRE(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() == n_);
    if (n_ > 0) MOEREG_CUDA_REQUIRE(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (n_ > 0) MOEREG_CUDA_REQUIRE(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  /// Fills the bytes with `byte` (e.g. 0xFF makes every float a NaN: untouched entries show).
  void fill_bytes(int byte) {
    if (n_ > 0) MOEREG_CUDA_REQUIRE(cudaMemset(p_, byte, n_ * sizeof(T)));
  }
  T* get() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// A stream, device words for the value(s) and the status, and a workspace.
struct gpu_env {
  cudaStream_t stream = nullptr;
  device_buffer<double> values;
  device_buffer<int> status;
  device_buffer<unsigned char> ws;

  gpu_env() {
    MOEREG_CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    values.allocate(16);
    values.fill_bytes(0);  // every slot initialised (compute-sanitizer initcheck)
    status.allocate(1);
    status.fill_bytes(0);
  }
  ~gpu_env() {
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }
  gpu_env(const gpu_env&) = delete;
  gpu_env& operator=(const gpu_env&) = delete;

  /// A backend with `bytes` of workspace starting `offset` bytes into the buffer (offset 1
  /// exercises the alignment code) and value slot `slot`.
  moereg::cuda backend(std::size_t bytes, std::size_t offset = 0, int slot = 0) {
    if (ws.size() < bytes + offset) ws.allocate(bytes + offset + 512);
    moereg::cuda be;
    be.stream = stream;
    be.workspace = bytes > 0 ? static_cast<void*>(ws.get() + offset) : nullptr;
    be.workspace_bytes = bytes;
    be.value = values.get() + slot;
    be.status = status.get();
    return be;
  }
  void sync() { MOEREG_CUDA_REQUIRE(cudaStreamSynchronize(stream)); }
  double value(int slot = 0) {
    sync();
    return values.download()[static_cast<std::size_t>(slot)];
  }
  int read_status() {
    sync();
    return status.download()[0];
  }
  void clear_status() {
    sync();
    status.fill_bytes(0);
  }
};

template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(v[i]);
  return out;
}

template <class T>
std::vector<T> from_double(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(v[i]);
  return out;
}

/// Relative tolerance of a value computed by both backends in accumulator arithmetic
/// (different summation orders only).
template <class T>
double value_tol() {
  return std::is_same_v<T, double> ? 1e-11 : 2e-5;
}

/// Tolerance of a gradient entry relative to max |g|: the accumulator tolerance plus two
/// units in the last place of the storage type (the two backends may round a float that
/// differs in its last bits to neighbouring 16-bit values).
template <class T>
double grad_tol() {
  if constexpr (std::is_same_v<T, double>)
    return 1e-11;
  else if constexpr (std::is_same_v<T, float>)
    return 2e-5;
  else if constexpr (std::is_same_v<T, moereg::half>)
    return 2.5e-3;
  else
    return 2e-2;
}

/// max_i |a_i - b_i| / max(max_i |b_i|, floor); NaN anywhere gives infinity.
inline double rel_err(const std::vector<double>& a, const std::vector<double>& b, double floor = 1e-30) {
  REQUIRE(a.size() == b.size());
  double m = 0, s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return HUGE_VAL;
    if (std::isnan(a[i])) continue;
    m = std::max(m, std::abs(a[i] - b[i]));
    s = std::max(s, std::abs(b[i]));
  }
  return m / std::max(s, floor);
}

inline bool close(double a, double b, double rel, double abs_floor = 1e-30) {
  if (std::isnan(a) || std::isnan(b)) return false;
  return std::abs(a - b) <= rel * std::max(std::abs(b), abs_floor) + abs_floor;
}

/// Bitwise equality of two arrays.
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
inline bool same_bits(double a, double b) {
  return std::memcmp(&a, &b, sizeof(double)) == 0;
}

inline bool all_nan(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isnan(x); });
}

}  // namespace moereg_cuda_test
