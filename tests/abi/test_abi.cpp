// Links two translation units that include moereg with different configurations and checks
// that each computes the right thing with its own code: their ABI namespaces differ, so the
// linker cannot merge their template instantiations (the symbol check is the abi_symbols test).
#include <cmath>
#include <cstdio>
#include <cstring>

#include "abi_unit.hpp"

int main() {
  const abi_result a = abi_unit_a(), b = abi_unit_b();
  std::printf("unit a: %s  specialization %.9g  load balancing %.9g  gradient sum %.9g\n", a.abi, a.specialization,
              a.load_balancing, a.grad_sum);
  std::printf("unit b: %s  specialization %.9g  load balancing %.9g  gradient sum %.9g\n", b.abi, b.specialization,
              b.load_balancing, b.grad_sum);
  int bad = 0;
  if (std::strcmp(a.abi, b.abi) == 0) {
    std::printf("FAIL: both units use the ABI namespace %s\n", a.abi);
    bad = 1;
  }
  auto close = [](double x, double y) { return std::fabs(x - y) <= 1e-5 * (std::fabs(x) + std::fabs(y)) + 1e-12; };
  if (!close(a.specialization, b.specialization) || !close(a.load_balancing, b.load_balancing) ||
      !close(a.grad_sum, b.grad_sum) || !(a.specialization > 0) || !(a.load_balancing > 0)) {
    std::printf("FAIL: the two units disagree\n");
    bad = 1;
  }
  return bad;
}
