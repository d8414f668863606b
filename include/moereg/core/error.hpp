// moereg::error, moereg::backend_error and the validation helpers used at every public entry
// point.
//
// Two kinds of failure, two exception types: bad input (a shape, a stride, an id, a
// coefficient) throws moereg::error, a std::invalid_argument; a failure of the machinery
// underneath (a CUDA call, MPI, NCCL) throws moereg::backend_error, a std::runtime_error.
// Validation happens once, on the host, before anything is written: a call that throws
// moereg::error leaves every output buffer exactly as it was.
#pragma once

#include "config.hpp"

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

MOEREG_NAMESPACE_BEGIN

/// The exception every public entry point throws for bad input. Its message names the
/// argument at fault and the shapes involved, for example
/// "load_balancing: topk has 7 rows but probs has 8 rows".
class error : public std::invalid_argument {
 public:
  /// An error whose what() is `what`.
  explicit error(const std::string& what) : std::invalid_argument(what) {}
};

/// The exception thrown when a backend or communication library fails at run time: a CUDA
/// call that returns an error, an MPI or NCCL all-reduce that fails, MPI used before
/// MPI_Init or after MPI_Finalize. Its message names the moereg function, the library call
/// and the library's own error text.
class backend_error : public std::runtime_error {
 public:
  /// A backend error whose what() is `what`.
  explicit backend_error(const std::string& what) : std::runtime_error(what) {}
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

/// Throws moereg::backend_error with the concatenation of `args` when `ok` is false.
template <class... Args>
void require_backend(bool ok, Args&&... args) {
  if (!ok) throw backend_error(concat(std::forward<Args>(args)...));
}

}  // namespace detail
MOEREG_NAMESPACE_END
