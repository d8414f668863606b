// A tiny deterministic reader of fuzzer bytes: every call consumes bytes from the front and
// returns a default once the input is exhausted, so any input maps to one test case.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace moereg_fuzz {

class byte_reader {
 public:
  byte_reader(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}

  std::uint8_t byte() { return p_ < end_ ? *p_++ : std::uint8_t(0); }
  bool flag() { return (byte() & 1u) != 0; }
  /// A value in [lo, hi] (inclusive), from one or two bytes.
  std::int64_t range(std::int64_t lo, std::int64_t hi) {
    const auto span = static_cast<std::uint64_t>(hi - lo) + 1u;
    std::uint64_t v = byte();
    if (span > 256u) v = (v << 8) | byte();
    return lo + static_cast<std::int64_t>(v % span);
  }
  /// A float from a byte: mostly ordinary values, sometimes 0, +-inf, nan or huge.
  double number() {
    const std::uint8_t b = byte();
    switch (b) {
      case 250:
        return 0.0;
      case 251:
        return 1.0;
      case 252:
        return 1e4;
      case 253:
        return -1e4;
      case 254:
        return __builtin_inf();
      case 255:
        return __builtin_nan("");
      default:
        return (static_cast<double>(b) - 125.0) / 31.0;
    }
  }
  bool empty() const { return p_ >= end_; }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

}  // namespace moereg_fuzz
