// The two exception kinds (core/error.hpp): bad input is a std::invalid_argument, a backend
// failure a std::runtime_error, and neither is the other.
#include <catch2/catch.hpp>

#include <stdexcept>
#include <type_traits>

#include <moereg/core/error.hpp>

TEST_CASE("moereg::error is invalid_argument, moereg::backend_error is runtime_error", "[errors]") {
  static_assert(std::is_base_of_v<std::invalid_argument, moereg::error>);
  static_assert(std::is_base_of_v<std::runtime_error, moereg::backend_error>);
  static_assert(!std::is_base_of_v<std::invalid_argument, moereg::backend_error>);
  static_assert(!std::is_base_of_v<std::runtime_error, moereg::error>);
  CHECK_THROWS_AS(moereg::detail::require(false, "who", ": bad ", 3), std::invalid_argument);
  CHECK_THROWS_WITH(moereg::detail::require(false, "who", ": bad ", 3), "who: bad 3");
  CHECK_THROWS_AS(moereg::detail::require_backend(false, "who: cudaMemcpy failed"), std::runtime_error);
  CHECK_NOTHROW(moereg::detail::require_backend(true, "never"));
}
