// moereg::compiled: every loss entry point for float storage (see instantiate.hpp).
#include "instantiate.hpp"

MOEREG_DETAIL_INSTANTIATE(float)
