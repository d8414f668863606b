// moereg::compiled: every loss entry point for half storage (see instantiate.hpp).
#include "instantiate.hpp"

MOEREG_DETAIL_INSTANTIATE(half)
