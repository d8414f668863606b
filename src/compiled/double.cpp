// moereg::compiled: every loss entry point for double storage (see instantiate.hpp).
#include "instantiate.hpp"

MOEREG_DETAIL_INSTANTIATE(double)
