// Must not compile: the CUDA backend's internal headers are reached through
// <moereg/backend/cuda.hpp>; included directly, one says so (before anything needs nvcc).
#include <moereg/backend/cuda/gram.cuh>

int main() {
  return 0;
}
