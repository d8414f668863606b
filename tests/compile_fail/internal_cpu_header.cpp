// Must not compile: the CPU backend's internal headers are reached through
// <moereg/backend/cpu.hpp>; included directly, one says so.
#include <moereg/backend/cpu/row_engine.hpp>

int main() {
  return 0;
}
