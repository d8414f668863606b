// The unit that uses moereg::compiled: its loss entry points are extern declarations, so every
// result below comes from the library's explicit instantiations (check_objects.cmake checks
// that this object defines none of them).
#define MOEREG_TEST_RUN run_with_library
#include "every_loss.hpp"

static_assert(MOEREG_DETAIL_USE_COMPILED, "this unit must see the extern declarations of moereg::compiled");
