// The header-only unit: the same calls instantiated here from the headers, in an ABI namespace
// of its own so that the linker cannot merge them with the library's copies.
#undef MOEREG_COMPILED
#define MOEREG_ABI_NAMESPACE abi_test_header_only
#define MOEREG_TEST_RUN run_header_only
#include "every_loss.hpp"

static_assert(!MOEREG_DETAIL_USE_COMPILED, "this unit must instantiate the headers itself");
