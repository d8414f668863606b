// Sums loss statistics across the ranks of an MPI communicator (LOSSES.md section 9).
//
//   moereg::dist::allreduce_sum(buf, count, comm)   MPI_Allreduce(MPI_IN_PLACE, buf, count,
//                                                    MPI_DOUBLE, MPI_SUM, comm)
//   moereg::dist::allreduce(bundle, comm)           the same over a stats_bundle's buffer
//   moereg::dist::allreduce(accumulator, comm)      the same over a stats_accumulator's sums
//
// A collective: every rank of `comm` must call it with the same count, in the same order
// relative to its other collectives on `comm` (a stats_bundle built from the same losses
// in the same order on every rank has the same size everywhere). Counts above INT_MAX are
// reduced in several calls.
//
// Errors: MPI's default error handler (MPI_ERRORS_ARE_FATAL) aborts the job before this
// code sees an error. A communicator with MPI_ERRORS_RETURN (MPI_Comm_set_errhandler) makes
// MPI return the error code instead; it is then thrown as moereg::backend_error carrying
// MPI_Error_string's text. Calls before MPI_Init or after MPI_Finalize throw
// moereg::backend_error too; a bad count or buffer throws moereg::error before MPI is called.
//
// Determinism: the summation order of MPI_Allreduce is the implementation's and may change
// with the rank count. Integer statistics (counts, valid tokens) are exact in double up to
// 2^53 and reduce to the same value for every order; floating statistics (column sums)
// may differ in the last bits between rank counts.
//
// This header needs <mpi.h> and linking against MPI (CMake: MPI::MPI_CXX); it is not part
// of the umbrella header moereg.hpp.
#pragma once

#include "../core/config.hpp"

#include <climits>
#include <string>

#include <mpi.h>

#include "../core/error.hpp"
#include "../core/stats.hpp"
#include "../core/types.hpp"

MOEREG_NAMESPACE_BEGIN
/// Distributed adapters: sum a loss's local statistics over a communicator (LOSSES.md section 9).
namespace dist {

namespace detail {

inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "unknown MPI error code " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(len));
}

}  // namespace detail

/// In-place sum of buf[0..count) over every rank of `comm` (MPI_DOUBLE, MPI_SUM).
inline void allreduce_sum(double* buf, index_t count, MPI_Comm comm) {
  const char* who = "moereg::dist::allreduce_sum";
  moereg::detail::require(count >= 0, who, ": count = ", count, " is negative");
  moereg::detail::require(buf != nullptr || count == 0, who, ": buffer is null but count = ", count);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  moereg::detail::require_backend(initialized != 0 && finalized == 0, who, ": MPI is ",
                                  initialized ? "already finalized" : "not initialized");
  index_t done = 0;
  do {  // at least one call, so that count = 0 stays a collective every rank takes part in
    const index_t n = count - done < static_cast<index_t>(INT_MAX) ? count - done : static_cast<index_t>(INT_MAX);
    const int rc = MPI_Allreduce(MPI_IN_PLACE, buf + done, static_cast<int>(n), MPI_DOUBLE, MPI_SUM, comm);
    if (rc != MPI_SUCCESS)
      throw backend_error(
          moereg::detail::concat(who, ": MPI_Allreduce of ", n, " doubles failed: ", detail::mpi_error_text(rc)));
    done += n;
  } while (done < count);
}

/// Sums a bundle's statistics across the ranks; afterwards bundle.view(h) holds the
/// reduced statistics of every loss in it.
inline void allreduce(stats_bundle& bundle, MPI_Comm comm) {
  allreduce_sum(bundle.data(), bundle.size(), comm);
}

/// Sums an accumulator's statistics across the ranks (the two-phase schedule: after the
/// last micro-batch of the global batch has been added).
inline void allreduce(stats_accumulator& acc, MPI_Comm comm) {
  allreduce_sum(acc.data(), acc.size(), comm);
}

}  // namespace dist
MOEREG_NAMESPACE_END
