// moereg::dist NCCL adapter. Built only with CUDA and NCCL. Without a library to link it is
// compiled and nothing more (the header must compile); linked, it runs:
//   - argument errors, thrown before NCCL is called;
//   - an error NCCL returns (a null communicator), thrown with ncclGetErrorString's text;
//   - with at least one GPU: one process drives every visible GPU as one rank of a
//     communicator (ncclCommInitAll), sums a buffer of distinct integer-valued doubles per
//     rank inside ncclGroupStart/End, synchronises, and compares exactly.
// Without a GPU it exits with 77, which CTest reports as skipped (SKIP_RETURN_CODE).
#include <cstdio>
#include <string>
#include <vector>

#include <moereg/dist/nccl.hpp>

#ifndef MOEREG_NCCL_COMPILE_ONLY

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (ok) return;
  ++failures;
  std::printf("FAILED: %s\n", what);
}

// Whether f threw Error (moereg::error for bad arguments, moereg::backend_error for NCCL's own
// failures) with `needle` in its message.
template <class Error = moereg::error, class F>
bool throws_with(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    const bool ok = std::string(e.what()).find(needle) != std::string::npos;
    if (!ok) std::printf("unexpected message: %s\n", e.what());
    return ok;
  }
  return false;
}

#define CUDA_OK(call)                                                                      \
  do {                                                                                     \
    const cudaError_t e_ = (call);                                                         \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      return 1;                                                                            \
    }                                                                                      \
  } while (0)

}  // namespace

int main() {
  double host = 0;
  check(throws_with([&] { moereg::dist::allreduce(&host, -2, nullptr, nullptr); }, "count = -2 is negative"),
        "negative count throws");
  check(throws_with([&] { moereg::dist::allreduce(nullptr, 4, nullptr, nullptr); }, "device buffer is null"),
        "null buffer throws");
  check(throws_with<moereg::backend_error>(
            [&] { moereg::dist::allreduce_sum(&host, 1, nullptr, nullptr); },
            std::string("ncclAllReduce of 1 doubles failed: ") + ncclGetErrorString(ncclInvalidArgument)),
        "a null communicator is reported with ncclGetErrorString's text");

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("moereg NCCL adapter: argument checks %s; no CUDA device, the collective test is skipped\n",
                failures == 0 ? "ok" : "FAILED");
    return failures == 0 ? 77 : 1;
  }

  const int n = devices;
  const std::size_t count = 1000;
  std::vector<int> ids(static_cast<std::size_t>(n));
  for (int d = 0; d < n; ++d) ids[static_cast<std::size_t>(d)] = d;
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(n));
  if (ncclCommInitAll(comms.data(), n, ids.data()) != ncclSuccess) {
    std::printf("ncclCommInitAll failed\n");
    return 1;
  }
  std::vector<double*> bufs(static_cast<std::size_t>(n));
  std::vector<cudaStream_t> streams(static_cast<std::size_t>(n));
  for (int d = 0; d < n; ++d) {
    const auto u = static_cast<std::size_t>(d);
    CUDA_OK(cudaSetDevice(d));
    CUDA_OK(cudaStreamCreate(&streams[u]));
    CUDA_OK(cudaMalloc(&bufs[u], count * sizeof(double)));
    std::vector<double> v(count);
    for (std::size_t i = 0; i < count; ++i) v[i] = static_cast<double>((d + 1) * static_cast<int>(i + 1));
    CUDA_OK(cudaMemcpy(bufs[u], v.data(), count * sizeof(double), cudaMemcpyHostToDevice));
  }
  ncclGroupStart();
  for (int d = 0; d < n; ++d) {
    const auto u = static_cast<std::size_t>(d);
    moereg::dist::allreduce(bufs[u], static_cast<moereg::index_t>(count), comms[u], streams[u]);
  }
  if (ncclGroupEnd() != ncclSuccess) {
    std::printf("ncclGroupEnd failed\n");
    return 1;
  }
  const double ranks_sum = static_cast<double>(n) * (n + 1) / 2;
  for (int d = 0; d < n; ++d) {
    const auto u = static_cast<std::size_t>(d);
    CUDA_OK(cudaSetDevice(d));
    CUDA_OK(cudaStreamSynchronize(streams[u]));
    std::vector<double> v(count);
    CUDA_OK(cudaMemcpy(v.data(), bufs[u], count * sizeof(double), cudaMemcpyDeviceToHost));
    bool ok = true;
    for (std::size_t i = 0; i < count; ++i) ok = ok && v[i] == ranks_sum * static_cast<double>(i + 1);
    check(ok, "ncclAllReduce sum over the GPUs");
    CUDA_OK(cudaFree(bufs[u]));
    CUDA_OK(cudaStreamDestroy(streams[u]));
    ncclCommDestroy(comms[u]);
  }
  std::printf("moereg NCCL adapter on %d GPU(s): %s\n", n, failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}

#endif  // MOEREG_NCCL_COMPILE_ONLY
