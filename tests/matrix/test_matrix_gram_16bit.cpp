// Optimisation-level matrix: the Gram-based losses in bfloat16 and half (matrix/gram_cases.hpp).
#include "matrix/gram_cases.hpp"

TEST_CASE("matrix: Gram-based losses against the reference, bfloat16 and half", "[matrix][gram]") {
  SECTION("bfloat16") {
    moereg_matrix::check_gram_losses<moereg::bfloat16>();
  }
  SECTION("half") {
    moereg_matrix::check_gram_losses<moereg::half>();
  }
}
