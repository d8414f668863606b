// Index type, accumulator types and the storage traits of the element types.
//
// Storage (what lies in memory) and accumulation (what the arithmetic runs in) are
// separate: float, Eigen::half and Eigen::bfloat16 inputs accumulate in float, double
// inputs in double (LOSSES.md, rules that hold for every loss).
#pragma once

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "config.hpp"

/// moereg: Mixture-of-Experts regularization losses (forward value and analytic gradient).
/// The public API lives here; everything in a nested `detail` namespace is internal.
MOEREG_NAMESPACE_BEGIN

/// Every size and offset is 64-bit: an element offset may exceed 2^31.
using index_t = std::int64_t;

/// The 16-bit storage types. They are Eigen's, so Eigen matrices of them map without a copy.
using half = Eigen::half;          ///< Eigen::half (IEEE binary16)
using bfloat16 = Eigen::bfloat16;  ///< Eigen::bfloat16 (8-bit exponent, 7-bit mantissa)

/// The arithmetic type for a storage type T.
template <class T>
struct accumulator {
  using type = float;  ///< float for float, half and bfloat16
};
/// double inputs accumulate in double.
template <>
struct accumulator<double> {
  using type = double;  ///< double
};
/// accumulator<T>::type, ignoring const: float, or double for double.
template <class T>
using accumulator_t = typename accumulator<std::remove_cv_t<T>>::type;

/// True for the storage types the library supports.
template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<std::remove_cv_t<T>, float> || std::is_same_v<std::remove_cv_t<T>, double> ||
    std::is_same_v<std::remove_cv_t<T>, half> || std::is_same_v<std::remove_cv_t<T>, bfloat16>;

/// The message of the static_assert every loss input and chain helper makes on its element
/// type: integers, raw 16-bit patterns in uint16_t and other arithmetic types do not compile.
#define MOEREG_STORAGE_TYPE_MESSAGE                                                                                   \
  "moereg: the element type of probabilities, logits, scores and activations must be float, double, moereg::half or " \
  "moereg::bfloat16"

/// Reads one element as its accumulator type.
template <class T>
MOEREG_FORCEINLINE accumulator_t<T> load(const T& x) {
  return static_cast<accumulator_t<T>>(x);
}

/// Writes an accumulator value into storage type T (round to nearest even for 16-bit types).
template <class T, class A>
MOEREG_FORCEINLINE void store(T& dst, A v) {
  dst = static_cast<T>(static_cast<accumulator_t<T>>(v));
}

/// Name of a storage type, for error messages and tools.
template <class T>
constexpr const char* type_name() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>)
    return "float32";
  else if constexpr (std::is_same_v<U, double>)
    return "float64";
  else if constexpr (std::is_same_v<U, half>)
    return "float16";
  else if constexpr (std::is_same_v<U, bfloat16>)
    return "bfloat16";
  else
    return "unsupported";
}

MOEREG_NAMESPACE_END
