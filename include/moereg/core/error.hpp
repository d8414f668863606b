// moereg::error and the validation helpers used at every public entry point.
//
// Validation happens once, on the host, before anything is written: a call that throws
// leaves every output buffer exactly as it was.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moereg {

/// The exception every public entry point throws for bad input. Its message names the
/// argument at fault and the shapes involved, for example
/// "load_balancing: topk has 7 rows but probs has 8 rows".
class error : public std::invalid_argument {
public:
  /// An error whose what() is `what`.
  explicit error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// Throws moereg::error with the concatenation of `args` when `ok` is false.
template <class... Args>
void require(bool ok, Args&&... args) {
  if (!ok) throw error(concat(std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace moereg
