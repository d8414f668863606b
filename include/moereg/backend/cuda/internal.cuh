// Included first by every internal header of the CUDA backend (no include guard: it checks at
// each inclusion): refuses a direct inclusion of those headers, then brings the configuration.
#ifndef MOEREG_DETAIL_CUDA_BACKEND
#error "moereg: this is an internal header of the CUDA backend; include <moereg/backend/cuda.hpp>"
#endif

#include "../../core/config.hpp"
