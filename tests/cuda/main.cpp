// Catch2 main of the CUDA tests: without a usable CUDA device every test exits with 77, which
// CTest (SKIP_RETURN_CODE) reports as skipped. Listing the tests needs no device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include <cuda_runtime_api.h>

int main(int argc, char** argv) {
  Catch::Session session;
  const int rc = session.applyCommandLine(argc, argv);
  if (rc != 0) return rc;
  const auto& cfg = session.configData();
  const bool listing = cfg.listTests || cfg.listTestNamesOnly || cfg.listTags || cfg.listReporters || cfg.showHelp;
  if (!listing) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      std::printf("moereg CUDA tests skipped: no usable CUDA device (%s)\n",
                  e != cudaSuccess ? cudaGetErrorString(e) : "device count 0");
      return 77;
    }
  }
  return session.run();
}
