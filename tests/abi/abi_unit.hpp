// The two halves of the ABI-namespace test: the same moereg calls compiled twice with
// different configurations (tests/abi/CMakeLists.txt).
#pragma once

struct abi_result {
  const char* abi = "";       // MOEREG_ABI_NAMESPACE as the unit saw it
  double specialization = 0;  // value_and_grad values
  double load_balancing = 0;
  double grad_sum = 0;  // sum of both gradients
};

abi_result abi_unit_a();  // OpenMP as the build has it, portable instructions
abi_result abi_unit_b();  // MOEREG_NO_OPENMP, and AVX-512 where the CPU has it
