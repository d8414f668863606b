// Included first by every internal header of the CPU backend (no include guard: it checks at
// each inclusion): refuses a direct inclusion of those headers, then brings the configuration.
#ifndef MOEREG_DETAIL_CPU_BACKEND
#error \
    "moereg: this is an internal header of the CPU backend; include <moereg/backend/cpu.hpp> (or <moereg/moereg.hpp>)"
#endif

#include "../../core/config.hpp"
