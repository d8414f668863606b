// libFuzzer target: the .npy reader of moereg-eval on arbitrary bytes. Any input must either
// parse or throw moereg::error (npy_error); a parsed array must survive a write/read round trip.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "moereg-eval/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace npy = moereg_eval::npy;
  npy::array a;
  try {
    a = npy::parse_npy(data, size);
  } catch (const moereg::error&) {
    return 0;
  }
  // Round trip: what we accept we can write, and reading it back gives the same array.
  const std::vector<std::uint8_t> bytes = npy::serialize_npy(a);
  const npy::array b = npy::parse_npy(bytes.data(), bytes.size());
  if (b.type() != a.type() || b.shape() != a.shape()) std::abort();
  const std::vector<std::uint8_t> again = npy::serialize_npy(b);
  if (again != bytes) std::abort();
  return 0;
}
