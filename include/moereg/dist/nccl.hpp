// Sums loss statistics in device memory across the ranks of an NCCL communicator
// (LOSSES.md section 9).
//
//   moereg::dist::allreduce(device_buf, count, comm, stream)
//       ncclAllReduce(device_buf, device_buf, count, ncclFloat64, ncclSum, comm, stream)
//   moereg::dist::allreduce_sum(...)   the same function under the name the MPI adapter uses
//
// The call is enqueued on `stream` and returns: there is no synchronisation inside, so the
// reduced values are ready once `stream` has reached that point (cudaStreamSynchronize, an
// event, or later work on the same stream). It may be called between ncclGroupStart and
// ncclGroupEnd, and captured in a CUDA graph where NCCL supports that. With a non-blocking
// communicator (ncclConfig_t blocking = 0) NCCL may answer ncclInProgress; that is not an
// error here, and the caller polls ncclCommGetAsyncError as NCCL prescribes.
//
// A typical step with the statistics on the host: stats_bundle::compute_local into pinned
// memory, cudaMemcpyAsync to a device buffer, allreduce, cudaMemcpyAsync back, synchronise,
// then each loss reads bundle.view(h, host_buffer).
//
// Errors: a negative count or a null buffer with count > 0 throws moereg::error before NCCL
// is called; a result other than ncclSuccess throws moereg::backend_error with ncclGetErrorString's
// text (and ncclGetLastError's, where NCCL has it).
//
// Determinism: NCCL's summation order depends on the algorithm, the topology and the rank
// count. Integer statistics (counts, valid tokens) are exact in double up to 2^53 and sum to
// the same value in any order; floating statistics may differ in the last bits.
//
// This header needs <nccl.h> (which brings the CUDA runtime header) and linking against
// libnccl and the CUDA runtime; it is not part of the umbrella header moereg.hpp.
#pragma once

#include "../core/config.hpp"

#include <cstddef>
#include <string>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "../core/error.hpp"
#include "../core/types.hpp"

MOEREG_NAMESPACE_BEGIN
namespace dist {

/// In-place sum of the device buffer device_buf[0..count) over every rank of `comm`,
/// enqueued on `stream` (ncclFloat64, ncclSum). Does not synchronise.
inline void allreduce(double* device_buf, index_t count, ncclComm_t comm, cudaStream_t stream) {
  const char* who = "moereg::dist::allreduce (NCCL)";
  moereg::detail::require(count >= 0, who, ": count = ", count, " is negative");
  moereg::detail::require(device_buf != nullptr || count == 0, who, ": device buffer is null but count = ", count);
  const ncclResult_t rc =
      ncclAllReduce(device_buf, device_buf, static_cast<std::size_t>(count), ncclFloat64, ncclSum, comm, stream);
  if (rc == ncclSuccess) return;
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
  if (rc == ncclInProgress) return;  // non-blocking communicator: completion is polled by the caller
#endif
  std::string text = ncclGetErrorString(rc);
#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') text += std::string(" (") + last + ")";
#endif
  throw backend_error(moereg::detail::concat(who, ": ncclAllReduce of ", count, " doubles failed: ", text));
}

/// The same as allreduce(device_buf, count, comm, stream).
inline void allreduce_sum(double* device_buf, index_t count, ncclComm_t comm, cudaStream_t stream) {
  allreduce(device_buf, count, comm, stream);
}

}  // namespace dist
MOEREG_NAMESPACE_END
