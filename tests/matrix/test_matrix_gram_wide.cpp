// Optimisation-level matrix: the Gram-based losses in double and float (matrix/gram_cases.hpp).
#include "matrix/gram_cases.hpp"

TEST_CASE("matrix: Gram-based losses against the reference, double and float", "[matrix][gram]") {
  SECTION("double") {
    moereg_matrix::check_gram_losses<double>();
  }
  SECTION("float") {
    moereg_matrix::check_gram_losses<float>();
  }
}
