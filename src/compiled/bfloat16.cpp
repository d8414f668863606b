// moereg::compiled: every loss entry point for bfloat16 storage (see instantiate.hpp).
#include "instantiate.hpp"

MOEREG_DETAIL_INSTANTIATE(bfloat16)
